"""TTS-VAR against plain sampling and best-of-N on a short-trained digits VAR, at matched
compute: reward (classifier log-probability of the requested class), class accuracy and
FID-digits against transformer token passes and VAE decodes per final image.

    python -m benchmarks.tts_var_digits [--workdir runs/tts_var_digits] [--var-steps 150]
                                        [--per-class 20] [--plot docs/figures/tts_var.png]

The VAR is the digits preset of experiments.var_imagenet trained for only `--var-steps`
steps (so plain sampling leaves room: class accuracy well below 1), resumed from the work dir
if it exists. Best-of-N draws N candidates per label with plain sampling and keeps the best
reward; TTS-VAR runs the paper's schedule scaled to digits' 6 scales (clusters at scale 2,
resampling at 3 and 4, lambda 10). Every method uses the same reward function. Prints a table
and saves a PNG plot of accuracy and FID against token passes.
"""

from __future__ import annotations

import argparse
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = {4: (4, 4, 3, 2, 2, 1), 8: (8, 8, 6, 4, 2, 1)}


def load_models(workdir: str, var_steps: int):
    """Trains (or resumes) the short digits run; returns its VAR and VAE as (graphdef,
    weights) pairs and the config."""
    from flax import nnx

    from arjax import config as cfglib
    from arjax import sharding
    from arjax.data import open_source
    from arjax.data.cache import CodeStore
    from arjax.experiment.pipeline import stage_weights
    from arjax.models import bind, split
    from arjax.models.var import VAR
    from arjax.tokenizers.msvq import MultiScaleVQVAE
    from experiments import var_imagenet as exp

    cfg = cfglib.override(exp.DIGITS, [f"var_train.steps={var_steps}", "var_train.eval_every=0",
                                       "eval_samples_per_class=0"])
    exp.build(cfg, workdir, progress=True)  # trains or resumes; a finished run returns
    mesh = sharding.make_mesh(cfg.mesh)
    summary: dict = {}
    vae = stage_weights(cfg, "tokenizer",
                        lambda: MultiScaleVQVAE(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed)),
                        exp.tokenizer_loss, lambda: open_source(cfg.data, "train"), mesh,
                        workdir, False, None, summary)
    quantizer = split(bind(*vae).quantize)
    codes = lambda: CodeStore(glob.glob(os.path.join(workdir, "codes", "train-*"))[0])
    var = stage_weights(cfg, "var", lambda: VAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)),
                        exp.make_var_loss(quantizer), codes, mesh, workdir, False, None,
                        summary)
    return var, vae, cfg


def main(argv=None) -> None:
    from arjax.data.sources import digits
    from arjax.evaluate import evaluate_digits
    from arjax.images import to_uint8
    from arjax.metrics.digits import DigitsEvaluator
    from arjax.sampling import search
    from arjax.sampling import var as var_sampling

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/tts_var_digits")
    parser.add_argument("--var-steps", type=int, default=150)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--plot", default="docs/figures/tts_var_digits.png")
    args = parser.parse_args(argv)
    (graphdef, params), (vae_graphdef, vae_params), cfg = load_models(args.workdir,
                                                                     args.var_steps)
    evaluator = DigitsEvaluator.load()
    reward = evaluator.log_prob
    reference = digits("train", 32).images
    labels = np.repeat(np.arange(10, dtype=np.int32), args.per_class)
    sample_cfg = cfg.sample
    tokens = 2 * sum(p * p for p in cfg.model.patch_nums)  # one path, CFG doubled
    plain = jax.jit(lambda k, y: var_sampling.sample(graphdef, params, vae_graphdef,
                                                     vae_params, k, y, sample_cfg).images)
    rows = []

    def score(name, images, token_passes, decodes):
        images = to_uint8(np.asarray(images))
        m = evaluate_digits(images, labels, reference, evaluator)
        r = float(np.mean(reward(images, labels)))
        rows.append((name, token_passes, decodes, r, m["class_accuracy"], m["fid_digits"]))
        print(f"| {name} | {token_passes:.0f} | {decodes:.1f} | {r:.3f} | "
              f"{m['class_accuracy']:.3f} | {m['fid_digits']:.2f} |", flush=True)

    print(f"digits VAR after {args.var_steps} steps; {len(labels)} images per method; "
          f"load {os.getloadavg()}")
    print("| method | token passes / image | VAE decodes / image | reward (log p) | "
          "class accuracy | FID-digits |")
    print("|---|---|---|---|---|---|")
    score("plain", plain(jax.random.key(0), jnp.asarray(labels)), tokens, 1)
    for n in (2, 4, 8):
        draws = [np.asarray(plain(jax.random.key(100 + i), jnp.asarray(labels)))
                 for i in range(n)]
        r = np.stack([reward(to_uint8(d), labels) for d in draws])  # [n, images]
        best = np.stack(draws)[np.argmax(r, 0), np.arange(len(labels))]
        score(f"best-of-{n}", best, n * tokens, n)
    for c, schedule in SCHEDULES.items():
        scfg = search.SearchConfig(batch_schedule=schedule, cluster_scales=(2,),
                                   resample_scales=(3, 4))
        out, stats = search.search_sample(graphdef, params, vae_graphdef, vae_params,
                                          jax.random.key(7), labels, sample_cfg, scfg,
                                          reward, evaluator.spatial_features)
        score(f"TTS-VAR C={c}", out.images, stats["token_passes_per_image"],
              stats["vae_decodes_per_image"])
    print(f"load after {os.getloadavg()}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, col, name in ((axes[0], 4, "class accuracy"), (axes[1], 5, "FID-digits")):
            for prefix, marker in (("plain", "o"), ("best-of", "s"), ("TTS-VAR", "^")):
                pts = [(r[1], r[col]) for r in rows if r[0].startswith(prefix)]
                ax.plot(*zip(*pts), marker=marker, label=prefix)
            ax.set_xlabel("transformer token passes per image")
            ax.set_ylabel(name)
            ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(args.plot) or ".", exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
