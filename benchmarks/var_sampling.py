"""Sampling speed of VAR-d16 (10 scales, CFG, top-k/top-p, VAE decode included) vs the official
PyTorch VAR, same weights, same process, against the floor.

    python -m benchmarks.var_sampling [--official /path/to/VAR] [--batches 1 8] [--depth 16]
        [--rounds 3] [--compete] [--torch-threads N] [--unfiltered] [--scan] [--xla-ops]

`--official` points at a checkout of FoundationVision/VAR (not part of arjax; needs
`huggingface_hub`); its `autoregressive_infer_cfg` + `fhat_to_img` run the weights arjax drew
(exported through `arjax.convert.var`, strict load) with the same settings (top-k 900,
top-p 0.96, fp32; arjax's cfg 2.5 is the official cfg=1.5, see `arjax.sampling.var`). The
runs are interleaved (`benchmarks.harness`); arjax's compilation is timed separately, and the
VAE decoder is also timed alone on both sides. Floors: the transformer reads its weights and
KV cache once per scale and does 2 FLOPs per weight per token row; the decoder's FLOPs are
XLA's count of the compiled decoder.

Disclosed: arjax finds the top-k / top-p cut-offs by a radix select over the vocabulary (the
official code sorts it; the same law, less work). `--unfiltered` also times arjax's sampler
with top-k and top-p off, interleaved with the rest: the difference is what the filter costs.
`--scan` also times arjax with `scan_layers` on (each scale's cached decode one `lax.scan`
over the blocks), interleaved, with its own compile time; `--xla-ops` the same with arjax's
CPU kernels off (its fused attention, `arjax.nn.cpu_attention`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.models import bind, split
from arjax.models.var import VAR, VARConfig, var_config
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import VAR_VAE, MultiScaleVQVAE
from benchmarks import harness
from benchmarks.var_parity import random_params

SAMPLE = var_sampling.VARSampleConfig(cfg=2.5, top_k=900, top_p=0.96)  # official cfg=1.5


def transformer_workload(cfg: VARConfig, params, batch: int) -> tuple[float, float]:
    """(bytes, FLOPs) of the 10 scale steps with CFG (2 x batch rows)."""
    rows, width = 2 * batch, params["head"]["kernel"].shape[0]
    weights = harness.matmul_weights(params)
    per_token = harness.matmul_weights(params, skip=("embedding", "ada_lin"))
    bytes_read, flops, prefix = 0.0, 0.0, 0
    for pn in cfg.patch_nums:
        n = pn * pn
        prefix += n
        bytes_read += 4 * weights + rows * 2 * cfg.depth * width * prefix * 4
        flops += 2 * per_token * rows * n + 4 * cfg.depth * width * n * prefix * rows
    return bytes_read, flops


def modules(depth: int):
    var_fn = lambda: VAR(var_config(depth), rngs=nnx.Rngs(0))
    vae_fn = lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(1))
    return (var_fn, random_params(var_fn, 0, 0.02)), (vae_fn, random_params(vae_fn, 1, 0.02))


def arjax_sample_run(var, vae, batch: int, sample: var_sampling.VARSampleConfig = SAMPLE,
                     warm_up: bool = True, kernels: bool = True):
    """(sample run, compile seconds); `kernels=False`: traced with arjax's CPU kernels off."""
    (var_fn, params), (vae_fn, vae_params) = var, vae
    graphdef = split(nnx.eval_shape(var_fn))[0]
    vae_graphdef = split(nnx.eval_shape(vae_fn))[0]
    params, vae_params = jax.device_put((params, vae_params))
    labels = jnp.arange(batch, dtype=jnp.int32) % 1000
    with harness.kernels(kernels):
        return harness.compiled_sampler(
            lambda p, vp, k: var_sampling.sample(graphdef, p, vae_graphdef, vp, k, labels,
                                                 sample).images, params, vae_params,
            warm_up=warm_up)


