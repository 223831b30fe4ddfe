"""CoDe speed-up over the large VAR alone, per number of drafted scales N, with and without
the VAE decode (random weights: speed does not depend on them).

    python -m benchmarks.code_speed [--large 30] [--small 16] [--steps 6 7 8 9]
                                    [--batches 1 8] [--rounds 3] [--dtype bfloat16]

For every batch size the samplers (the large VAR alone, and CoDe for each N) return only the
codes (the decoder is dead code XLA drops) and one more function decodes codes to images (the
same work whichever sampler drew them); each is compiled once, then timed interleaved: each
round runs every sampler and the decoder once in turn. "with decode" adds the decoder's median
to the sampler's. The table gives the median and spread over rounds, the load average, and
the speed-up of each CoDe setting over the large model alone. CoDe's paper: 1.7x at N=8, 2.9x
at N=6 (RTX 4090, decode excluded). `--large 4 --small 2` runs the same on tiny widths in
seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import bind, split
from arjax.models.var import VAR, var_config
from arjax.nn.scales import scale_bounds
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import VAR_VAE, MultiScaleVQVAE

SAMPLE = var_sampling.VARSampleConfig(cfg=2.5, top_k=600, top_p=0.96,
                                      temperature=(1.1,) * 7 + (1.0,) * 3,
                                      temperature_after_filter=True)  # CoDe's FID protocol


def build(depth: int, seed: int, dtype: str):
    module_fn = lambda: VAR(dataclasses.replace(var_config(depth), dtype=dtype),
                            rngs=nnx.Rngs(seed))
    return split(nnx.eval_shape(module_fn))[0], jax.jit(lambda: split(module_fn())[1])()


def samplers(large, small, vae, steps):
    """N -> jitted (weights, key, labels) -> codes (N = 0: the large model alone), and the
    decoder (vae weights, codes) -> images. Weights are jit arguments, never constants."""
    out = {}
    for n in (0, *steps):
        def fn(weights, key, labels, n=n):
            (lp, sp, vp) = weights
            if n == 0:
                return var_sampling.sample(large[0], lp, vae[0], vp, key, labels,
                                           SAMPLE).aux["codes"]
            return var_sampling.sample_collaborative((large[0], lp), (small[0], sp), vae[0], vp,
                                                     key, labels, SAMPLE, n).aux["codes"]
        out[n] = jax.jit(fn)
    bounds = scale_bounds(VAR_VAE.patch_nums)
    decode = jax.jit(lambda vp, codes: bind(vae[0], vp).decode(
        [codes[:, b:e] for b, e in bounds]))
    return out, decode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=30)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 7, 8, 9])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    large, small = build(args.large, 0, args.dtype), build(args.small, 1, args.dtype)
    vae = (split(nnx.eval_shape(lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(2))))[0],
           jax.jit(lambda: split(MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(2)))[1])())
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()}; "
          f"VAR-d{args.large} drafter, VAR-d{args.small} refiner, {args.dtype}")
    print("| batch | sampler | s codes only (median) | spread | s with decode | speed-up codes "
          "only | speed-up with decode | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        fns, decode = samplers(large, small, vae, args.steps)
        weights = (large[1], small[1], vae[1])
        compile_s = {}
        for n, fn in fns.items():
            t0 = time.perf_counter()
            codes = jax.block_until_ready(fn(weights, jax.random.key(0), labels))
            compile_s[n] = time.perf_counter() - t0
        jax.block_until_ready(decode(vae[1], codes))
        times, decode_times = {n: [] for n in fns}, []
        for r in range(args.rounds):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                codes = jax.block_until_ready(fn(weights, jax.random.key(r + 1), labels))
                times[n].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(decode(vae[1], codes))
            decode_times.append(time.perf_counter() - t0)
        dec = statistics.median(decode_times)
        base = statistics.median(times[0])
        for n, values in times.items():
            med = statistics.median(values)
            name = f"d{args.large} alone" if n == 0 else f"CoDe N={n}"
            print(f"| {batch} | {name} | {med:.2f} | {min(values):.2f}-{max(values):.2f} | "
                  f"{med + dec:.2f} | x{base / med:.2f} | x{(base + dec) / (med + dec):.2f} | "
                  f"{compile_s[n]:.0f} |", flush=True)
        print(f"| {batch} | VAE decode alone | {dec:.2f} | {min(decode_times):.2f}-"
              f"{max(decode_times):.2f} | | | | |", flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
