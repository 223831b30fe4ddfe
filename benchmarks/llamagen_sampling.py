"""Sampling speed of LlamaGen GPT-B (256 tokens, CFG) vs the official PyTorch, against the floor.

    python -m benchmarks.llamagen_sampling [--official /path/to/LlamaGen] [--batches 1 8]
        [--rounds 3] [--compete] [--torch-threads N] [--xla-ops]

Both sides run the same random weights (arjax's, exported into the official module through
`arjax.convert.llamagen`, strict load), guidance 2.0, temperature 1, no top-k/top-p, float32,
in one process, interleaved round by round (`benchmarks.harness`); arjax's compilation is
timed separately. The floor per image batch: every decode step reads the matmul weights and
the filled KV cache once (memory) and does 2 FLOPs per weight per row (compute); printed as
time / floor beside the official ratio. `--compete` keeps one core busy with another process.

The work per token is the same on both sides (KV-cache decoding, CFG's doubled batch, a
categorical draw over the whole vocabulary); arjax's differences are the compiled loop, the
cache layout and, at 8-16 rows on CPU, its few-row matmul kernel on weights packed once per
call (`arjax.nn.few_rows`). `--xla-ops` also times arjax with its CPU kernels off, interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.models import param_count, split
from arjax.models.raster_ar import RasterAR, RasterARConfig, gpt_config
from arjax.sampling.common import SampleConfig
from arjax.sampling.raster import sample
from benchmarks import harness
from benchmarks.var_parity import random_params

CFG_SCALE = 2.0


def workload(cfg: RasterARConfig, params, batch: int) -> tuple[float, float]:
    """(bytes read, FLOPs) of one CFG sampling run: 2 x batch rows for seq_len steps."""
    rows, weights = 2 * batch, harness.matmul_weights(params)
    kv_row = 2 * cfg.depth * cfg.dim * 4  # K and V, float32, per cached token
    steps = range(cfg.seq_len)
    bytes_read = sum(4 * weights + rows * kv_row * t for t in steps)
    flops = sum(2 * weights * rows + 4 * cfg.depth * cfg.dim * t * rows for t in steps)
    return bytes_read, flops


def arjax_run(params, cfg: RasterARConfig, batch: int, warm_up: bool = True,
              kernels: bool = True):
    """(sampling run, compile seconds); `kernels=False` traces with arjax's CPU kernels off
    (XLA's dot throughout)."""
    graphdef = split(nnx.eval_shape(lambda: RasterAR(cfg, rngs=nnx.Rngs(0))))[0]
    sample_cfg = SampleConfig(cfg=CFG_SCALE)
    labels = jnp.arange(batch, dtype=jnp.int32) % 1000
    params = jax.device_put(params)
    with harness.kernels(kernels):
        return harness.compiled_sampler(
            lambda p, k: sample(graphdef, p, k, labels, sample_cfg), params, warm_up=warm_up)


def official_run(repo: str, params, cfg: RasterARConfig, batch: int, args):
    import torch

    from arjax.convert import llamagen

    sys.path.insert(0, repo)
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import GPT_models

    model = GPT_models["GPT-B"](vocab_size=cfg.vocab_size, block_size=cfg.seq_len,
                                num_classes=cfg.num_classes, cls_token_num=1,
                                model_type="c2i").eval()
    state = llamagen.to_torch(params)
    buffers = {k: v for k, v in model.state_dict().items() if k not in state}
    model.load_state_dict({**{k: torch.from_numpy(v.copy()) for k, v in state.items()},
                           **buffers}, strict=True)
    cond = torch.arange(batch) % 1000
    model = harness.official_module(model, args)

    def run():
        with torch.inference_mode():
            return generate(model, cond, cfg.seq_len, cfg_scale=CFG_SCALE, temperature=1.0,
                            top_k=0, top_p=1.0, sample_logits=True)
    t0 = time.perf_counter()
    run()  # warm-up (and torch.compile's compilation)
    print(f"official warm-up {time.perf_counter() - t0:.1f} s", flush=True)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--official", default=None, help="path to a LlamaGen checkout")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    harness.add_arguments(parser)
    args = parser.parse_args(argv)
    harness.apply(args)
    cfg = gpt_config("B")
    params = random_params(lambda: RasterAR(cfg, rngs=nnx.Rngs(0)), 0, 0.02)
    print(f"GPT-B: {param_count(params) / 1e6:.1f} M params, "
          f"{harness.matmul_weights(params) / 1e6:.1f} M in matmuls; jax {jax.__version__}")
    machine = harness.calibrate(4 * harness.matmul_weights(params))
    for batch in args.batches:
        ours, compile_s = arjax_run(params, cfg, batch)
        runs = {"arjax": ours}
        if args.xla_ops:
            runs["arjax, XLA ops"] = arjax_run(params, cfg, batch, kernels=False)[0]
        if args.official:
            runs["official"] = official_run(args.official, params, cfg, batch, args)
        with harness.compete(args.compete):
            times = harness.interleave(runs, args.rounds)
            busy = harness.load()
        floor_s, bound = harness.floor(*workload(cfg, params, batch), machine)
        line = [f"batch {batch}{harness.condition(args)}: floor {floor_s:.2f} s ({bound}-"
                f"bound)", *harness.columns(times, floor_s, f" (compile {compile_s:.1f} s)")]
        if args.xla_ops:
            line.append(harness.variant(times, "arjax, XLA ops"))
        print(" | ".join(line) + f" | load {busy}", flush=True)


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
