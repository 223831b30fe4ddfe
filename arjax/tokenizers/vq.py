"""LlamaGen-style VQ-VAE: conv encoder/decoder, l2-normalised codebook, raster-order codes.

Shapes: B batch, H/W image size, h/w = H/f latent grid (f = 2^(levels-1)), C codebook dim,
N codebook size. Images are NHWC in [-1, 1]. Submodule names follow the official VQ-16
state_dict (`encoder.conv_blocks.{i}.res.{j}.conv1`, `decoder.conv_blocks` in decoding order,
`quantize.embedding`), which `arjax.convert.llamagen` relies on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.config import check
from arjax.nn.conv import AttnBlock, Downsample, Level, ResnetBlock, Upsample, conv2d, group_norm
from arjax.nn.layers import code_distances
from arjax.nn.policy import check_policy, conv_dtypes


@dataclasses.dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True
    commit_beta: float = 0.25
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    norm_groups: int = 32
    image_channels: int = 3
    dtype: str = "float32"  # encoder/decoder convs (the quantiser is float32)
    param_dtype: str = "float32"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        check(all(w % self.norm_groups == 0 for w in widths),
              f"tokenizer widths {widths} must be multiples of norm_groups={self.norm_groups}")
        check(self.codebook_size > 1 and self.codebook_dim > 0, "bad codebook size/dim")
        check_policy(self, "tokenizer")


VQ_16 = VQConfig()
VQ_8 = VQConfig(ch_mult=(1, 2, 2, 4))


def _mid(c, groups, rngs):
    return nnx.List([ResnetBlock(c, c, groups, rngs=rngs), AttnBlock(c, groups, rngs=rngs),
                     ResnetBlock(c, c, groups, rngs=rngs)])


class Encoder(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = conv2d(cfg.image_channels, cfg.ch, 3, rngs)
        widths = [cfg.ch] + [cfg.ch * m for m in cfg.ch_mult]
        self.conv_blocks = nnx.List([
            Level(widths[i], widths[i + 1], cfg.num_res_blocks, attn=i == n - 1,
                  resample=Downsample if i != n - 1 else None, groups=g, rngs=rngs)
            for i in range(n)])
        self.mid = _mid(widths[-1], g, rngs)
        self.norm_out = group_norm(widths[-1], g, rngs)
        self.conv_out = conv2d(widths[-1], cfg.z_channels, 3, rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in list(self.conv_blocks) + list(self.mid):
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """`conv_blocks[0]` is the lowest resolution (decoding order), as in the official file."""

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = conv2d(cfg.z_channels, top, 3, rngs)
        self.mid = _mid(top, g, rngs)
        levels, cin = [], top
        for j, i in enumerate(reversed(range(n))):
            cout = cfg.ch * cfg.ch_mult[i]
            levels.append(Level(cin, cout, cfg.num_res_blocks + 1, attn=j == 0,
                                resample=Upsample if i != 0 else None, groups=g, rngs=rngs))
            cin = cout
        self.conv_blocks = nnx.List(levels)
        self.norm_out = group_norm(cin, g, rngs)
        self.conv_out = conv2d(cin, cfg.image_channels, 3, rngs)

    def __call__(self, z):
        x = self.conv_in(z)
        for block in list(self.mid) + list(self.conv_blocks):
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class VectorQuantizer(nnx.Module):
    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n = cfg.codebook_size
        init = nnx.initializers.uniform(2.0 / n)
        table = init(rngs.params(), (n, cfg.codebook_dim)) - 1.0 / n
        if cfg.l2_norm:
            table = _l2(table)
        self.embedding = nnx.Embed(n, cfg.codebook_dim, rngs=rngs)
        self.embedding.embedding[...] = table

    def codebook(self) -> jax.Array:
        table = self.embedding.embedding[...]
        return _l2(table) if self.cfg.l2_norm else table

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """z [B,h,w,C] -> (straight-through z_q, codes int32 [B,h,w], losses)."""
        cfg = self.cfg
        z = _l2(z) if cfg.l2_norm else z
        table = self.codebook()
        flat = z.reshape(-1, z.shape[-1])
        dist = code_distances(flat, table)
        codes = jnp.argmin(dist, axis=-1)
        z_q = table[codes].reshape(z.shape)
        losses = {
            "codebook": jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2),
            "commit": cfg.commit_beta * jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2),
            "entropy": cfg.entropy_weight * entropy_loss(-dist, cfg.entropy_temperature),
        }
        z_q = z + jax.lax.stop_gradient(z_q - z)
        return z_q, codes.reshape(z.shape[:-1]).astype(jnp.int32), losses


def _l2(x: jax.Array) -> jax.Array:
    """F.normalize(x, dim=-1): x / max(||x||, 1e-12)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def entropy_loss(affinity: jax.Array, temperature: float) -> jax.Array:
    """Per-sample entropy minus codebook-average entropy (encourages confident, diverse codes)."""
    logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = jax.nn.softmax(logits, axis=-1)
    log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
    avg = jnp.mean(probs, axis=0)
    return -jnp.mean(jnp.sum(probs * log_probs, -1)) + jnp.sum(avg * jnp.log(avg + 1e-5))


class VQTokenizer(nnx.Module):
    """encode(images) -> codes int32 [B, h*w] (raster order); decode(codes) -> images."""

    def __init__(self, cfg: VQConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        with conv_dtypes(cfg):
            self.encoder = Encoder(cfg, rngs=rngs)
            self.decoder = Decoder(cfg, rngs=rngs)
            self.quantize = VectorQuantizer(cfg, rngs=rngs)  # float32 (nnx.Embed)
            self.quant_conv = conv2d(cfg.z_channels, cfg.codebook_dim, 1, rngs, padding=0,
                                     float32=True)
            self.post_quant_conv = conv2d(cfg.codebook_dim, cfg.z_channels, 1, rngs, padding=0)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruction and quantiser losses (training)."""
        z_q, codes, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self._decode(z_q), {**losses, "codes": codes}

    def _decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q)).astype(jnp.float32)

    def encode(self, images: jax.Array) -> jax.Array:
        _, codes, _ = self.quantize(self.quant_conv(self.encoder(images)))
        return codes.reshape(codes.shape[0], -1)

    def decode(self, codes: jax.Array) -> jax.Array:
        return self.decode_vectors(self.quantize.codebook()[codes])

    def decode_vectors(self, z: jax.Array) -> jax.Array:
        """Raster-order code-space vectors [B, h*w, C] (codes or any vectors: DD's continuous
        outputs) -> images."""
        side = int(round(z.shape[1] ** 0.5))
        return self._decode(z.reshape(z.shape[0], side, side, -1))
