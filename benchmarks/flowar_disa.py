"""DiSA (diffusion step annealing) on the trained FlowAR digits model: speed and quality.

    python -m benchmarks.flowar_disa --workdir runs/flowar_digits [--min-steps 15 10 5]

Re-opens a finished `experiments.flowar_imagenet --config digits` work dir (every stage is
complete, so nothing trains) and samples it with the preset's 25 flow steps at every scale,
then with DiSA (25 steps at the first scale annealed linearly to N at the last) and Heun at
half the steps. Prints, per setting: flow-head calls per image, wall-clock of a 400-image
batch (after compilation), and FID-digits / class accuracy of 1,000 class-balanced samples.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile

from arjax.config import override
from experiments import flowar_imagenet as exp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", required=True, help="a finished digits work dir")
    parser.add_argument("--min-steps", type=int, nargs="+", default=[15, 10, 5])
    args = parser.parse_args(argv)
    settings = [("25 steps, every scale", [])]
    settings += [(f"DiSA 25 -> {n}", [f"sample.disa_min_steps={n}"]) for n in args.min_steps]
    settings += [("Heun, 13 steps", ["sample.solver=heun", "sample.num_steps=13"])]
    workdir = tempfile.mkdtemp()  # a copy: each setting adds a report under samples/
    shutil.copytree(args.workdir, workdir, dirs_exist_ok=True)
    for name, overrides in settings:
        cfg = override(exp.DIGITS, ["samples_per_class=40", "eval_samples_per_class=100",
                                    *overrides])
        summary = exp.run(cfg, workdir, progress=False)
        print(f"{name:24s} NFE {summary['sample/nfe']:3d} | 400 images "
              f"{summary['sample/seconds']:.2f} s | FID-digits {summary['eval/fid_digits']:.1f}"
              f" | class accuracy {summary['eval/class_accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
