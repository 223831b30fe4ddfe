"""Sampling speed of FlowAR-S (5 scales, 25 flow steps, CFG 4.3 with guidance interval 0.9,
KL-16 decode included) vs the official PyTorch FlowAR, same weights, same process, against
the floor.

    python -m benchmarks.flowar_sampling [--official /path/to/FlowAR] [--batches 1 8]
        [--size S] [--disa 15] [--scan] [--rounds 3] [--compete] [--torch-threads N]
        [--xla-ops]

`--official` points at a checkout of OliverRen/FlowAR (not part of arjax; needs
`pip install --no-deps timm einops`, see benchmarks/official_flowar.py); its `sample_tokens` +
`vae.decode` run with the same settings and weights (its ODE runs in float64, as released).
`--disa N` also times arjax with DiSA (flow steps annealed from 25 to N over the scales),
`--scan` with `scan_layers` on (each stack one `lax.scan`, cached decode included),
`--xla-ops` with arjax's CPU kernels off (`arjax.nn.cpu_attention`). The
runs are interleaved (`benchmarks.harness`); arjax's compilation (ahead of time) is timed apart.
Floors: per scale the trunk reads its weights once and does 2 FLOPs per weight per new token
row, every flow step the head does the same over the scale's tokens (CFG doubles the rows
throughout, an upper bound outside the guidance interval); the decoder's FLOPs are XLA's
count of the compiled KL-16 decoder.

Disclosed: arjax computes the flow head's z-only terms (`cond_embed` and each block's
conditioning, `FlowHead.context`) once per scale; the official head recomputes them at every
ODE step. The result is the same; the work is less.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import bind, split
from arjax.models.flowar import FlowAR, flowar_config
from arjax.sampling import flowar as flowar_sampling
from arjax.tokenizers.kl import KL_16, KLVAE
from benchmarks import harness
from benchmarks.flowar_parity import with_unit_norms
from benchmarks.var_parity import random_params

SAMPLE = {"S": flowar_sampling.FlowSampleConfig(num_steps=25, cfg=4.3, guidance=0.9),
          "L": flowar_sampling.FlowSampleConfig(num_steps=25, cfg=2.4, guidance=0.9),
          "H": flowar_sampling.FlowSampleConfig(num_steps=50, cfg=2.4, guidance=0.7)}


def head_calls(sample_cfg) -> int:
    """Flow-head evaluations per image over FlowAR's 5 scales (Euler: one per step)."""
    return sum(len(g) - 1 for g in sample_cfg.grids(5))


def workload(cfg, params, sample_cfg, batch: int) -> tuple[float, float]:
    """(bytes, FLOPs) of the trunk and the flow head over the scales (see the docstring)."""
    rows = 2 * batch
    head = harness.matmul_weights(params["flownet"])
    trunk = harness.matmul_weights(params) - head
    steps = [len(g) - 1 for g in sample_cfg.grids(len(cfg.scales))]
    bytes_read = 4 * (trunk * len(cfg.scales) + head * sum(steps))
    flops = sum(2 * rows * s * s * (trunk + head * n) for s, n in zip(cfg.scales, steps))
    return bytes_read, flops


def arjax_sample_run(model, vae, sample_cfg, batch: int, kernels: bool = True):
    """(sampling run, compile seconds); `kernels=False`: traced with arjax's CPU kernels off."""
    (graphdef, params), (vae_graphdef, vae_params) = model, vae
    labels = jnp.arange(batch, dtype=jnp.int32) * 97 % 1000
    with harness.kernels(kernels):
        return harness.compiled_sampler(
            lambda p, vp, k: flowar_sampling.sample(graphdef, p, vae_graphdef, vp, k, labels,
                                                    sample_cfg, KL_16.scale).images,
            params, vae_params)


def arjax_decode_run(vae, batch: int):
    """(decode run of random latents, the compiled decoder's FLOPs)."""
    vae_graphdef, vae_params = vae
    decode = jax.jit(lambda vp, z: bind(vae_graphdef, vp).decode(z, KL_16.scale))
    z = jax.random.normal(jax.random.key(0), (batch, 16, 16, 16))
    decode_flops = decode.lower(vae_params, z).compile().cost_analysis()["flops"]
    jax.block_until_ready(decode(vae_params, z))
    return lambda: jax.block_until_ready(decode(vae_params, z)), decode_flops


