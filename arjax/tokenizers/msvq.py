"""VAR's multi-scale residual VQ-VAE: the encoder feature is explained coarse-to-fine.

At scale k (side patch_nums[k]) the remaining residual is area-downsampled, quantised with the
shared codebook, bicubically upsampled back, refined by one of `num_phi` 3x3 convs ("Phi",
h -> (1 - r) h + r conv(h)), added to the running reconstruction f_hat and subtracted from the
residual. Resizes are torch-exact (`arjax.nn.resize`); the Phi chosen per scale follows the
official float64 rule. Module names follow the official `vae_ch160v4096z32.pth`
(`decoder.up.{level}`, `quantize.quant_resi.qresi_ls.{k}`), except that a level's res blocks
are `res.{j}` (LlamaGen's `Level`) where the official file has `block.{j}`.
Shapes: images NHWC in [-1, 1]; f / f_hat [B, H, W, C] with H = image / 16.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.config import check
from arjax.nn.conv import conv2d, group_norm, spatial_attention
from arjax.nn.layers import nearest_code
from arjax.nn.policy import check_policy, conv_dtypes
from arjax.nn.resize import resize
from arjax.tokenizers.ldm import Decoder, Encoder


@dataclasses.dataclass(frozen=True)
class MSVQConfig:
    codebook_size: int = 4096
    codebook_dim: int = 32  # Cvae = z_channels
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_phi: int = 4  # share_quant_resi
    phi_ratio: float = 0.5  # quant_resi
    beta: float = 0.25
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    dtype: str = "float32"  # encoder/decoder convs (the quantiser is float32)
    param_dtype: str = "float32"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def validate(self) -> None:
        check(all(a < b for a, b in zip(self.patch_nums, self.patch_nums[1:])),
              f"patch_nums must increase, got {self.patch_nums}")
        widths = [self.ch * m for m in self.ch_mult]
        check(all(w % self.norm_groups == 0 for w in widths),
              f"tokenizer widths {widths} must be multiples of norm_groups={self.norm_groups}")
        check(self.num_phi >= 1, "num_phi must be >= 1")
        check_policy(self, "tokenizer")

    def phi_index(self) -> tuple[int, ...]:
        """Which Phi each scale uses: argmin |ticks - k / (K - 1)| in float64 (official)."""
        n, k = self.num_phi, len(self.patch_nums)
        ticks = (np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4
                 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n))
        return tuple(int(np.argmin(np.abs(ticks - s / max(k - 1, 1)))) for s in range(k))


VAR_VAE = MSVQConfig()


class Attn(nnx.Module):
    """Single-head spatial attention with a fused 1x1 qkv conv (VAR's AttnBlock)."""

    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs):
        self.norm = group_norm(c, groups, rngs)
        self.qkv = conv2d(c, 3 * c, 1, rngs, padding=0)
        self.proj_out = conv2d(c, c, 1, rngs, padding=0)

    def __call__(self, x):
        b, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b, h * w, 3 * c), 3, axis=-1)
        return x + self.proj_out(spatial_attention(q, k, v).reshape(b, h, w, c))


class PhiShared(nnx.Module):
    def __init__(self, cfg: MSVQConfig, *, rngs: nnx.Rngs):
        c = cfg.codebook_dim
        # float32: the official quantiser runs with autocast off
        self.qresi_ls = nnx.List([conv2d(c, c, 3, rngs, float32=True)
                                  for _ in range(cfg.num_phi)])


