"""Speculative and parallel decoding on the trained digits raster model: every method, a knob sweep.

    python -m benchmarks.spec_decode --workdir runs/demo_llamagen [--quick]

Uses the digits preset's checkpoints in `--workdir` (tokenizer, GPT and draft GPT: the
experiment's own `build`, which trains whatever is missing, resumably). For
plain sampling and each (method, knob) it prints: mean accepted drafts per round, step
compression (64 tokens / target calls, per row and for the batch), wall-clock per image at
batch 1 and per 80-image batch (compilation excluded, median of repeats) and the speed-up over
plain sampling in the same run, and quality of 400 class-balanced samples (FID-digits, class
accuracy; lossless methods may only move by sampling noise). Then it compares the measured
first-draft acceptance of SD / SpecTr with the optimal multi-draft bound along sampled
sequences, and writes `spec_decode.png` (quality and wall-clock vs step compression) and
`spec_decode.json` into the work dir.

    python -m benchmarks.spec_decode --window-cost B

times one cached target call by window length for an ImageNet-size GPT (random weights): what
decides whether step compression turns into wall-clock.

    python -m benchmarks.spec_decode --cache-runs B [--batches 1 8] [--repeats 3]

times SJD (K = 8, CFG 2) on GPT-B with random weights, its target's KV cache in one piece
(`sample.segments=1`) against the default runs (caches that grow with the rows), interleaved,
after checking that both sample the same tokens in the same rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax import sharding
from arjax.data.sources import open_source
from arjax.evaluate import evaluate_digits
from arjax.metrics.digits import DigitsEvaluator
from arjax.models import bind, split
from arjax.models.raster_ar import RasterAR, gpt_config
from arjax.sampling import multidraft, speculative
from arjax.sampling.common import SampleConfig, guided_logits
from arjax.sampling.speculative import SpeculativeConfig, token_probs
from benchmarks import harness
from experiments import llamagen_imagenet as exp

S = SpeculativeConfig


def sweep(quick: bool) -> list[tuple[str, str, SpeculativeConfig | None]]:
    """(method, knob label, config); None = plain sampling."""
    runs = [("plain", "-", None)]
    runs += [("sd", f"K={k}", S(draft_len=k)) for k in ((4,) if quick else (2, 4, 6))]
    runs += [("spectr", f"k={k}", S(draft_len=4, num_drafts=k)) for k in (2, 4)[: 1 + (not quick)]]
    runs += [("sjd", f"K={k}", S(drafter="jacobi", draft_len=k))
             for k in ((8,) if quick else (4, 8, 16))]
    if not quick:
        runs += [("sjd", f"K=8 init={i}", S(drafter="jacobi", draft_len=8, init=i))
                 for i in ("onehot", "up")]
    runs += [("gsd", f"K=8 d2<{d}", S(drafter="jacobi", accept="group", draft_len=8,
                                        group_dist=d))
             for d in ((1.0,) if quick else (0.5, 1.0, 4.0))]
    runs += [("lantern", f"K=4 delta={d}", S(accept="relaxed", draft_len=4, delta=d))
             for d in ((0.1,) if quick else (0.05, 0.1, 0.2))]
    return runs


def load(cfg, workdir: str):
    """(graphdef, params), (vq graphdef, params), draft (graphdef, params), training images:
    the experiment's own stages with a draft GPT, trained or resumed in `workdir`."""
    built = exp.build(with_spec(cfg, S(draft_len=4)), workdir)
    return built["model"], built["tokenizer"], built["draft"], open_source(cfg.data,
                                                                          "train").images


def with_spec(cfg, spec):
    """The experiment config sampling plainly (spec None) or with `spec`."""
    return dataclasses.replace(cfg, speculative=spec or SpeculativeConfig(draft_len=0))


def timed(generate, params, labels, repeats: int) -> float:
    generate(params, labels, jax.random.key(0))  # compile
    return float(np.median([generate(params, labels, jax.random.key(r + 1)).stats["seconds"]
                            for r in range(repeats)]))


def acceptance_vs_bound(gpt, draft, tokens, labels, scfg, draft_counts=(1, 2, 4)) -> dict:
    """Mean over the positions of sampled sequences of alpha*(n) (optimal n-draft acceptance),
    the K-SEQ acceptance at rho*, and 1 - TV (= SD's acceptance, n = 1)."""
    def probs(model_gd, params):
        model = bind(model_gd, params)
        y = jnp.concatenate([labels, jnp.full_like(labels, model.cfg.num_classes)])
        logits = model(jnp.concatenate([tokens, tokens]), y)
        return jax.vmap(lambda lg, t: token_probs(guided_logits(lg, scfg, t, 64), scfg),
                        in_axes=(1, 0), out_axes=1)(logits, jnp.arange(tokens.shape[1]))
    p, q = probs(*gpt), probs(*draft)
    out = {}
    for n in draft_counts:
        out[f"optimal_n{n}"] = float(jnp.mean(multidraft.optimal_acceptance(p, q, n)))
        out[f"kseq_n{n}"] = float(jnp.mean(multidraft.kseq_acceptance(p, q, n)))
    return out


