"""Draft-model speculative sampling on the trained digits model: a sweep of the draft length K.

    python -m benchmarks.spec_decode --workdir runs/demo_llamagen [--draft-lens 1 2 4 6]

Uses (and if needed trains, resumably) the digits preset in `--workdir`: tokenizer, GPT and the
draft GPT. For K = 0 (plain sampling) and each K it samples the same 80 images (8 per class,
CFG 2.0) and 400 class-balanced images for the digits evaluator, and prints target forward
passes, mean accepted drafts per round, wall-clock for 80 images (compilation excluded) and
the quality figures. Speculative sampling is lossless, so quality may only move by sampling
noise.
"""

from __future__ import annotations

import argparse

from arjax.config import override
from experiments import llamagen_imagenet as exp


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/demo_llamagen")
    parser.add_argument("--draft-lens", type=int, nargs="+", default=[1, 2, 4, 6])
    args = parser.parse_args(argv)
    rows = []
    for k in [0, *args.draft_lens]:
        s = exp.run(override(exp.DIGITS, [f"draft_len={k}"]), args.workdir, progress=False)
        rows.append((k, s["sample/forward_passes"], s.get("sample/mean_accepted_per_round", 0),
                     s["sample/seconds"], s["eval/fid_digits"], s["eval/class_accuracy"]))
    base = rows[0]
    print("K | target passes | accepted/round | step compression | seconds (80 img) | "
          "speed-up | FID-digits | class acc")
    for k, passes, acc, sec, fid, cls in rows:
        print(f"{k} | {passes} | {acc:.2f} | {base[1] / passes:.2f}x | {sec:.3f} | "
              f"{base[3] / sec:.2f}x | {fid:.2f} | {cls:.3f}")


if __name__ == "__main__":
    main()
