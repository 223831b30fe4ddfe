"""Next-scale sequences, shared by VAR and FlowAR: the scales of an image laid out as one
sequence (scale k at positions begin_k..end_k - 1), attended block-causally (a token sees its
own and every coarser scale), decoded one scale at a time against a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arjax.nn.attention import attend


def scale_bounds(sides) -> list[tuple[int, int]]:
    """[(begin, end)] of each scale of side n (n^2 tokens)."""
    ends = np.cumsum([n * n for n in sides])
    return [(int(e - n * n), int(e)) for n, e in zip(sides, ends)]


def scale_levels(sides) -> np.ndarray:
    """The scale index of every position, int [L]."""
    return np.repeat(np.arange(len(sides)), [n * n for n in sides])


def block_causal_mask(sides) -> np.ndarray:
    """bool [L, L], True where position i may attend to position j."""
    levels = scale_levels(sides)
    return levels[:, None] >= levels[None, :]


def init_scale_cache(batch: int, heads: int, length: int, head_dim: int, layers: int,
                     dtype=jnp.float32) -> list[dict[str, jax.Array]]:
    shape = (batch, heads, length, head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(layers)]


def attend_scale(q: jax.Array, k: jax.Array, v: jax.Array, cache: dict, begin: int, end: int,
                 scale: float | None = None, mask: np.ndarray | None = None
                 ) -> tuple[jax.Array, dict]:
    """The q [B, n, H, d] and k/v [B, H, n, d] of positions begin..end - 1 (static) written
    into the cache and attended against every position < end: exactly the block-causal
    teacher-forced attention of those positions. One scale needs no mask; a span of several
    whole scales (a prefill) passes `chunk_mask(sides, begin, end)`."""
    cache = {"k": cache["k"].at[:, :, begin:end].set(k),
             "v": cache["v"].at[:, :, begin:end].set(v)}
    return attend(q, cache["k"][:, :, :end], cache["v"][:, :, :end],
                  None if mask is None else jnp.asarray(mask), scale), cache


def chunk_mask(sides, begin: int, end: int) -> np.ndarray | None:
    """The block-causal mask of positions begin..end - 1 against 0..end - 1, or None when they
    are one scale (all of 0..end - 1 visible)."""
    levels = scale_levels(sides)
    if levels[begin] == levels[end - 1]:
        return None
    return block_causal_mask(sides)[begin:end, :end]
