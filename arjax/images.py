"""Image conversions and PNG grids."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats (or uint8) -> uint8."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images) -> jax.Array:
    """uint8 -> float32 in [-1, 1]; traceable, so jitted steps and evaluators share it."""
    return jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0


def grid(images, nrow: int, pad: int = 2) -> np.ndarray:
    """[N,H,W,C] -> one [rows*(H+pad)+pad, nrow*(W+pad)+pad, C] uint8 image."""
    images = to_uint8(images)
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return out


def save_grid(path: str, images, nrow: int, scale: int = 1) -> np.ndarray:
    """Writes a PNG grid (optionally nearest-upscaled for tiny images) and returns it."""
    g = grid(images, nrow)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil = Image.fromarray(g.squeeze(-1) if g.shape[-1] == 1 else g)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(path)
    return g
