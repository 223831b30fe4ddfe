"""Test-time search on digits against plain sampling and best-of-N at matched compute, for
VAR (TTS-VAR) and FlowAR (the same search over its scales): reward (the digits classifier's
log-probability of the requested class), class accuracy and FID-digits against transformer
token passes and VAE decodes per final image.

    python -m benchmarks.tts_digits --family var [--steps 150] [--per-class 20]
    python -m benchmarks.tts_digits --family flowar [--steps 200]

The model is the family's digits preset trained for only `--steps` steps (so plain sampling
leaves room: class accuracy well below 1), resumed from `runs/tts_<family>_digits` if it
exists. Every method is the experiment's own search sampler (`search.enabled`) with another
schedule, so every cost is counted by the same code: plain = one candidate per image;
best-of-N = N candidates to the last scale, the best reward kept; TTS = the paper's schedule
scaled to the family's scales (clusters on the classifier's spatial features at a coarse
scale, resampling with potentials exp(10 R) at finer ones). Prints a table and saves a PNG plot
of accuracy and FID against token passes.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

FLAT = {"cluster_scales": (), "resample_scales": ()}
TTS = {"var": {4: ((4, 4, 3, 2, 2, 1), (2,), (3, 4)), 8: ((8, 8, 6, 4, 2, 1), (2,), (3, 4))},
       "flowar": {4: ((4, 3, 2, 1), (1,), (2,)), 8: ((8, 6, 4, 1), (1,), (2,))}}


def methods(family: str, scales: int) -> list[tuple[str, dict]]:
    """(name, search overrides) for plain, best-of-N and TTS at two widths."""
    out = [("plain", {"batch_schedule": (1,) * scales, **FLAT})]
    out += [(f"best-of-{n}", {"batch_schedule": (n,) * (scales - 1) + (1,), **FLAT})
            for n in (2, 4, 8)]
    out += [(f"TTS C={c}", {"batch_schedule": s, "cluster_scales": cl, "resample_scales": rs})
            for c, (s, cl, rs) in TTS[family].items()]
    return out


def main(argv=None) -> None:
    import dataclasses

    from arjax import config as cfglib
    from arjax.data.sources import digits
    from arjax.evaluate import evaluate_digits
    from arjax.metrics.digits import DigitsEvaluator
    from experiments import flowar_imagenet, var_imagenet

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("var", "flowar"), default="var")
    parser.add_argument("--steps", type=int, default=0, help="0: 150 (VAR) / 200 (FlowAR)")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args(argv)
    exp = {"var": var_imagenet, "flowar": flowar_imagenet}[args.family]
    stage = {"var": "var_train", "flowar": "flowar_train"}[args.family]
    steps = args.steps or {"var": 150, "flowar": 200}[args.family]
    workdir = args.workdir or f"runs/tts_{args.family}_digits"
    plot = args.plot or f"docs/figures/tts_{args.family}_digits.png"
    base = cfglib.override(exp.DIGITS, [f"{stage}.steps={steps}", f"{stage}.eval_every=0",
                                        "eval_samples_per_class=0"])
    if args.family == "flowar":  # the cosine schedule ends with the short run
        base = cfglib.override(base, [f"{stage}.optim.total_steps={steps}"])
    scales = len(exp.DIGITS.search.batch_schedule)
    evaluator = DigitsEvaluator.load()
    reference = digits("train", 32).images
    labels = np.repeat(np.arange(10, dtype=np.int32), args.per_class)
    rows = []
    print(f"digits {args.family} after {steps} steps; {len(labels)} images per method; "
          f"load {os.getloadavg()}")
    print("| method | token passes / image | head token passes / image | VAE decodes / image "
          "| reward (log p) | class accuracy | FID-digits | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides in methods(args.family, scales):
        cfg = dataclasses.replace(base, search=dataclasses.replace(
            base.search, enabled=True, **overrides))
        built = exp.build(cfg, workdir, progress=False)  # trains once, then resumes
        out = built["generate"](built["params"], labels, jax.random.key(7))
        m = evaluate_digits(out.images, labels, reference, evaluator)
        reward = float(np.mean(evaluator.log_prob(out.images, labels)))
        s = out.stats
        head = s.get("head_token_passes_per_image", 0.0)
        rows.append((name, s["token_passes_per_image"] + head, m["class_accuracy"],
                     m["fid_digits"]))
        print(f"| {name} | {s['token_passes_per_image']:.0f} | {head:.0f} | "
              f"{s['vae_decodes_per_image']:.1f} | {reward:.3f} | {m['class_accuracy']:.3f} | "
              f"{m['fid_digits']:.2f} | {s['seconds']:.1f} |", flush=True)
    print(f"load after {os.getloadavg()}")
    save_plot(rows, plot, args.family)
    print(f"plot: {plot}")


def save_plot(rows, path: str, family: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, col, name in ((axes[0], 2, "class accuracy"), (axes[1], 3, "FID-digits")):
        for prefix, marker in (("plain", "o"), ("best-of", "s"), ("TTS", "^")):
            pts = [(r[1], r[col]) for r in rows if r[0].startswith(prefix)]
            ax.plot(*zip(*pts), marker=marker, label=prefix)
        ax.set_xscale("log")
        ax.set_xlabel("transformer token passes per image" + (" (trunk + head)"
                                                              if family == "flowar" else ""))
        ax.set_ylabel(name)
        ax.legend()
    fig.suptitle(f"{family} on digits: test-time search vs best-of-N")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
