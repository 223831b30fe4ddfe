"""Torch-exact image resizing as fixed [out, in] matrices applied along H and W.

`jax.image.resize` is not torch's `F.interpolate`: its bicubic uses a = -0.5 and antialiases
(up to 0.2 apart on a 5 -> 16 upsample). Checkpoints trained with torch (VAR's residual
quantiser, FID's Inception) need the torch kernels exactly, so each mode is written as the
matrix torch's loop computes, cached per (n_in, n_out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """mode='bilinear', align_corners=False."""
    # float32 index arithmetic, as torch does on CPU/GPU (float64 differs by ~2e-5 at 512 px).
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                     - np.float32(0.5), np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


@functools.lru_cache(maxsize=64)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """mode='bicubic', align_corners=False: Keys a = -0.75, unclamped source index,
    border-clamped taps."""
    a = -0.75
    scale = n_in / n_out
    src = scale * (np.arange(n_out) + 0.5) - 0.5
    i0 = np.floor(src).astype(int)
    t = src - i0
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 < |x| < 2
    weights = [far(t + 1), near(t), near(1 - t), far(2 - t)]
    m = np.zeros((n_out, n_in))
    for k, w in enumerate(weights):
        np.add.at(m, (np.arange(n_out), np.clip(i0 - 1 + k, 0, n_in - 1)), w)
    return m.astype(np.float32)


@functools.lru_cache(maxsize=64)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """mode='area' (adaptive average pooling: windows [floor(i n/m), ceil((i+1) n/m)))."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m.astype(np.float32)


MATRICES = {"bilinear": bilinear_matrix, "bicubic": bicubic_matrix, "area": area_matrix}


def resize(x: jax.Array, size: int | tuple[int, int], mode: str) -> jax.Array:
    """[N, H, W, C] -> [N, h, w, C] exactly as torch F.interpolate(x, size, mode)."""
    h, w = (size, size) if isinstance(size, int) else size
    if (h, w) == x.shape[1:3]:
        return x
    make = MATRICES[mode]
    return jnp.einsum("oh,nhwc,pw->nopc", make(x.shape[1], h), x, make(x.shape[2], w))
