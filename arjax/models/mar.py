"""MAR (Li et al. 2024): masked autoregression over continuous tokens with a diffusion head.

The latent X [B, s, s, C] of a KL-VAE (scaled) is a sequence of L = s^2 tokens generated in a
random order, several at a time. An MAE-style ViT sees the known tokens (`z_proj`) after 64
buffer positions holding the class embedding (or the learned `fake_latent`: label dropout and
the CFG null), with learned positions and a LayerNorm; its decoder fills the unknown positions
with `mask_token` and gives one condition vector z per token. A small MLP (SimpleMLPAdaLN,
AdaLN from t_emb + cond_embed(z)) is the denoiser of a per-token Gaussian diffusion
(`arjax.diffusion`): trained with MSE + VLB on the masked tokens only, sampled by its reverse
chain.

Blocks are timm ViT blocks: pre-LayerNorm (eps 1e-6), MHSA with qkv bias, GELU (erf) MLP x4,
bidirectional attention. The official encoder drops the masked tokens (each row keeps the same
number, which changes every step); here the known tokens are gathered into an input of a static
size `cap` (any extra positions masked as attention keys), which gives them exactly the same
outputs with static shapes.
Module names follow the official state_dict (see `arjax.convert.mar` for the few renames).
Shapes: B batch, L tokens, P buffer, D width, w head width, C token channels.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.config import check
from arjax.diffusion import SCHEDULES, Diffusion
from arjax.nn.attention import attend
from arjax.nn.layers import Linear, TimestepEmbedder, dropout
from arjax.nn.policy import check_policy, dtypes, float32, run_blocks


@dataclasses.dataclass(frozen=True)
class MARConfig:
    width: int = 768
    depth: int = 12  # blocks of the encoder and of the decoder each
    heads: int = 12
    mlp_ratio: float = 4.0
    head_width: int = 1024  # diffusion MLP width (diffloss_w)
    head_depth: int = 6  # diffusion MLP residual blocks (diffloss_d)
    side: int = 16  # latent side: L = side^2 tokens (256 px / stride 16, patch 1)
    token_dim: int = 16  # latent channels
    buffer_size: int = 64
    num_classes: int = 1000
    label_drop: float = 0.1
    mask_ratio_min: float = 0.7  # mask ratio ~ N(1, 0.25) truncated to [min, 1]
    dropout: float = 0.1  # attention and projection dropout (training)
    diffusion_batch_mul: int = 4  # each masked token's loss with this many (t, eps) draws
    dtype: str = "float32"  # see arjax.nn.policy
    param_dtype: str = "float32"
    remat: str = "none"  # per-block rematerialisation (trunk and diffusion MLP)
    scan_layers: bool = False  # trunk and diffusion MLP as lax.scan over blocks (compile time)
    noise_schedule: str = "cosine"  # the head's diffusion (arjax.diffusion.SCHEDULES)

    @property
    def seq_len(self) -> int:
        return self.side * self.side

    def validate(self) -> None:
        check(self.width % self.heads == 0,
              f"MAR width {self.width} must be divisible by heads {self.heads}")
        check(self.buffer_size >= 1, "buffer_size must be >= 1 (the class embedding sits "
              "there; it is the one token every row attends to)")
        check(0 < self.mask_ratio_min <= 1, f"mask_ratio_min must be in (0, 1], got "
              f"{self.mask_ratio_min}")
        check(0 <= self.label_drop < 1 and 0 <= self.dropout < 1,
              "label_drop and dropout must be in [0, 1)")
        check(self.diffusion_batch_mul >= 1, "diffusion_batch_mul must be >= 1")
        check(self.noise_schedule in SCHEDULES, f"noise_schedule={self.noise_schedule!r} "
              f"must be one of {sorted(SCHEDULES)}")
        check_policy(self)


def mar_config(size: str, **overrides) -> MARConfig:
    """Official MAR-B / L / H (207.9 / 478.3 / 942.4 M parameters)."""
    sizes = {"B": dict(width=768, depth=12, heads=12, head_width=1024, head_depth=6),
             "L": dict(width=1024, depth=16, heads=16, head_width=1280, head_depth=8),
             "H": dict(width=1280, depth=20, heads=16, head_width=1536, head_depth=12)}
    check(size in sizes, f"MAR size must be one of {sorted(sizes)}, got {size!r}")
    return MARConfig(**{**sizes[size], **overrides})


@functools.cache
def diffusion(schedule: str = "cosine", sampling_steps: int | None = None) -> Diffusion:
    """MAR's 1000-step process (training), or its respacing for sampling."""
    return Diffusion.make(schedule, 1000, sampling_steps)


