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

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        check(all(w % self.norm_groups == 0 for w in widths),
              f"tokenizer widths {widths} must be multiples of norm_groups={self.norm_groups}")
        check(self.codebook_size > 1 and self.codebook_dim > 0, "bad codebook size/dim")


VQ_16 = VQConfig()
VQ_8 = VQConfig(ch_mult=(1, 2, 2, 4))


def conv2d(cin, cout, k, rngs, stride=1, padding=1):
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=padding, rngs=rngs)


def group_norm(c, groups, rngs):
    return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-6, rngs=rngs)


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
        att = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c**-0.5, axis=-1)
        return x + self.proj_out(jnp.einsum("bij,bjc->bic", att, v).reshape(b, h, w, c))


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
        dist = (jnp.sum(flat**2, -1, keepdims=True) + jnp.sum(table**2, -1)
                - 2 * flat @ table.T)
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
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quantize = VectorQuantizer(cfg, rngs=rngs)
        self.quant_conv = conv2d(cfg.z_channels, cfg.codebook_dim, 1, rngs, padding=0)
        self.post_quant_conv = conv2d(cfg.codebook_dim, cfg.z_channels, 1, rngs, padding=0)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Reconstruction and quantiser losses (training)."""
        z_q, codes, losses = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), {**losses, "codes": codes}

    def encode(self, images: jax.Array) -> jax.Array:
        _, codes, _ = self.quantize(self.quant_conv(self.encoder(images)))
        return codes.reshape(codes.shape[0], -1)

    def decode(self, codes: jax.Array) -> jax.Array:
        side = int(round(codes.shape[-1] ** 0.5))
        z_q = self.quantize.codebook()[codes].reshape(codes.shape[0], side, side, -1)
        return self.decoder(self.post_quant_conv(z_q))
