"""Padded work of the MAR and CSpD samplers' compiled runs, counted from the schedule (no
timing, no weights): each run compiles with shapes that fit its widest step or window, so it
does more matmul work than exact per-step shapes would. Printed per run count, over the
work of exact shapes, for equal-length runs (`np.array_split`) and for the boundaries the
samplers use (`sampling.mar.cheapest_runs`).

    python -m benchmarks.run_padding [--target L] [--draft B] [--num-iter 64]
                                     [--diffusion-steps 100] [--runs 1 2 4 8]

Plain MAR: a step at encoder cap c predicting w tokens costs token_cost x (c + chain_cost x w).
CSpD (default schedule): per window, its draft steps at the draft's costs plus one target pass
at the window's verified width; exact = every pass at its own shapes, as the official code.
"""

from __future__ import annotations

import argparse

import numpy as np

from arjax.models.mar import mar_config
from arjax.sampling.mar import chain_cost, mask_schedule, segments, token_cost
from arjax.sampling.mar_speculative import CSpDConfig, schedule, window_runs


def step_work(m, first, runs, costs) -> float:
    """Work of runs [(a, b)] of plain steps, each at its run's widest shapes."""
    length, (tc, cc) = int(m[0]), costs
    return sum((b - a) * tc * (max(1, length - int(m[b - 1]))
                               + cc * int(np.max(m[a:b] - first[a:b]))) for a, b in runs)


def window_work(m, first, parts, draft, target) -> float:
    """Work of runs of CSpD windows (each a [n, 2] array), at the run's widest shapes."""
    length, total = int(m[0]), 0.0
    for part in parts:
        steps = np.concatenate([np.arange(a, b + 1) for a, b in part])
        cap = max(1, length - int(m[part[-1, 1]]))
        width = int(np.max(m[steps] - first[steps]))
        verified = max(int(m[a] - first[b]) for a, b in part)
        total += (len(steps) * draft[0] * (cap + draft[1] * width)
                  + len(part) * target[0] * (cap + target[1] * verified))
    return total


def exact_window_work(m, first, windows, draft, target) -> float:
    """The same windows with every draft step and target pass at its own shapes (as the
    official code, which drops the unknown tokens at each pass)."""
    length, total = int(m[0]), 0.0
    for a, b in windows:
        total += sum(draft[0] * (max(1, length - int(m[s])) + draft[1] * int(m[s] - first[s]))
                     for s in range(a, b + 1))
        total += target[0] * (max(1, length - int(m[a])) + target[1] * int(m[a] - first[b]))
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="L", choices=("B", "L", "H"))
    parser.add_argument("--draft", default="B", choices=("B", "L", "H"))
    parser.add_argument("--num-iter", type=int, default=64)
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args(argv)
    draft, target = ((token_cost(cfg), chain_cost(cfg, args.diffusion_steps))
                     for cfg in (mar_config(args.draft), mar_config(args.target)))
    length = mar_config(args.target).seq_len
    m, first = mask_schedule(length, args.num_iter)
    steps = np.arange(args.num_iter)
    exact = step_work(m, first, [(s, s + 1) for s in steps], draft)
    _, windows = schedule(args.num_iter, CSpDConfig())
    exact_w = exact_window_work(m, first, windows, draft, target)
    print(f"{length} tokens, {args.num_iter} steps, {args.diffusion_steps} diffusion steps; "
          f"plain MAR-{args.draft}; CSpD MAR-{args.draft} draft / MAR-{args.target} target, "
          f"{len(windows)} windows; padded work / exact")
    print("| runs | MAR steps, equal | MAR steps, cheapest | CSpD windows, equal "
          "| CSpD windows, cheapest |")
    print("|---|---|---|---|---|")
    for count in args.runs:
        equal = [(int(p[0]), int(p[-1]) + 1) for p in np.array_split(steps, count)]
        cheapest = [(a, b) for a, b, _, _ in segments(m, first, count, draft[1])]
        parts = np.array_split(windows, min(count, len(windows)))
        chosen = [part for part, _ in window_runs(m, first, windows, count, draft, target)]
        print(f"| {count} | {step_work(m, first, equal, draft) / exact:.3f} "
              f"| {step_work(m, first, cheapest, draft) / exact:.3f} "
              f"| {window_work(m, first, parts, draft, target) / exact_w:.3f} "
              f"| {window_work(m, first, chosen, draft, target) / exact_w:.3f} |")


if __name__ == "__main__":
    main()
