"""The conv building blocks of the LDM-style image tokenizers (LlamaGen's VQ, VAR's VQ-VAE,
MAR's KL-16): GroupNorm + SiLU res blocks, single-head spatial attention, torch-exact down /
upsampling and a resolution level that combines them. NHWC; attribute names follow the
official module trees, so converters map them one to one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.nn.attention import attend
from arjax.nn.policy import conv_kwargs


def conv2d(cin, cout, k, rngs, stride=1, padding=1, float32=False):
    """A conv in the dtypes of the enclosing `arjax.nn.policy.conv_dtypes` (or float32)."""
    kw = conv_kwargs()
    if float32:
        kw["dtype"] = jnp.float32
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, rngs=rngs, **kw)


def group_norm(c, groups, rngs):
    """Statistics in float32 (flax), output in the compute dtype."""
    return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-6, rngs=rngs, **conv_kwargs())


def spatial_attention(q, k, v):
    """Single-head attention over positions: q/k/v [B, N, C]; logits in float32."""
    return attend(q[:, :, None], k[:, None], v[:, None], None)[:, :, 0]


class ResnetBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = group_norm(cin, groups, rngs)
        self.conv1 = conv2d(cin, cout, 3, rngs)
        self.norm2 = group_norm(cout, groups, rngs)
        self.conv2 = conv2d(cout, cout, 3, rngs)
        self.nin_shortcut = conv2d(cin, cout, 1, rngs, padding=0) if cin != cout else None

    def __call__(self, x):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.nin_shortcut is not None else x) + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1-conv q/k/v/proj (LDM style)."""

    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
        self.norm = group_norm(c, groups, rngs)
        self.q, self.k, self.v = (conv2d(c, c, 1, rngs, padding=0) for _ in range(3))
        self.proj_out = conv2d(c, c, 1, rngs, padding=0)

    def __call__(self, x):
        b, h, w, c = x.shape
        y = self.norm(x)
        q, k, v = (f(y).reshape(b, h * w, c) for f in (self.q, self.k, self.v))
        return x + self.proj_out(spatial_attention(q, k, v).reshape(b, h, w, c))


class Downsample(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv = conv2d(c, c, 3, rngs, stride=2, padding="VALID")

    def __call__(self, x):  # torch pads (0,1,0,1): right and bottom only
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv = conv2d(c, c, 3, rngs)

    def __call__(self, x):  # nearest x2, then conv
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
    """One resolution level: res blocks (+ attention at the lowest resolution) and a resample."""

    def __init__(self, cin, cout, n_res, attn, resample, groups, *, rngs,
                 attn_block=AttnBlock):
        self.res = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs)
                             for i in range(n_res)])
        self.attn = nnx.List([attn_block(cout, groups, rngs=rngs) for _ in range(n_res)]
                             if attn else [])
        self.downsample = resample(cout, rngs=rngs) if resample is Downsample else None
        self.upsample = resample(cout, rngs=rngs) if resample is Upsample else None

    def __call__(self, x):
        for i, res in enumerate(self.res):
            x = res(x)
            if len(self.attn):
                x = self.attn[i](x)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                x = resample(x)
        return x
