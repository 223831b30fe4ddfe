"""The one sampler contract of every family, and the host-side generator built on it.

A family's sampler is a pure function `(params, key, labels) -> Samples`: images decoded inside
the same jit (every family's timed span is the same: tokens / scales / flows *and* the
tokenizer's decoder), the family's per-sample arrays (`tokens`, `codes`, `latents`, ...) and
scalar stats counted in the sampling loop's own state (`target_passes`: sequential calls of
the generator network; `nfe`: flow-head evaluations per sample; `draft_passes`, acceptance
rates, ...), never derived from the config.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from arjax import distributed, sharding
from arjax.images import to_uint8


class Samples(NamedTuple):
    images: jax.Array  # float [B, H, W, 3] in [-1, 1]
    aux: dict[str, jax.Array]  # per-sample arrays, leading axis B
    stats: dict[str, jax.Array]  # scalars counted in the loop state


class Generated(NamedTuple):
    """`Samples` on the host: uint8 images, numpy arrays, stats as Python numbers plus the
    wall-clock `seconds` of the whole jitted call (sampling and decoding)."""
    images: np.ndarray
    aux: dict[str, np.ndarray]
    stats: dict[str, float]


def make_generator(sample_fn: Callable[[Any, Any, jax.Array, jax.Array], Samples], mesh,
                   fixed: Any = None) -> Callable[[Any, np.ndarray, jax.Array], Generated]:
    """Jits `sample_fn(params, fixed, key, labels)` with images and aux sharded over the batch
    and the stats replicated; returns `generate(params, labels, key) -> Generated`. `fixed` are
    the arrays every call shares (the tokenizer's parameters, a draft model's): passed as jit
    arguments, never baked in as constants. Traced under `mesh` (`jax.set_mesh`), as `fit`
    traces the train step, so every block keeps its rows on their devices and gathers
    FSDP-sharded weights instead (`sharding.constrain_batch`). The first call for a batch
    size compiles (time it with a second call). Images and aux are gathered onto every
    process (call `generate` on all of them)."""
    batch = sharding.batch_sharding(mesh)
    shardings = Samples(images=batch, aux=batch, stats=sharding.replicated(mesh))
    sampler = jax.jit(sample_fn, out_shardings=shardings)

    def generate(params, labels: np.ndarray, key: jax.Array) -> Generated:
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            out = sampler(params, fixed, key,
                          sharding.from_host(np.asarray(labels, np.int32), mesh))
        jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        stats = {k: v.item() for k, v in jax.device_get(out.stats).items()}
        return Generated(to_uint8(distributed.gather(out.images)),
                         {k: distributed.gather(v) for k, v in out.aux.items()},
                         {**stats, "seconds": seconds})

    return generate
