"""MAR's KL-16 VAE (LDM `AutoencoderKL`): a continuous latent for MAR and FlowAR.

Encoder -> 1x1 `quant_conv` -> moments = [mean, logvar] (logvar clamped to [-30, 20]); a
latent is mean + exp(logvar / 2) * eps, and generators see it times `scale` (0.2325 for the
official kl16.ckpt, which makes ImageNet latents roughly unit-variance); decoding divides by it
again. The official weights are `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`, 66.5 M
parameters; its recipe (LPIPS + GAN) was not released, so `__call__` trains with L2 + a small
KL term. Shapes: images NHWC in [-1, 1], latents [B, H/f, W/f, embed_dim].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.config import check
from arjax.nn.conv import AttnBlock, conv2d
from arjax.nn.policy import check_policy, conv_dtypes
from arjax.tokenizers.ldm import Decoder, Encoder


@dataclasses.dataclass(frozen=True)
class KLConfig:
    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    scale: float = 0.2325  # latent normalisation (0: estimate 1 / std from the training set)
    kl_weight: float = 1e-6  # training only: weight of the per-element KL next to the L2 loss
    dtype: str = "float32"  # conv compute (moments, posterior and outputs are float32)
    param_dtype: str = "float32"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        check(all(w % self.norm_groups == 0 for w in widths),
              f"tokenizer widths {widths} must be multiples of norm_groups={self.norm_groups}")
        check(self.embed_dim > 0 and self.scale >= 0 and self.kl_weight >= 0,
              "tokenizer.embed_dim must be > 0, scale and kl_weight >= 0")
        check_policy(self, "tokenizer")


KL_16 = KLConfig()


def sample_posterior(moments: jax.Array, key: jax.Array | None) -> jax.Array:
    """moments [..., 2e] -> a posterior sample (the mean when key is None)."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    if key is None:
        return mean
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


def kl_divergence(moments: jax.Array) -> jax.Array:
    """KL(posterior || N(0, I)) per element, averaged."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    return 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)


class KLVAE(nnx.Module):
    def __init__(self, cfg: KLConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        e = cfg.embed_dim
        with conv_dtypes(cfg):
            self.encoder = Encoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, 2 * e,
                                   cfg.norm_groups, AttnBlock, rngs=rngs)
            self.decoder = Decoder(cfg.ch, cfg.ch_mult, cfg.num_res_blocks, e, cfg.norm_groups,
                                   AttnBlock, level_attn=False, rngs=rngs)
            self.quant_conv = conv2d(2 * e, 2 * e, 1, rngs, padding=0, float32=True)
            self.post_quant_conv = conv2d(e, e, 1, rngs, padding=0)

    def moments(self, images: jax.Array) -> jax.Array:
        """[B, H, W, 3] -> float32 [B, h, w, 2 * embed_dim] (mean, logvar)."""
        return self.quant_conv(self.encoder(images))

    def decode_raw(self, z: jax.Array) -> jax.Array:
        """Unscaled latents -> float32 images (not clamped)."""
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def decode(self, latents: jax.Array, scale: float) -> jax.Array:
        """Scaled latents (what generators produce) -> images in [-1, 1]."""
        return jnp.clip(self.decode_raw(latents / scale), -1, 1)

    def __call__(self, images: jax.Array, key: jax.Array):
        """Training: reconstruction of a posterior sample and the KL term."""
        moments = self.moments(images)
        return self.decode_raw(sample_posterior(moments, key)), {"kl": kl_divergence(moments)}