XAVIER = nnx.initializers.xavier_uniform()  # every Linear (official JAX-ViT init), zero bias


def _linear(cin, cout, kw, rngs, init=XAVIER):
    return Linear(cin, cout, rngs=rngs, kernel_init=init, **kw)


def _layer_norm(dim, cfg, affine=True):
    return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=affine, use_scale=affine,
                         dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
                         rngs=nnx.Rngs(0))


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        self.heads = cfg.heads
        self.qkv = _linear(cfg.width, 3 * cfg.width, dtypes(cfg), rngs)
        self.proj = _linear(cfg.width, cfg.width, dtypes(cfg), rngs)

    def __call__(self, x, visible, rate=0.0, key=None):
        """x [B, T, D]; visible [B, T] bool: the keys every query may attend to."""
        b, t, c = x.shape
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads), 2, 0)
        k1, k2 = _keys(key, 2)
        mask = None if visible is None else visible[:, None, :]
        out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask,
                     dropout=None if k1 is None else (k1, rate))
        return dropout(self.proj(out.reshape(b, t, c)), rate, k2)


class Mlp(nnx.Module):
    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = _linear(cfg.width, hidden, dtypes(cfg), rngs)
        self.fc2 = _linear(hidden, cfg.width, dtypes(cfg), rngs)

    def __call__(self, x, rate=0.0, key=None):
        k1, k2 = _keys(key, 2)
        h = dropout(jax.nn.gelu(self.fc1(x), approximate=False), rate, k1)
        return dropout(self.fc2(h), rate, k2)


