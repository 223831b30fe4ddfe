"""CoDe speed-up over the large VAR alone, per number of drafted scales N, with and without
the VAE decode (random weights: speed does not depend on them).

    python -m benchmarks.code_speed [--large 30] [--small 16] [--steps 6 7 8 9]
                                    [--batches 1 8] [--rounds 3]

For every batch size the samplers (the large VAR alone, and CoDe for each N) are compiled
once, then timed interleaved: each round runs every sampler once in turn, images decoded
("with decode") and only the codes returned ("codes only": the decoder is dead code XLA drops).
The table gives the median and spread over rounds, the load average, and the speed-up of each
CoDe setting over the large model alone. CoDe's paper: 1.7x at N=8, 2.9x at N=6 (RTX 4090,
decode excluded). `--large 4 --small 2` runs the same on tiny widths in seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import split
from arjax.models.var import VAR, var_config
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import VAR_VAE, MultiScaleVQVAE

SAMPLE = var_sampling.VARSampleConfig(cfg=2.5, top_k=600, top_p=0.96,
                                      temperature=(1.1,) * 7 + (1.0,) * 3,
                                      temperature_after_filter=True)  # CoDe's FID protocol


def build(depth: int, seed: int):
    module_fn = lambda: VAR(var_config(depth), rngs=nnx.Rngs(seed))
    return split(nnx.eval_shape(module_fn))[0], jax.jit(lambda: split(module_fn())[1])()


def samplers(large, small, vae, steps):
    """name -> jitted (key, labels, decode) sampler."""
    out = {}
    for n in (0, *steps):
        for decode in (True, False):
            def fn(key, labels, n=n, decode=decode):
                if n == 0:
                    s = var_sampling.sample(*large, *vae, key, labels, SAMPLE)
                else:
                    s = var_sampling.sample_collaborative(large, small, *vae, key, labels,
                                                          SAMPLE, n)
                return s.images if decode else s.aux["codes"]
            out[(n, decode)] = jax.jit(fn)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=30)
    parser.add_argument("--small", type=int, default=16)
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 7, 8, 9])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    large, small = build(args.large, 0), build(args.small, 1)
    vae = (split(nnx.eval_shape(lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(2))))[0],
           jax.jit(lambda: split(MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(2)))[1])())
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, load {os.getloadavg()}; "
          f"VAR-d{args.large} drafter, VAR-d{args.small} refiner")
    print("| batch | sampler | decode | s (median) | spread | speed-up vs large alone |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        fns = samplers(large, small, vae, args.steps)
        for fn in fns.values():  # compile
            jax.block_until_ready(fn(jax.random.key(0), labels))
        times = {k: [] for k in fns}
        for r in range(args.rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(jax.random.key(r + 1), labels))
                times[k].append(time.perf_counter() - t0)
        for (n, decode), values in times.items():
            med, base = statistics.median(values), statistics.median(times[(0, decode)])
            name = f"d{args.large} alone" if n == 0 else f"CoDe N={n}"
            print(f"| {batch} | {name} | {'with' if decode else 'codes only'} | {med:.2f} | "
                  f"{min(values):.2f}-{max(values):.2f} | x{base / med:.2f} |")
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