def window_cost(gpt, lengths=(1, 2, 4, 8, 16), steps: int = 64) -> dict[int, float]:
    """Milliseconds per cached target call feeding L tokens (batch 1, doubled for CFG):
    speculative decoding only pays where a window costs about as much as one token."""
    graphdef, params = gpt

    def run(params, length):
        model = bind(graphdef, params)

        def body(i, cache):
            x = model.embed(jnp.zeros((2, length), jnp.int32), jnp.zeros((2,), jnp.int32), i)
            return model.decode(x, cache, i)[1]
        return jax.lax.fori_loop(0, steps, body, model.init_cache(2, steps + length))

    out = {}
    for length in lengths:
        fn = jax.jit(run, static_argnums=1)
        jax.block_until_ready(fn(params, length))
        t0 = time.perf_counter()
        for _ in range(5):
            jax.block_until_ready(fn(params, length))
        out[length] = (time.perf_counter() - t0) / 5 / steps * 1e3
    return out


def cache_runs(gpt, batches, rounds: int, draft_len: int = 8) -> None:
    """SJD with one whole-length cache against the default cache runs (see the docstring)."""
    graphdef, params = gpt
    runs = {"one cache": 1, f"{SampleConfig().segments} runs": SampleConfig().segments}
    spec = S(drafter="jacobi", draft_len=draft_len)
    print(f"SJD K={draft_len}, CFG 2, GPT with random weights; load {harness.load()}")
    print("| batch | target passes | " + " | ".join(f"{n} s" for n in runs)
          + " | one cache / runs | compile s |")
    for batch in batches:
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        fns, outs, compile_s = {}, {}, []
        for name, segments in runs.items():
            scfg = SampleConfig(cfg=2.0, segments=segments)
            args = (params, jax.random.key(batch), labels)
            fn, seconds = harness.compiled(
                lambda p, k, y, scfg=scfg: speculative.sample(graphdef, p, k, y, scfg, spec),
                *args)
            compile_s.append(f"{seconds:.0f}")
            outs[name] = jax.block_until_ready(fn(*args))
            fns[name] = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
        (a, a_stats), (b, b_stats) = outs.values()
        if not (np.array_equal(a, b) and int(a_stats.target_passes) == int(b_stats.target_passes)):
            raise SystemExit("error: the cache runs sampled other tokens than one cache")
        times = harness.interleave(fns, rounds)
        first, second = times.values()
        print(f"| {batch} | {int(a_stats.target_passes)} | "
              + " | ".join(harness.spread(t) for t in times.values())
              + f" | {harness.ratio(first, second)} | {' / '.join(compile_s)} |", flush=True)


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        x = [r["step_compression"] for r in pts]
        ax_q.plot(x, [r["fid_digits"] for r in pts], "o-", label=method)
        ax_t.plot(x, [r["speedup_b1"] for r in pts], "o-", label=method)
        for r in pts:
            ax_q.annotate(r["knob"], (r["step_compression"], r["fid_digits"]), fontsize=7)
    top = max(r["step_compression"] for r in rows) * 1.05
    ax_t.plot([1, top], [0.8, 0.8 * top], "k:", label="80% of step compression")
    ax_q.set(xlabel="step compression (tokens / target call)", ylabel="FID-digits (400 samples)",
             title="quality vs step compression")
    ax_t.set(xlabel="step compression", ylabel="wall-clock speed-up, batch 1",
             title="wall-clock vs step compression")
    for ax in (ax_q, ax_t):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="runs/demo_llamagen")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one knob value per method")
    parser.add_argument("--window-cost", metavar="SIZE",
                        help="only time target calls by window length for GPT-SIZE (B, L, ...; "
                             "random weights, 256 tokens) and exit")
    parser.add_argument("--cache-runs", metavar="SIZE",
                        help="only time SJD on GPT-SIZE with one KV cache against the default "
                             "cache runs (random weights) and exit")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args(argv)
    if args.cache_runs:
        gpt = split(RasterAR(gpt_config(args.cache_runs), rngs=nnx.Rngs(0)))
        cache_runs(gpt, args.batches, args.repeats)
        return
    if args.window_cost:
        gpt_cfg = gpt_config(args.window_cost)
        gpt = split(RasterAR(gpt_cfg, rngs=nnx.Rngs(0)))
        cost = window_cost(gpt, lengths=(1, 2, 4, 8, 16, 32), steps=32)
        print(f"GPT-{args.window_cost} target call by window length L (ms, batch 1 + CFG): "
              + ", ".join(f"L={k}: {v:.1f} ({v / cost[1]:.2f}x)" for k, v in cost.items()))
        return
    cfg = exp.DIGITS
    mesh = sharding.make_mesh(cfg.mesh)
    gpt, vq, draft, train_images = load(cfg, args.workdir)
    evaluator = DigitsEvaluator.load()
    eval_labels = np.repeat(np.arange(10, dtype=np.int32), 40)
    batch_labels = np.repeat(np.arange(10, dtype=np.int32), 8)
    rows = []
    print(f"device: {jax.devices()[0].device_kind}, {jax.device_count()} devices; "
          f"sample config {cfg.sample}")
    runs = sweep(args.quick)
    for i, (method, knob, spec) in enumerate(runs):
        generate = exp.make_sampler(gpt[0], *vq, mesh, with_spec(cfg, spec), draft)
        t_b1 = np.mean([timed(generate, gpt[1], np.array([c], np.int32), args.repeats)
                        for c in (1, 7)])
        t_b80 = timed(generate, gpt[1], batch_labels, args.repeats)
        generated = generate(gpt[1], eval_labels, jax.random.key(123))
        images, info = generated.images, generated.stats
        quality = evaluate_digits(images, eval_labels, train_images, evaluator)
        tokens_per_row = cfg.model.seq_len
        rows.append(dict(
            method=method, knob=knob, config=dataclasses.asdict(spec) if spec else None,
            accepted_per_round=info.get("mean_accepted_per_round", 0.0),
            first_draft_acceptance=info.get("first_draft_acceptance"),
            target_calls_batch400=info["target_passes"],
            step_compression=tokens_per_row / info.get("mean_rounds", tokens_per_row),
            batch_compression=tokens_per_row / info["target_passes"],
            seconds_b1=t_b1, seconds_b80=t_b80, fid_digits=quality["fid_digits"],
            class_accuracy=quality["class_accuracy"]))
        print(f"[{i + 1}/{len(runs)}] {method} {knob}: {rows[-1]['step_compression']:.2f}x "
              f"step compression, FID-digits {quality['fid_digits']:.2f}", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_b1"] = base["seconds_b1"] / r["seconds_b1"]
        r["speedup_b80"] = base["seconds_b80"] / r["seconds_b80"]
    print("\nmethod | knob | accepted/round | step compression (per row / batch of 400) | "
          "s/image b=1 | speed-up b=1 | s/80 images | speed-up b=80 | FID-digits | class acc")
    for r in rows:
        print(f"{r['method']} | {r['knob']} | {r['accepted_per_round']:.2f} | "
              f"{r['step_compression']:.2f}x / {r['batch_compression']:.2f}x | "
              f"{r['seconds_b1']:.3f} | {r['speedup_b1']:.2f}x | {r['seconds_b80']:.3f} | "
              f"{r['speedup_b80']:.2f}x | {r['fid_digits']:.2f} | {r['class_accuracy']:.3f}")

    generate = exp.make_sampler(gpt[0], *vq, mesh, with_spec(cfg, None))
    tokens = generate(gpt[1], eval_labels, jax.random.key(7)).aux["tokens"]
    bound = acceptance_vs_bound(gpt, draft, jnp.asarray(tokens), jnp.asarray(eval_labels),
                                cfg.sample)
    cost = window_cost(gpt)
    print("\ntarget call cost by window length L (ms, batch 1 + CFG): " + ", ".join(
        f"L={k}: {v:.3f} ({v / cost[1]:.1f}x)" for k, v in cost.items()))
    measured = {f"{r['method']} {r['knob']}": r["first_draft_acceptance"] for r in rows
                if r["method"] in ("sd", "spectr")}
    print("\nfirst-draft acceptance along plain samples: optimal alpha*(n) | K-SEQ at rho* "
          f"(n = 1 is SD) -> {json.dumps(bound)}")
    print(f"measured first-draft acceptance per round: {json.dumps(measured)}")
    plot(rows, f"{args.workdir}/spec_decode.png")
    with open(f"{args.workdir}/spec_decode.json", "w") as f:
        json.dump({"rows": rows, "bound": bound, "measured": measured, "window_ms": cost}, f,
                  indent=1)
    print(f"wrote {args.workdir}/spec_decode.png and spec_decode.json")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