def official_runs(repo: str, size: str, model, vae, sample_cfg, batch: int):
    import torch

    from benchmarks.official_flowar import official_flowar, official_kl16

    flowar = official_flowar(repo, size, model[1], flowar_config(size))
    kl = official_kl16(repo, vae[1])
    labels = torch.arange(batch) * 97 % 1000
    z = torch.randn(batch, 16, 16, 16)

    def run():
        with torch.no_grad():
            return kl.decode(flowar.sample_tokens(
                num_steps=sample_cfg.num_steps, guidance=sample_cfg.guidance,
                cfg=sample_cfg.cfg, labels=labels) / KL_16.scale)

    def decode():
        with torch.no_grad():
            return kl.decode(z)
    run(), decode()  # warm-up
    return run, decode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", default=None, help="path to a FlowAR checkout")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", default="S", choices=["S", "L", "H"])
    parser.add_argument("--disa", type=int, default=0, help="DiSA: flow steps at the last scale")
    parser.add_argument("--scan", action="store_true",
                        help="also time arjax with scan_layers on (scanned blocks throughout)")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    harness.apply(args)
    cfg, sample_cfg = flowar_config(args.size, dropout=0.0), SAMPLE[args.size]
    model_fn = lambda: FlowAR(cfg, rngs=nnx.Rngs(0))
    vae_fn = lambda: KLVAE(KL_16, rngs=nnx.Rngs(0))
    model = (split(nnx.eval_shape(model_fn))[0],
             with_unit_norms(random_params(model_fn, 0, 0.02)))
    vae = (split(nnx.eval_shape(vae_fn))[0], with_unit_norms(random_params(vae_fn, 1, 0.02)))
    model = (model[0], jax.tree.map(jnp.asarray, model[1]))
    vae = (vae[0], jax.tree.map(jnp.asarray, vae[1]))
    print(f"FlowAR-{args.size}: {head_calls(sample_cfg)} flow-head calls per image "
          f"(steps per scale {[len(g) - 1 for g in sample_cfg.grids(5)]}); jax {jax.__version__}")
    machine = harness.calibrate(4 * harness.matmul_weights(model[1]))
    for batch in args.batches:
        run, compile_s = arjax_sample_run(model, vae, sample_cfg, batch)
        decode_run, decode_flops = arjax_decode_run(vae, batch)
        runs = {"arjax": run, "arjax decode": decode_run}
        if args.disa:
            disa_cfg = dataclasses.replace(sample_cfg, disa_min_steps=args.disa)
            runs["arjax DiSA"] = arjax_sample_run(model, vae, disa_cfg, batch)[0]
        if args.scan:
            scanned = split(nnx.eval_shape(
                lambda: FlowAR(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))))[0]
            runs["arjax scanned"], scan_compile_s = arjax_sample_run(
                (scanned, model[1]), vae, sample_cfg, batch)
        if args.xla_ops:
            runs["arjax, XLA ops"], xla_compile_s = arjax_sample_run(model, vae, sample_cfg,
                                                                     batch, kernels=False)
        if args.official:
            runs["official"], runs["official decode"] = official_runs(
                args.official, args.size, model, vae, sample_cfg, batch)
        with harness.compete(args.compete):
            times = harness.interleave(runs, args.rounds)
            busy = harness.load()
        decode_floor, _ = harness.floor(0, decode_flops, machine)
        floor_s, bound = harness.floor(*workload(cfg, model[1], sample_cfg, batch), machine)
        floor_s += decode_floor
        line = [f"FlowAR-{args.size} batch {batch}{harness.condition(args)}"
                f": floor {floor_s:.2f} s (trunk + head {bound}-bound, decode "
                f"{decode_floor:.2f} s compute)"]
        line += harness.columns(times, floor_s, f" (compile {compile_s:.1f} s)", decode_floor)
        if args.disa:
            line.append(f"DiSA {sample_cfg.num_steps}->{args.disa} "
                        f"{harness.spread(times['arjax DiSA'])}")
        if args.scan:
            line.append(harness.variant(times, "arjax scanned", scan_compile_s))
        if args.xla_ops:
            line.append(harness.variant(times, "arjax, XLA ops", xla_compile_s))
        print(" | ".join(line) + f" | load {busy}", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
