"""2D rotary position embeddings, LlamaGen layout.

The first hd/4 complex pairs rotate with the row index, the next hd/4 with the column index;
pairs are interleaved (channels 2p, 2p+1). The table is prefixed by `prefix` rows of zeros, so
the class token's q and k are exactly zero (only its value carries information) -- the official
model does this and checkpoints depend on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rope_2d_table(grid: int, head_dim: int, base: float = 10000.0, prefix: int = 1,
                  span: float | None = None) -> np.ndarray:
    """float32 [prefix + grid*grid, head_dim // 2, 2] of (cos, sin). Positions are 0..grid-1,
    or i * span / grid with `span` (FlowAR: every scale's grid stretched over the last one's)."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half))
    positions = np.arange(grid, dtype=np.float32)
    if span is not None:
        positions = positions / np.float32(grid) * np.float32(span)
    angles = np.outer(positions, freqs)  # [grid, hd/4]
    rows = np.broadcast_to(angles[:, None, :], (grid, grid, len(freqs)))
    cols = np.broadcast_to(angles[None, :, :], (grid, grid, len(freqs)))
    table = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, -1)
    cache = np.stack([np.cos(table), np.sin(table)], axis=-1)
    return np.concatenate([np.zeros((prefix, cache.shape[1], 2), np.float32), cache]
                          ).astype(np.float32)


def apply_rope(x: jax.Array, cos_sin: jax.Array) -> jax.Array:
    """x [B, T, H, hd], cos_sin [T, hd/2, 2] (or [B, T, hd/2, 2]) -> rotated x."""
    xs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    if cos_sin.ndim == 3:
        cos_sin = cos_sin[None]
    cos, sin = cos_sin[:, :, None, :, 0], cos_sin[:, :, None, :, 1]
    out = jnp.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                     xs[..., 1] * cos + xs[..., 0] * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
