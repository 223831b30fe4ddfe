"""Sampling speed of FlowAR-S (random weights, 5 scales, 25 flow steps, CFG 4.3 with guidance
interval 0.9, KL-16 decode included) vs the official PyTorch FlowAR, same machine, same
process, same weights.

    python -m benchmarks.flowar_sampling [--official /path/to/FlowAR] [--batches 1 8]
                                          [--size S] [--disa 15]

`--official` points at a checkout of OliverRen/FlowAR (not part of arjax; needs
`pip install --no-deps timm einops`, see benchmarks/official_flowar.py); its `sample_tokens` +
`vae.decode` are timed in fp32 with the same settings (its ODE runs in float64, as released).
`--disa N` also times arjax with DiSA (flow steps annealed from 25 to N over the scales).
arjax compiles once per batch size (reported separately); timings are medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import split
from arjax.models.flowar import FlowAR, flowar_config
from arjax.sampling import flowar as flowar_sampling
from arjax.tokenizers.kl import KL_16, KLVAE
from benchmarks.flowar_parity import with_unit_norms
from benchmarks.harness import median_s as median_time
from benchmarks.var_parity import random_params

SAMPLE = {"S": flowar_sampling.FlowSampleConfig(num_steps=25, cfg=4.3, guidance=0.9),
          "L": flowar_sampling.FlowSampleConfig(num_steps=25, cfg=2.4, guidance=0.9),
          "H": flowar_sampling.FlowSampleConfig(num_steps=50, cfg=2.4, guidance=0.7)}


def head_calls(sample_cfg) -> int:
    """Flow-head evaluations per image over FlowAR's 5 scales (Euler: one per step)."""
    return sum(len(g) - 1 for g in sample_cfg.grids(5))


def time_arjax(model, vae, sample_cfg, batch: int, repeats: int) -> tuple[float, float]:
    (graphdef, params), (vae_graphdef, vae_params) = model, vae
    fn = jax.jit(lambda p, vp, k, y: flowar_sampling.sample(
        graphdef, p, vae_graphdef, vp, k, y, sample_cfg, KL_16.scale).images)
    labels = jnp.arange(batch, dtype=jnp.int32) * 97 % 1000
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, vae_params, jax.random.key(0), labels))
    first = time.perf_counter() - t0
    run = lambda: jax.block_until_ready(fn(params, vae_params, jax.random.key(1), labels))
    return median_time(run, repeats), first


def time_official(repo: str, size: str, model, vae, sample_cfg, batch: int, repeats: int
                  ) -> tuple[float, float]:
    import torch

    from benchmarks.official_flowar import official_flowar, official_kl16

    flowar = official_flowar(repo, size, model[1], flowar_config(size))
    kl = official_kl16(repo, vae[1])
    labels = torch.arange(batch) * 97 % 1000
    run = lambda: kl.decode(flowar.sample_tokens(
        num_steps=sample_cfg.num_steps, guidance=sample_cfg.guidance, cfg=sample_cfg.cfg,
        labels=labels) / KL_16.scale)
    z = torch.randn(batch, 16, 16, 16)
    with torch.no_grad():
        run()  # warm-up
        return median_time(run, repeats), median_time(lambda: kl.decode(z), repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", default=None, help="path to a FlowAR checkout")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", default="S", choices=["S", "L", "H"])
    parser.add_argument("--disa", type=int, default=0, help="DiSA: flow steps at the last scale")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    cfg, sample_cfg = flowar_config(args.size, dropout=0.0), SAMPLE[args.size]
    model_fn = lambda: FlowAR(cfg, rngs=nnx.Rngs(0))
    vae_fn = lambda: KLVAE(KL_16, rngs=nnx.Rngs(0))
    model = (split(nnx.eval_shape(model_fn))[0],
             with_unit_norms(random_params(model_fn, 0, 0.02)))
    vae = (split(nnx.eval_shape(vae_fn))[0], with_unit_norms(random_params(vae_fn, 1, 0.02)))
    model = (model[0], jax.tree.map(jnp.asarray, model[1]))
    vae = (vae[0], jax.tree.map(jnp.asarray, vae[1]))
    print(f"FlowAR-{args.size}: {head_calls(sample_cfg)} flow-head calls per image "
          f"(steps per scale {[len(g) - 1 for g in sample_cfg.grids(5)]})")
    for batch in args.batches:
        ours, compile_s = time_arjax(model, vae, sample_cfg, batch, args.repeats)
        line = (f"FlowAR-{args.size} batch {batch}: arjax {ours:.2f} s ({batch / ours:.3f} "
                f"images/s; first call {compile_s:.1f} s)")
        if args.disa:
            disa_cfg = dataclasses.replace(sample_cfg, disa_min_steps=args.disa)
            disa, _ = time_arjax(model, vae, disa_cfg, batch, args.repeats)
            line += (f", DiSA {sample_cfg.num_steps}->{args.disa} ({head_calls(disa_cfg)} "
                     f"calls) {disa:.2f} s = x{ours / disa:.2f}")
        if args.official:
            theirs, decode = time_official(args.official, args.size, model, vae, sample_cfg,
                                           batch, args.repeats)
            line += (f" | official {theirs:.2f} s ({batch / theirs:.3f} images/s), of which "
                     f"KL-16 decode {decode:.2f} s | speed-up x{theirs / ours:.2f}")
        print(line, flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
