"""The LDM conv encoder/decoder shared by VAR's VQ-VAE and MAR's KL-16 VAE.

Both official files use the same module tree (`encoder.down.{level}.block.{j}`,
`.attn.{j}`, `.downsample`, `mid.block_1/attn_1/block_2`, `decoder.up.{level}`, with `up[-1]`
the lowest resolution, run first); arjax names a level's res blocks `res.{j}` (LlamaGen's
`Level`). They differ only in the attention block (VAR: fused 1x1 `qkv`; KL: separate `q`,
`k`, `v`) and in whether the decoder's lowest level has attention (VAR yes, KL no).
Shapes: NHWC.
"""

from __future__ import annotations

import jax
from flax import nnx

from arjax.nn.conv import Downsample, Level, ResnetBlock, Upsample, conv2d, group_norm


def _mid(c, groups, attn_block, rngs):
    return nnx.Dict(block_1=ResnetBlock(c, c, groups, rngs=rngs),
                    attn_1=attn_block(c, groups, rngs=rngs),
                    block_2=ResnetBlock(c, c, groups, rngs=rngs))


def _run_mid(mid, x):
    return mid["block_2"](mid["attn_1"](mid["block_1"](x)))


class Encoder(nnx.Module):
    """images [B, H, W, 3] -> [B, H/f, W/f, out_channels], f = 2^(len(ch_mult) - 1);
    attention after every res block of the lowest level and in the middle."""

    def __init__(self, ch: int, ch_mult, num_res_blocks: int, out_channels: int, groups: int,
                 attn_block, *, rngs: nnx.Rngs):
        n = len(ch_mult)
        widths = [ch] + [ch * m for m in ch_mult]
        self.conv_in = conv2d(3, ch, 3, rngs)
        self.down = nnx.List([Level(widths[i], widths[i + 1], num_res_blocks, i == n - 1,
                                    Downsample if i < n - 1 else None, groups, rngs=rngs,
                                    attn_block=attn_block) for i in range(n)])
        self.mid = _mid(widths[-1], groups, attn_block, rngs)
        self.norm_out = group_norm(widths[-1], groups, rngs)
        self.conv_out = conv2d(widths[-1], out_channels, 3, rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(_run_mid(self.mid, x))))


class Decoder(nnx.Module):
    """[B, h, w, in_channels] -> images; `level_attn`: attention in the lowest up level."""

    def __init__(self, ch: int, ch_mult, num_res_blocks: int, in_channels: int, groups: int,
                 attn_block, level_attn: bool, *, rngs: nnx.Rngs):
        n = len(ch_mult)
        widths = [ch * m for m in ch_mult]
        self.conv_in = conv2d(in_channels, widths[-1], 3, rngs)
        self.mid = _mid(widths[-1], groups, attn_block, rngs)
        self.up = nnx.List([Level(widths[min(i + 1, n - 1)], widths[i], num_res_blocks + 1,
                                  level_attn and i == n - 1, Upsample if i > 0 else None,
                                  groups, rngs=rngs, attn_block=attn_block) for i in range(n)])
        self.norm_out = group_norm(widths[0], groups, rngs)
        self.conv_out = conv2d(widths[0], 3, 3, rngs)

    def __call__(self, z):
        x = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))
