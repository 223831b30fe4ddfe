"""Training throughput of the `digits` preset (GPT tokens/s, tokenizer images/s) on this machine.

    python -m benchmarks.train_throughput [--steps 50]

Uses the preset's own models, loss functions, optimizer and jitted, donated train step (the
same `make_train_step` that `fit` runs), on real digits; compilation is excluded.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from arjax import sharding
from arjax.data import Batches, open_source
from arjax.experiment.pipeline import CodesSource
from arjax.models import split
from arjax.models.raster_ar import RasterAR
from arjax.optim import make_optimizer
from arjax.tokenizers.vq import VQTokenizer
from arjax.train import init_state, make_train_step, restore_or_init
from experiments import llamagen_imagenet as exp


def throughput(module_fn, loss_fn, stage, source, steps: int, mesh) -> float:
    """Steps per second of the jitted train step."""
    tx = make_optimizer(stage.optim)
    graphdef = split(nnx.eval_shape(module_fn))[0]
    state, shardings = restore_or_init(lambda: init_state(split(module_fn())[1], tx, 0),
                                       mesh, sharding.DEFAULT_RULES, None)
    step = jax.jit(make_train_step(graphdef, loss_fn, tx), donate_argnums=0,
                   out_shardings=(shardings, sharding.replicated(mesh)))
    batches = Batches(source, stage.batch_size, 0, mesh)
    state, metrics = step(state, next(batches))  # compile
    jax.block_until_ready(metrics)
    data = [next(batches) for _ in range(steps)]
    t0 = time.perf_counter()
    for batch in data:
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    cfg = exp.DIGITS
    mesh = sharding.make_mesh(cfg.mesh)
    images = open_source(cfg.data, "train")
    vq = throughput(lambda: VQTokenizer(cfg.tokenizer, rngs=nnx.Rngs(0)), exp.tokenizer_loss,
                    cfg.tokenizer_train, images, args.steps, mesh)
    print(f"tokenizer: {vq:.2f} steps/s = {vq * cfg.tokenizer_train.batch_size:.0f} images/s "
          f"(batch {cfg.tokenizer_train.batch_size}, {jax.devices()[0].device_kind})")
    rng = np.random.default_rng(0)
    codes = CodesSource(rng.integers(0, cfg.model.vocab_size, (1500, cfg.model.seq_len)),
                            rng.integers(0, 10, 1500), 10)
    gpt = throughput(lambda: RasterAR(cfg.model, rngs=nnx.Rngs(0)), exp.gpt_loss,
                     cfg.gpt_train, codes, args.steps, mesh)
    tokens = gpt * cfg.gpt_train.batch_size * cfg.model.seq_len
    print(f"gpt: {gpt:.2f} steps/s = {tokens:.0f} tokens/s "
          f"(batch {cfg.gpt_train.batch_size} x {cfg.model.seq_len} tokens)")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
