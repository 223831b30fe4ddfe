"""Sampling speed of VAR-d16 (random weights, 10 scales, CFG, top-k/top-p, VAE decode included)
vs the official PyTorch VAR, same machine, same process.

    python -m benchmarks.var_sampling [--official /path/to/VAR] [--batches 1 8] [--depth 16]

`--official` points at a checkout of FoundationVision/VAR (not part of arjax; needs
`huggingface_hub`); its `autoregressive_infer_cfg` is timed with the same settings (cfg 1.5,
top-k 900, top-p 0.96, fp32). arjax compiles once per batch size (reported separately);
timings are the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import bind, split
from arjax.models.var import VAR, var_config
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import VAR_VAE, MultiScaleVQVAE
from benchmarks.llamagen_sampling import median_time

SAMPLE = var_sampling.VARSampleConfig(cfg=2.5, top_k=900, top_p=0.96)  # official cfg=1.5


def time_arjax(depth: int, batch: int, repeats: int) -> tuple[float, float]:
    init = jax.jit(lambda: (split(VAR(var_config(depth), rngs=nnx.Rngs(0)))[1],
                            split(MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(1)))[1]))
    params, vae_params = init()
    graphdef = split(nnx.eval_shape(lambda: VAR(var_config(depth), rngs=nnx.Rngs(0))))[0]
    vae_graphdef = split(nnx.eval_shape(lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(1))))[0]
    fn = jax.jit(lambda p, vp, k, y: var_sampling.sample(graphdef, p, vae_graphdef, vp, k, y,
                                                         SAMPLE).images)
    labels = jnp.arange(batch, dtype=jnp.int32) % 1000
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, vae_params, jax.random.key(0), labels))
    compile_s = time.perf_counter() - t0
    run = lambda: jax.block_until_ready(fn(params, vae_params, jax.random.key(1), labels))
    return median_time(run, repeats), compile_s


def time_arjax_decode(batch: int, repeats: int) -> float:
    """The VAE decoder alone (f_hat -> 256-px images), the other half of the cost."""
    vae_graphdef, vae_params = split(MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(1)))
    fn = jax.jit(lambda vp, f: bind(vae_graphdef, vp).decode_f_hat(f))
    f_hat = jax.random.normal(jax.random.key(0), (batch, 16, 16, VAR_VAE.codebook_dim))
    jax.block_until_ready(fn(vae_params, f_hat))
    return median_time(lambda: jax.block_until_ready(fn(vae_params, f_hat)), repeats)


def time_official(repo: str, depth: int, batch: int, repeats: int) -> tuple[float, float]:
    import torch

    sys.path.insert(0, repo)
    from models import build_vae_var

    torch.manual_seed(0)
    vae, var = build_vae_var(device="cpu", depth=depth, shared_aln=False,
                             flash_if_available=False, fused_if_available=False)
    for p in vae.parameters():  # build_vae_var skips the VAE's init (it loads weights)
        torch.nn.init.normal_(p, std=0.02)
    var.eval()
    labels = torch.arange(batch) % 1000
    run = lambda: var.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=SAMPLE.cfg,
                                               top_k=SAMPLE.top_k, top_p=SAMPLE.top_p,
                                               more_smooth=False)
    f_hat = torch.randn(batch, VAR_VAE.codebook_dim, 16, 16)
    with torch.inference_mode():
        run()  # warm-up
        return median_time(run, repeats), median_time(lambda: vae.fhat_to_img(f_hat), repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", default=None, help="path to a VAR checkout")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for batch in args.batches:
        ours, compile_s = time_arjax(args.depth, batch, args.repeats)
        line = (f"VAR-d{args.depth} batch {batch}: arjax {ours:.2f} s ({batch / ours:.3f} "
                f"images/s; compile {compile_s:.1f} s)")
        line += f", of which VAE decode {time_arjax_decode(batch, args.repeats):.2f} s"
        if args.official:
            theirs, decode = time_official(args.official, args.depth, batch, args.repeats)
            line += (f" | official {theirs:.2f} s ({batch / theirs:.3f} images/s), of which "
                     f"VAE decode {decode:.2f} s | speed-up x{theirs / ours:.2f}")
        print(line, flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
