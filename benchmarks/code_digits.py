"""CoDe on digits: quality and time against the number of drafted scales N, for a
training-free pair (the large and a small VAR, each trained on every scale) and a fine-tuned
pair (the large as drafter, a refiner distilled from it on scales N.. for each N).

    python -m benchmarks.code_digits [--workdir runs/code_digits] [--per-class 40]

The large model is the digits preset of experiments.var_imagenet (600 steps); the small one is
the preset's refiner architecture (2 blocks, width 48) trained the same way on all scales;
the fine-tuned refiners are the experiment's refiner stage (`draft_steps=N`, KL to the large
model at T=1). Every run shares the large run's tokenizer and code cache (its work dir is
copied before the later stages train), so all pairs decode with one VQ-VAE. Class accuracy
and FID-digits of 10 x `per-class` images per setting; seconds per batch of 10 x `per-class`
(with decode), median and spread over 3 interleaved rounds after compilation.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics

import jax


def trained(exp, base, workdir: str, sets: list[str], seed_from: str | None = None) -> dict:
    """exp.build with `sets`, its work dir first seeded with `seed_from`'s tokenizer, codes and
    (when asked) model stages so only the new stage trains."""
    from arjax import config as cfglib

    if seed_from and not os.path.exists(workdir):
        shutil.copytree(seed_from, workdir, ignore=shutil.ignore_patterns("samples"))
    return exp.build(cfglib.override(base, sets), workdir, progress=False)


def main(argv=None) -> None:
    from arjax import sharding
    from benchmarks.digits_evaluator import score_and_time
    from experiments import var_imagenet as exp

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/code_digits")
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args(argv)
    base = exp.DIGITS
    quiet = ["var_train.eval_every=0", "eval_samples_per_class=0"]
    large_dir = os.path.join(args.workdir, "large")
    large = trained(exp, base, large_dir, quiet)
    small_dir = os.path.join(args.workdir, "small")
    if not os.path.exists(small_dir):  # the tokenizer and codes only: the VAR trains anew
        shutil.copytree(large_dir, small_dir, ignore=shutil.ignore_patterns("samples", "var"))
    r = base.refiner
    small = trained(exp, base, small_dir, quiet + [
        f"model.depth={r.depth}", f"model.width={r.width}", f"model.heads={r.heads}"])
    mesh = sharding.make_mesh(base.mesh)
    vae = large["vae"]
    gens = {"large alone": (large["generate"], large["params"]),
            "small alone": (small["generate"], small["params"])}
    for n in args.steps:
        free = exp.make_sampler(*large["model"][:1], *vae, mesh, base.sample, n, small["model"])
        gens[f"N={n} training-free"] = (free, large["params"])
        tuned = trained(exp, base, os.path.join(args.workdir, f"refiner_{n}"),
                        quiet + [f"draft_steps={n}"], seed_from=large_dir)
        gens[f"N={n} fine-tuned"] = (tuned["generate"], tuned["params"])
    scores, times = score_and_time(gens, args.per_class)
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()}; "
          f"{10 * args.per_class} images per setting")
    print("| sampler | large-model scales | class accuracy | FID-digits | s / batch (median) "
          "| spread | speed-up vs large |")
    print("|---|---|---|---|---|---|---|")
    base_t = statistics.median(times["large alone"])
    for name, m in scores.items():
        t = times[name]
        drafted = name.split()[0][2:] if name.startswith("N=") else (
            "all" if name == "large alone" else "0")
        print(f"| {name} | {drafted} | {m['class_accuracy']:.3f} | {m['fid_digits']:.2f} | "
              f"{statistics.median(t):.3f} | {min(t):.3f}-{max(t):.3f} | "
              f"x{base_t / statistics.median(t):.2f} |")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