class Block(nnx.Module):
    """timm ViT block; the residual stream stays float32."""

    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        self.rate = cfg.dropout
        self.norm1 = _layer_norm(cfg.width, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = _layer_norm(cfg.width, cfg)
        self.mlp = Mlp(cfg, rngs=rngs)

    def __call__(self, x, visible, key=None):
        k1, k2 = _keys(key, 2)
        x = x + self.attn(self.norm1(x), visible, self.rate, k1)
        return x + self.mlp(self.norm2(x), self.rate, k2)


class ResBlock(nnx.Module):
    def __init__(self, width: int, cfg: MARConfig, *, rngs: nnx.Rngs):
        self.in_ln = _layer_norm(width, cfg)
        self.mlp_0 = _linear(width, width, dtypes(cfg), rngs)
        self.mlp_2 = _linear(width, width, dtypes(cfg), rngs)
        self.adaLN_modulation = _linear(width, 3 * width, float32(cfg), rngs,
                                        nnx.initializers.zeros_init())

    def modulation(self, y):
        return self.adaLN_modulation(jax.nn.silu(y))

    def modulated(self, x, mod):
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = self.mlp_2(jax.nn.silu(self.mlp_0(self.in_ln(x) * (1 + scale) + shift)))
        return x + gate * h

    def __call__(self, x, y):
        return self.modulated(x, self.modulation(y))


class FinalLayer(nnx.Module):
    def __init__(self, width: int, out: int, cfg: MARConfig, *, rngs: nnx.Rngs):
        zeros = nnx.initializers.zeros_init()
        self.norm_final = _layer_norm(width, cfg, affine=False)
        self.linear = _linear(width, out, float32(cfg), rngs, zeros)
        self.adaLN_modulation = _linear(width, 2 * width, float32(cfg), rngs, zeros)

    def modulation(self, y):
        return self.adaLN_modulation(jax.nn.silu(y))

    def modulated(self, x, mod):
        shift, scale = jnp.split(mod, 2, axis=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)

    def __call__(self, x, y):
        return self.modulated(x, self.modulation(y))


class DiffusionMLP(nnx.Module):
    """SimpleMLPAdaLN: (x_t [N, C], t [N] original timestep index, z [N, D]) -> [eps ; v]
    [N, 2C] in float32. Upstream `diffloss.net`."""

    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        w = cfg.head_width
        self.remat, self.scan = cfg.remat, cfg.scan_layers
        self.time_embed = TimestepEmbedder(w, float32(cfg), nnx.initializers.normal(0.02),
                                           rngs=rngs)
        self.cond_embed = _linear(cfg.width, w, dtypes(cfg), rngs)
        self.input_proj = _linear(cfg.token_dim, w, float32(cfg), rngs)
        self.res_blocks = nnx.List([ResBlock(w, cfg, rngs=rngs) for _ in range(cfg.head_depth)])
        self.final_layer = FinalLayer(w, 2 * cfg.token_dim, cfg, rngs=rngs)

    def condition(self, z):
        """cond_embed(z): depends on z only, so computed once per chain when sampling."""
        return self.cond_embed(z).astype(jnp.float32)

    def denoise(self, x, t, c):
        y = self.time_embed(t) + c
        h = self.input_proj(x.astype(jnp.float32))
        h = run_blocks(self.res_blocks, lambda blk, h: blk(h, y), h, remat=self.remat,
                       scan=self.scan)
        return self.final_layer(h, y).astype(jnp.float32)

    def modulations(self, t, c):
        """Timesteps t [K] and conditions c [N, w] (`condition`) -> every layer's AdaLN
        modulation at each (step, row), [K, N, .] each. They depend on (t, z) only, so a
        sampler computes a run of steps' modulations as one large matmul instead of streaming
        the AdaLN weights (60 % of the head's) through a few-row matmul at every step."""
        y = self.time_embed(t)[:, None] + c[None]
        return [layer.modulation(y) for layer in (*self.res_blocks, self.final_layer)]

    def denoise_modulated(self, x, mods):
        """`denoise` of x [N, C] given one step's `modulations` (each [N, .])."""
        h = self.input_proj(x.astype(jnp.float32))
        for block, mod in zip(self.res_blocks, mods):
            h = block.modulated(h, mod)
        return self.final_layer.modulated(h, mods[-1]).astype(jnp.float32)

    def __call__(self, x, t, z):
        return self.denoise(x, t, self.condition(z))


class MAR(nnx.Module):
    def __init__(self, cfg: MARConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        d, length = cfg.width, cfg.seq_len + cfg.buffer_size
        f32, pdt = float32(cfg), jnp.dtype(cfg.param_dtype)
        normal = lambda *shape: nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), shape)).astype(pdt))
        self.class_emb = nnx.Embed(cfg.num_classes, d, rngs=rngs, **f32,
                                   embedding_init=nnx.initializers.normal(0.02))
        self.fake_latent = normal(1, d)
        self.z_proj = _linear(cfg.token_dim, d, f32, rngs)
        self.z_proj_ln = _layer_norm(d, cfg)
        self.encoder_pos_embed_learned = normal(1, length, d)
        self.encoder_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.encoder_norm = _layer_norm(d, cfg)
        self.decoder_embed = _linear(d, d, dtypes(cfg), rngs)
        self.mask_token = normal(1, 1, d)
        self.decoder_pos_embed_learned = normal(1, length, d)
        self.decoder_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.decoder_norm = _layer_norm(d, cfg)
        self.diffusion_pos_embed_learned = normal(1, cfg.seq_len, d)
        self.diffloss = DiffusionMLP(cfg, rngs=rngs)

    def conditioning(self, labels, null=None):
        """Class embeddings [B, D]; rows where `null` is True get `fake_latent`."""
        cond = self.class_emb(labels)
        if null is None:
            return cond
        return jnp.where(null[:, None], self.fake_latent[...].astype(jnp.float32), cond)

    def __call__(self, tokens, known, cond, *, key=None, cap: int | None = None):
        """tokens [B, L, C] (values at unknown positions are ignored), known [B, L] bool,
        cond [B, D] -> z [B, L, D], the diffusion condition of every token. With `key`,
        dropout is on (training). `cap`: the encoder runs on the buffer and only `cap`
        positions, the known ones first (any extra ones are masked as keys), as the official
        code drops the unknown tokens; it must be >= the known count of every row (the
        samplers' schedule and the training mask ratio bound it statically)."""
        cfg = self.cfg
        b, p = tokens.shape[0], cfg.buffer_size
        pos = lambda a: a[...].astype(jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cond[:, None], (b, p, cfg.width)),
                             self.z_proj(tokens)], axis=1)
        x = self.z_proj_ln(x + pos(self.encoder_pos_embed_learned))
        if cap is None:
            kept, kept_known = None, known
        else:  # the known positions first (a stable sort keeps the rest in place after them)
            kept = jnp.argsort(~known, axis=1, stable=True)[:, :cap]
            kept_known = jnp.take_along_axis(known, kept, axis=1)
            x = jnp.concatenate([x[:, :p], jnp.take_along_axis(x, p + kept[..., None], 1)], 1)
        visible = jnp.concatenate([jnp.ones((b, p), bool), kept_known], axis=1)
        keys = _keys(key, 2 * cfg.depth)
        policy = dict(remat=cfg.remat, scan=cfg.scan_layers)
        x = run_blocks(self.encoder_blocks, lambda blk, h, k: blk(h, visible, k), x,
                       keys[:cfg.depth], **policy)
        x = self.decoder_embed(self.encoder_norm(x))
        x = jnp.where(visible[..., None], x, self.mask_token[...].astype(x.dtype))
        if kept is not None:  # back to the full sequence, mask tokens elsewhere
            full = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, p + known.shape[1],
                                                                          cfg.width))
            rows = jnp.arange(b)[:, None]
            x = full.at[:, :p].set(x[:, :p]).at[rows, p + kept].set(x[:, p:])
        x = x + pos(self.decoder_pos_embed_learned)
        x = run_blocks(self.decoder_blocks, lambda blk, h, k: blk(h, None, k), x,
                       keys[cfg.depth:], **policy)
        return self.decoder_norm(x)[:, p:] + pos(self.diffusion_pos_embed_learned)

    @property
    def training_cap(self) -> int:
        """The most tokens a training mask leaves known: L - ceil(L * mask_ratio_min)."""
        return self.cfg.seq_len - math.ceil(self.cfg.seq_len * self.cfg.mask_ratio_min)

    def loss(self, labels, latents, key):
        """MAR's training loss: latents [B, s, s, C] scaled; one mask ratio per batch, random
        orders per row, the diffusion loss on the masked tokens only, each repeated
        `diffusion_batch_mul` times with its own t and noise."""
        cfg = self.cfg
        b, length = latents.shape[0], cfg.seq_len
        tokens = latents.reshape(b, length, -1)
        k_order, k_ratio, k_drop, k_trunk, k_diff = jax.random.split(key, 5)
        lower = (cfg.mask_ratio_min - 1.0) / 0.25
        ratio = 1.0 + 0.25 * jax.random.truncated_normal(k_ratio, lower, 0.0)
        masked = random_ranks(k_order, b, length) < jnp.ceil(length * ratio)
        cond = self.conditioning(labels, jax.random.bernoulli(k_drop, cfg.label_drop, (b,)))
        z = self(tokens, ~masked, cond, key=k_trunk, cap=max(self.training_cap, 1))
        rep = lambda a: jnp.tile(a.reshape(b * length, *a.shape[2:]),
                                 (cfg.diffusion_batch_mul,) + (1,) * (a.ndim - 2))
        weight = rep(masked).astype(jnp.float32)
        per_token = diffusion(cfg.noise_schedule).loss(
            functools.partial(self.diffloss, z=rep(z)), rep(tokens), k_diff)
        loss = jnp.sum(per_token * weight) / jnp.maximum(jnp.sum(weight), 1.0)
        return loss, {"mask_ratio": jnp.mean(masked.astype(jnp.float32))}


def random_ranks(key: jax.Array, batch: int, length: int) -> jax.Array:
    """Each position's place in a uniformly random generation order, per row: int [B, L]
    (the order itself is argsort of the ranks)."""
    return jnp.argsort(jnp.argsort(jax.random.uniform(key, (batch, length)), axis=-1), axis=-1)