class MultiScaleQuantizer(nnx.Module):
    def __init__(self, cfg: MSVQConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        n = cfg.codebook_size
        self.embedding = nnx.Embed(n, cfg.codebook_dim, rngs=rngs)
        self.embedding.embedding[...] = jax.random.uniform(
            rngs.params(), (n, cfg.codebook_dim), minval=-1 / n, maxval=1 / n)
        self.quant_resi = PhiShared(cfg, rngs=rngs)

    def phi(self, scale: int, h):
        conv = self.quant_resi.qresi_ls[self.cfg.phi_index()[scale]]
        r = self.cfg.phi_ratio
        return (1 - r) * h + r * conv(h)

    def upsampled(self, scale: int, h, side: int):
        """Phi(bicubic(h -> side)) for one scale's code vectors h [B, pn*pn, C]."""
        pn = self.cfg.patch_nums[scale]
        return self.phi(scale, resize(h.reshape(h.shape[0], pn, pn, -1), side, "bicubic"))

    def lookup(self, z):
        """Nearest code by squared L2: z [..., C] -> int32 [...]."""
        return nearest_code(z, self.embedding.embedding[...])

    def __call__(self, f):
        """f [B,H,W,C] -> (straight-through f_hat, per-scale codes, loss)."""
        side, rest, f_hat, codes, loss = f.shape[1], f, jnp.zeros_like(f), [], 0.0
        for k, pn in enumerate(self.cfg.patch_nums):
            idx = self.lookup(resize(rest, pn, "area"))
            codes.append(idx.reshape(f.shape[0], -1))
            h = self.upsampled(k, self.embedding(codes[-1]), side)
            f_hat, rest = f_hat + h, rest - h
            loss += (self.cfg.beta * jnp.mean((jax.lax.stop_gradient(f_hat) - f) ** 2)
                     + jnp.mean((f_hat - jax.lax.stop_gradient(f)) ** 2))
        f_hat = f + jax.lax.stop_gradient(f_hat - f)
        return f_hat, codes, loss / len(self.cfg.patch_nums)

    def f_hat(self, codes: list[jax.Array], side: int):
        return sum(self.upsampled(k, self.embedding(c), side) for k, c in enumerate(codes))

    def next_input(self, scale: int, f_hat, h, side: int):
        """The AR step with the scale's code vectors h [B, pn^2, C]: f_hat += their
        contribution; the next scale's input is f_hat area-downsampled to its side
        ([B, pn'^2, C]); None after the last scale."""
        f_hat = f_hat + self.upsampled(scale, h, side)
        if scale + 1 == len(self.cfg.patch_nums):
            return f_hat, None
        pn = self.cfg.patch_nums[scale + 1]
        return f_hat, resize(f_hat, pn, "area").reshape(f_hat.shape[0], pn * pn, -1)

    def teacher_inputs(self, codes: list[jax.Array], side: int):
        """VAR's training input: [B, L - patch_nums[0]^2, C] for scales 1..K-1."""
        return self.vector_inputs(jnp.concatenate([self.embedding(c) for c in codes], 1), side)

    def vector_inputs(self, h: jax.Array, side: int):
        """`teacher_inputs` of any code-space vectors h [B, L, C] in code order (not only
        codebook rows: DD2 feeds generated vectors and noise)."""
        f_hat = jnp.zeros((h.shape[0], side, side, self.cfg.codebook_dim))
        inputs, begin = [], 0
        for k, pn in enumerate(self.cfg.patch_nums[:-1]):
            f_hat, nxt = self.next_input(k, f_hat, h[:, begin:begin + pn * pn], side)
            inputs.append(nxt)
            begin += pn * pn
        return jnp.concatenate(inputs, axis=1)


class MultiScaleVQVAE(nnx.Module):
    """encode(images) -> list of per-scale codes [B, pn^2]; decode(codes) -> images."""

    def __init__(self, cfg: MSVQConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        with conv_dtypes(cfg):
            self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.codebook_dim,
                                   cfg.norm_groups, Attn, rngs=rngs)
            self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.codebook_dim,
                                   cfg.norm_groups, Attn, level_attn=True, rngs=rngs)
            self.quantize = MultiScaleQuantizer(cfg, rngs=rngs)
            c = cfg.codebook_dim
            self.quant_conv = conv2d(c, c, 3, rngs)
            self.post_quant_conv = conv2d(c, c, 3, rngs)

    def features(self, images):
        """float32 features for the quantiser."""
        return self.quant_conv(self.encoder(images)).astype(jnp.float32)

    def __call__(self, images):
        """Reconstruction and the quantiser loss (training)."""
        f_hat, codes, loss = self.quantize(self.features(images))
        return self._decode(f_hat), {"quant": loss, "codes": codes}

    def _decode(self, f_hat):
        return self.decoder(self.post_quant_conv(f_hat)).astype(jnp.float32)

    def encode(self, images) -> list[jax.Array]:
        return self.quantize(self.features(images))[1]

    def decode_f_hat(self, f_hat):
        """Images in [-1, 1] (clamped, as the official fhat_to_img)."""
        return jnp.clip(self._decode(f_hat), -1, 1)

    def decode(self, codes: list[jax.Array]):
        side = self.cfg.patch_nums[-1]
        return self.decode_f_hat(self.quantize.f_hat(codes, side))

    def decode_vectors(self, h: jax.Array):
        """Per-scale code-space vectors, flat in code order [B, L, C] (codes' vectors or any:
        DD's continuous outputs) -> images."""
        side, f_hat, begin = self.cfg.patch_nums[-1], 0.0, 0
        for k, pn in enumerate(self.cfg.patch_nums):
            f_hat = f_hat + self.quantize.upsampled(k, h[:, begin:begin + pn * pn], side)
            begin += pn * pn
        return self.decode_f_hat(f_hat)
