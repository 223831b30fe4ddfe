"""Sampling speed of LlamaGen GPT-B (random weights, 256 tokens, CFG) vs the official PyTorch.

    python -m benchmarks.llamagen_sampling [--official /path/to/LlamaGen] [--batches 1 8]

`--official` points at a checkout of FoundationVision/LlamaGen (not part of arjax); its
`generate()` is then timed in the same process, on the same machine, with the same settings
(guidance 2.0, temperature 1, no top-k/top-p, fp32). Timings exclude compilation (arjax
compiles once per batch size; reported separately) and are the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import param_count, split
from arjax.models.raster_ar import gpt_config
from arjax.sampling.common import SampleConfig
from arjax.sampling.raster import sample

CFG_SCALE = 2.0


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_arjax(batch: int, repeats: int) -> tuple[float, float]:
    from arjax.models.raster_ar import RasterAR

    graphdef, params = split(RasterAR(gpt_config("B"), rngs=nnx.Rngs(0)))
    # Random (non-zero) head so the sampled distribution is not uniform.
    params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(1),
                                                          params["output"]["kernel"].shape)
    print(f"arjax GPT-B params: {param_count(params) / 1e6:.1f} M")
    fn = jax.jit(sample, static_argnames="cfg")
    cfg = SampleConfig(cfg=CFG_SCALE)
    labels = jnp.arange(batch, dtype=jnp.int32) % 1000
    t0 = time.perf_counter()
    jax.block_until_ready(fn(graphdef, params, jax.random.key(0), labels, cfg))
    compile_s = time.perf_counter() - t0
    run = lambda: jax.block_until_ready(fn(graphdef, params, jax.random.key(1), labels, cfg))
    return median_time(run, repeats), compile_s


def time_official(repo: str, batch: int, repeats: int) -> float:
    import torch

    sys.path.insert(0, repo)
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models

    torch.manual_seed(0)
    model = GPT_models["GPT-B"](vocab_size=16384, block_size=256, num_classes=1000,
                                cls_token_num=1, model_type="c2i").eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    cond = torch.arange(batch) % 1000
    run = lambda: generate(model, cond, 256, cfg_scale=CFG_SCALE, temperature=1.0, top_k=0,
                           top_p=1.0, sample_logits=True)
    with torch.inference_mode():
        run()  # warm-up
        return median_time(run, repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", default=None, help="path to a LlamaGen checkout")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    for batch in args.batches:
        ours, compile_s = time_arjax(batch, args.repeats)
        line = (f"batch {batch}: arjax {ours:.2f} s / 256 tokens with CFG "
                f"({256 * batch / ours:.0f} tokens/s; compile {compile_s:.1f} s)")
        if args.official:
            theirs = time_official(args.official, batch, args.repeats)
            line += f" | official {theirs:.2f} s | speed-up x{theirs / ours:.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