def arjax_decode_run(vae, batch: int):
    """(decode run of a random f_hat, the compiled decoder's FLOPs)."""
    vae_fn, vae_params = vae
    vae_graphdef = split(nnx.eval_shape(vae_fn))[0]
    vae_params = jax.device_put(vae_params)
    decode = jax.jit(lambda vp, f: bind(vae_graphdef, vp).decode_f_hat(f))
    f_hat = jax.random.normal(jax.random.key(0), (batch, 16, 16, VAR_VAE.codebook_dim))
    decode_flops = decode.lower(vae_params, f_hat).compile().cost_analysis()["flops"]
    jax.block_until_ready(decode(vae_params, f_hat))
    return lambda: jax.block_until_ready(decode(vae_params, f_hat)), decode_flops


def official_runs(repo: str, depth: int, var, vae, batch: int):
    import torch

    from arjax.convert.var import vae_to_torch, var_to_torch

    sys.path.insert(0, repo)
    from models import build_vae_var

    vae_t, var_t = build_vae_var(device="cpu", depth=depth, shared_aln=False,
                                 flash_if_available=False, fused_if_available=False)
    for module, state in ((var_t, var_to_torch(var[1])), (vae_t, vae_to_torch(vae[1]))):
        buffers = {k: v for k, v in module.state_dict().items() if k not in state}
        module.load_state_dict({**{k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                                **buffers}, strict=True)
    var_t.eval(), vae_t.eval()
    labels = torch.arange(batch) % 1000
    f_hat = torch.randn(batch, VAR_VAE.codebook_dim, 16, 16)

    def run():
        with torch.inference_mode():
            return var_t.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=1.5,
                                                  top_k=SAMPLE.top_k, top_p=SAMPLE.top_p,
                                                  more_smooth=False)

    def decode():
        with torch.inference_mode():
            return vae_t.fhat_to_img(f_hat)
    run(), decode()  # warm-up
    return run, decode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", default=None, help="path to a VAR checkout")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--unfiltered", action="store_true",
                        help="also time arjax without top-k / top-p (the filter's cost)")
    parser.add_argument("--scan", action="store_true",
                        help="also time arjax with scan_layers on (scanned cached decode)")
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    harness.apply(args)
    cfg = var_config(args.depth)
    var, vae = modules(args.depth)
    machine = harness.calibrate(4 * harness.matmul_weights(var[1]))
    for batch in args.batches:
        sample_run, compile_s = arjax_sample_run(var, vae, batch)
        decode_run, decode_flops = arjax_decode_run(vae, batch)
        runs = {"arjax": sample_run, "arjax decode": decode_run}
        if args.unfiltered:
            unfiltered = dataclasses.replace(SAMPLE, top_k=0, top_p=1.0)
            runs["arjax unfiltered"] = arjax_sample_run(var, vae, batch, unfiltered)[0]
        if args.scan:
            scanned = lambda: VAR(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0))
            runs["arjax scanned"], scan_compile_s = arjax_sample_run((scanned, var[1]), vae,
                                                                     batch)
        if args.xla_ops:
            runs["arjax, XLA ops"], xla_compile_s = arjax_sample_run(var, vae, batch,
                                                                     kernels=False)
        if args.official:
            runs["official"], runs["official decode"] = official_runs(
                args.official, args.depth, var, vae, batch)
        with harness.compete(args.compete):
            times = harness.interleave(runs, args.rounds)
            busy = harness.load()
        bytes_read, flops = transformer_workload(cfg, var[1], batch)
        decode_floor, _ = harness.floor(0, decode_flops, machine)
        floor_s, bound = harness.floor(bytes_read, flops, machine)
        floor_s += decode_floor
        line = [f"VAR-d{args.depth} batch {batch}{harness.condition(args)}:"
                f" floor {floor_s:.2f} s (transformer {bound}-bound, decode "
                f"{decode_floor:.2f} s compute)"]
        line += harness.columns(times, floor_s, f" (compile {compile_s:.1f} s)", decode_floor)
        if args.unfiltered:
            plain = times["arjax unfiltered"]
            line.append(f"arjax unfiltered {harness.spread(plain)}, arjax / unfiltered "
                        f"{harness.ratio(times['arjax'], plain)}")
        if args.scan:
            line.append(harness.variant(times, "arjax scanned", scan_compile_s))
        if args.xla_ops:
            line.append(harness.variant(times, "arjax, XLA ops", xla_compile_s))
        print(" | ".join(line) + f" | load {busy}", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
