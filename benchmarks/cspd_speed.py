"""CSpD wall clock at ImageNet sizes: a random-weight MAR-`draft` drafting for a MAR-`target`.

    python -m benchmarks.cspd_speed [--target L] [--draft B] [--batches 1] [--num-iter 64]
                                    [--num-draft 4 8] [--rounds 2]

CSpD's target verifies every window in one pass and replaces each rejected token by a residual
draw (no roll-back), so its sequential passes and wall clock do not depend on the acceptance
rate: random weights measure the speed faithfully (their acceptance, printed, means nothing:
the two random models are unrelated; quality is `benchmarks.cspd_digits`'s). Token sampling
only (the KL-16 decode is the same for both and is the FlowAR benchmark's); the official
rule, CFG 2.9 linear, 100 diffusion steps; compile once per setting, then interleaved rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.models import split
from arjax.models.mar import MAR, mar_config
from arjax.sampling import mar as mar_sampling
from arjax.sampling import mar_speculative
from arjax.sampling.mar_speculative import CSpDConfig
from benchmarks import harness
from benchmarks.var_parity import random_params


def random_mar(size: str, seed: int):
    cfg = dataclasses.replace(mar_config(size), dropout=0.0)
    module_fn = lambda: MAR(cfg, rngs=nnx.Rngs(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if jax.tree_util.keystr(p).endswith("['scale']") else x,
        random_params(module_fn, seed, 0.02))
    return split(nnx.eval_shape(module_fn))[0], jax.tree.map(jnp.asarray, params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="L", choices=("B", "L", "H"))
    parser.add_argument("--draft", default="B", choices=("B", "L", "H"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--num-iter", type=int, default=64)
    parser.add_argument("--num-draft", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--ratio", type=float, default=0.15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    target, draft = random_mar(args.target, 0), random_mar(args.draft, 1)
    sample_cfg = mar_sampling.MARSampleConfig(num_iter=args.num_iter, cfg=2.9,
                                              cfg_schedule="linear", diffusion_steps=100)
    fns = {f"MAR-{args.target} alone": jax.jit(lambda t, d, key, labels: (
        mar_sampling.sample_latents(target[0], t, key, labels, sample_cfg)))}
    for n in args.num_draft:
        spec = CSpDConfig(enabled=True, num_draft=n, ratio=args.ratio, rule="official")
        fns[f"CSpD, {n} draft steps a window"] = jax.jit(
            lambda t, d, key, labels, spec=spec: mar_speculative.sample_latents(
                (target[0], t), (draft[0], d), key, labels, sample_cfg, spec))
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()}; "
          f"random MAR-{args.target} target, MAR-{args.draft} draft, {args.num_iter} steps, "
          f"ratio {args.ratio}, official rule, CFG 2.9 linear, 100 diffusion steps, float32")
    print("| batch | sampler | target passes | draft passes | acceptance | s (median) | spread | "
          "speed-up | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        labels = jnp.asarray(np.arange(batch) * 97 % 1000, jnp.int32)
        stats, compile_s, times = {}, {}, {name: [] for name in fns}
        runs = {}
        for name, fn in fns.items():
            runs[name], compile_s[name] = harness.compiled(fn, target[1], draft[1],
                                                           jax.random.key(0), labels)
            _, stats[name] = jax.block_until_ready(runs[name](target[1], draft[1],
                                                              jax.random.key(0), labels))
        for r in range(args.rounds):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(target[1], draft[1], jax.random.key(r + 1), labels))
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(next(iter(times.values())))
        for name, t in times.items():
            s = stats[name]
            drafts = int(s.get("draft_passes", 0))
            accept = f"{float(s['acceptance']):.3f}" if "acceptance" in s else "-"
            print(f"| {batch} | {name} | {int(s['target_passes'])} | {drafts} | {accept} | "
                  f"{statistics.median(t):.1f} | {min(t):.1f}-{max(t):.1f} | "
                  f"x{base / statistics.median(t):.2f} | {compile_s[name]:.0f} |", flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
