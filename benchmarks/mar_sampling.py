"""MAR sampling speed against the official PyTorch MAR: same machine, same process, same
weights, same orders and noise (random weights: speed does not depend on them).

    python -m benchmarks.mar_sampling --official /path/to/mar [--size B] [--batches 1 8]
                                      [--num-iter 64] [--diffusion-steps 100] [--rounds 3]
                                      [--segments N]

Times the token sampling (`sample_tokens`: the masked steps and every token's diffusion chain;
the KL-16 decode is the FlowAR benchmark's) with CFG 2.9 linear, temperature 1. arjax compiles
once per batch size (reported); then each round runs arjax and the official code in turn
(interleaved), and the table gives the median and spread over rounds, the load average, and the
largest relative difference of the two samples (the official `torch.randn` is fed arjax's
per-position noise, as in `benchmarks.mar_parity`). Floor (`benchmarks.harness`): per MAR step
the encoder does 2 FLOPs per weight per known token + buffer row, the decoder per token +
buffer row (CFG doubles the rows), each chain computes its AdaLN modulations once (2 FLOPs per
modulation weight per token row and step), and each diffusion step streams the rest of the MLP
head's weights over the step's predicted tokens; each phase takes the larger of its memory and
compute time. Disclosed: that hoisting is arjax's (the official head recomputes the
modulations at every step); it is part of the ratio.
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
from arjax.sampling.mar import MARSampleConfig, mask_schedule, sample_latents
from benchmarks import harness
from benchmarks.mar_parity import TINY, feed_randn, official_draws, official_mar
from benchmarks.var_parity import random_params


def trunk_weights(params) -> tuple[int, int]:
    """(encoder, decoder) matmul weights per token (`harness.matmul_weights`; the decoder side
    is everything outside the encoder and the diffusion head)."""
    enc = sum(harness.matmul_weights(v) for k, v in params.items() if k.startswith("encoder"))
    return enc, harness.matmul_weights(params) - harness.matmul_weights(params["diffloss"]) - enc


def floor(cfg, params, sample_cfg: MARSampleConfig, batch: int, machine) -> float:
    """Seconds: the trunk's and the diffusion head's phases, each at its binding limit."""
    rows = 2 * batch
    head = harness.matmul_weights(params["diffloss"])
    # per chain: cond_embed (z only) and the AdaLN modulations (t and z only) in one matmul;
    # per diffusion step: the rest of the head, streamed for the step's few rows
    hoisted = head - harness.matmul_weights(params["diffloss"], skip=("cond_embed",
                                                                      "time_embed"))
    mods = head - harness.matmul_weights(params["diffloss"], skip=("adaLN_modulation",))
    per_step = head - hoisted - mods
    enc, dec = trunk_weights(params)
    m, first = mask_schedule(cfg.seq_len, sample_cfg.num_iter)
    total = 0.0
    for s in range(sample_cfg.num_iter):
        known, new = cfg.seq_len - int(m[s]), int(m[s] - first[s])
        pad = cfg.buffer_size
        trunk_flops = 2 * rows * (enc * (pad + known) + dec * (pad + cfg.seq_len))
        total += harness.floor(4 * (enc + dec), trunk_flops, machine)[0]
        steps = sample_cfg.diffusion_steps
        total += steps * harness.floor(4 * per_step, 2 * rows * new * per_step, machine)[0]
        total += harness.floor(4 * (hoisted + mods), 2 * rows * new * steps * mods, machine)[0]
    return total


def random_models(official_path: str, size: str, diffusion_steps: int):
    """(config, graphdef, random weights as device arrays, the official MAR holding the same
    weights): std 0.02, LayerNorm scales about 1; speed does not depend on them."""
    cfg = TINY if size == "tiny" else dataclasses.replace(mar_config(size), dropout=0.0)
    module_fn = lambda: MAR(cfg, rngs=nnx.Rngs(0))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 1.0 if jax.tree_util.keystr(p).endswith("['scale']") else x,
        random_params(module_fn, 0, 0.02))
    official = official_mar(official_path, cfg, params, diffusion_steps)
    return cfg, split(nnx.eval_shape(module_fn))[0], jax.tree.map(jnp.asarray, params), official


def time_batch(official, fn, params, cfg, sample_cfg: MARSampleConfig, batch: int,
               rounds: int, rng, machine) -> str:
    """One table row: arjax (compiled first) and the official sampler timed in turn."""
    import torch

    length, c, steps = cfg.seq_len, cfg.token_dim, sample_cfg.diffusion_steps
    labels = np.arange(batch) * 97 % cfg.num_classes
    ranks = np.stack([rng.permutation(length) for _ in range(batch)])
    noise = (rng.normal(size=(batch, length, c)).astype(np.float32),
             rng.normal(size=(batch, length, steps, c)).astype(np.float32))
    inputs = (tuple(map(jnp.asarray, noise)), jnp.asarray(ranks), jnp.asarray(labels))
    fn, compile_s = harness.compiled(fn, params, *inputs)
    ours = np.asarray(jax.block_until_ready(fn(params, *inputs)))
    official.sample_orders = lambda bsz: torch.from_numpy(np.argsort(ranks, -1))
    draws = official_draws(ranks, *noise, sample_cfg, True)

    def run_official():
        randn, randn_like = feed_randn(torch, draws)
        saved = torch.randn, torch.randn_like
        torch.randn, torch.randn_like = randn, randn_like
        try:
            with torch.no_grad():
                return official.sample_tokens(
                    batch, num_iter=sample_cfg.num_iter, cfg=sample_cfg.cfg,
                    cfg_schedule=sample_cfg.cfg_schedule, labels=torch.from_numpy(labels),
                    temperature=sample_cfg.temperature)
        finally:
            torch.randn, torch.randn_like = saved

    times = {"arjax": [], "official": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, *inputs))
        times["arjax"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        theirs = run_official().numpy().transpose(0, 2, 3, 1)
        times["official"].append(time.perf_counter() - t0)
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    a, o = (statistics.median(times[k]) for k in ("arjax", "official"))
    spread = {k: f"{min(v):.2f}-{max(v):.2f}" for k, v in times.items()}
    floor_s = floor(cfg, params, sample_cfg, batch, machine)
    return (f"| {batch} | {floor_s:.2f} | {a:.2f} | {spread['arjax']} | "
            f"x{min(times['arjax']) / floor_s:.2f} | {o:.2f} | {spread['official']} | "
            f"x{min(times['official']) / floor_s:.2f} | x{o / a:.2f} | {compile_s:.0f} | "
            f"{rel:.1e} | {harness.load()} |")


def main(argv=None) -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, help="checkout of LTH14/mar")
    parser.add_argument("--size", default="B", choices=("tiny", "B", "L", "H"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-iter", type=int, default=64)
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segments", type=int, default=MARSampleConfig.segments,
                        help="arjax's runs of steps (`sample.segments`)")
    args = parser.parse_args(argv)
    cfg, graphdef, params, official = random_models(args.official, args.size,
                                                    args.diffusion_steps)
    sample_cfg = MARSampleConfig(num_iter=args.num_iter, cfg=2.9, cfg_schedule="linear",
                                 diffusion_steps=args.diffusion_steps, segments=args.segments)
    fn = jax.jit(lambda p, noise, ranks, labels: sample_latents(
        graphdef, p, jax.random.key(0), labels, sample_cfg, noise, ranks)[0])
    machine = harness.calibrate(4 * harness.matmul_weights(params["diffloss"]))
    print(f"{jax.devices()[0].platform}, {os.cpu_count()} cores, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), load {os.getloadavg()}; "
          f"MAR-{args.size}, {args.num_iter} steps, {args.diffusion_steps} diffusion steps, "
          f"CFG 2.9 linear, float32, arjax in {args.segments} runs")
    print("| batch | floor s | arjax s (median) | spread | arjax / floor (best) | official s "
          "(median) | spread | official / floor (best) | speed-up | arjax compile s | max "
          "relative difference | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for batch in args.batches:
        print(time_batch(official, fn, params, cfg, sample_cfg, batch, args.rounds, rng,
                         machine),
              flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
