"""FlowAR (Ren et al. 2025): scale-wise AR transformer + a per-scale flow-matching head.

The latent X [B, s, s, C] of a KL-VAE (scaled) is modelled coarse-to-fine at `scales`
(1, 2, 4, 8, 16): level k is X area-downsampled to side n_k (a full latent, not a residual).
The trunk sees the class embedding (token 0) and, for scale k > 0, level k-1 bicubically
upsampled to side s and area-downsampled to n_k, projected by `z_proj`; it is block-causal over
scales and produces one condition vector per token. The flow head ("flownet", a small
transformer inside the scale) transports noise (t = 1) to level k (t = 0) along the straight
path x_t = (1 - t) x + t eps, predicting the velocity eps - x from that condition.

Trunk blocks: AdaLN from the class embedding (gates, scales, shifts in the order g1, g2, s1,
s2, b1, b2), weightless float32 RMSNorm (eps 1e-6), qkv with bias, GeGLU MLP (timm SwiGLU with
exact GELU, hidden int(4 D * 2 / 3)), 2D RoPE applied per scale on that scale's grid with
positions i * s / n (so every scale spans the same range). The head's blocks are modulated per
token by SiLU(t_emb + c); `cross` (FlowAR-L/H) adds cross-attention from the head to the
trunk's vectors. The head's timestep is truncated to an integer of t * 1000 (official).
Module names follow the official state_dict (`encoder_blocks.{i}`, `flownet.res_blocks.{j}`);
see `arjax.convert.flowar` for the few renames. Shapes: B batch, L = sum n_k^2 tokens, D trunk
width, w head width, C latent channels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.config import check
from arjax.nn.attention import attend
from arjax.nn.layers import Linear, RMSNorm, TimestepEmbedder, dropout
from arjax.nn.policy import check_policy, decode_blocks, dtypes, float32, run_blocks
from arjax.nn.resize import resize
from arjax.nn.rope import apply_rope, rope_2d_table
from arjax.nn.scales import (
    attend_scale,
    block_causal_mask,
    init_scale_cache,
    scale_bounds,
)


@dataclasses.dataclass(frozen=True)
class FlowARConfig:
    width: int = 768
    depth: int = 6  # blocks in each of the two trunk stacks (encoder, decoder)
    heads: int = 12
    mlp_ratio: float = 4.0
    head_width: int = 1024  # flow head width (diffloss_w); its heads have dim 64
    head_depth: int = 2  # flow head blocks (diffloss_d)
    cross: bool = False  # flow head blocks with cross-attention to the trunk (FlowAR-L/H)
    scales: tuple[int, ...] = (1, 2, 4, 8, 16)
    token_dim: int = 16  # latent channels
    num_classes: int = 1000
    label_drop: float = 0.1
    dropout: float = 0.1  # trunk attention and projection dropout (training)
    dtype: str = "float32"  # matmul/attention compute and KV caches; see arjax.nn.policy
    param_dtype: str = "float32"
    remat: str = "none"  # per-block rematerialisation (trunk and flow head): none|full|dots
    scan_layers: bool = False  # uncached passes as lax.scan over the blocks (compile time)

    @property
    def seq_len(self) -> int:
        return sum(n * n for n in self.scales)

    @property
    def side(self) -> int:
        return self.scales[-1]

    def validate(self) -> None:
        check(self.width % self.heads == 0 and (self.width // self.heads) % 4 == 0,
              f"FlowAR width {self.width} / heads {self.heads} must give a head dim divisible "
              "by 4 (2D RoPE)")
        check(self.head_width % 64 == 0, f"head_width must be a multiple of 64, got "
              f"{self.head_width}")
        check(self.scales[0] == 1 and all(a < b for a, b in zip(self.scales, self.scales[1:])),
              f"scales must start at 1 and increase, got {self.scales}")
        check(0 <= self.label_drop < 1 and 0 <= self.dropout < 1,
              "label_drop and dropout must be in [0, 1)")
        check_policy(self)


def flowar_config(size: str, **overrides) -> FlowARConfig:
    """Official FlowAR-S / L / H (171.7 / 586.9 / 1913.3 M parameters)."""
    sizes = {"S": dict(width=768, depth=6, heads=12, head_width=1024, head_depth=2),
             "L": dict(width=1024, depth=8, heads=16, head_width=1024, head_depth=12,
                       cross=True),
             "H": dict(width=1536, depth=15, heads=16, head_width=1536, head_depth=12,
                       cross=True)}
    check(size in sizes, f"FlowAR size must be one of {sorted(sizes)}, got {size!r}")
    return FlowARConfig(**{**sizes[size], **overrides})


def rope_tables(scales, head_dim: int) -> list[np.ndarray]:
    """One [n^2, hd/2, 2] table per scale, positions i * side / n."""
    return [rope_2d_table(n, head_dim, prefix=0, span=scales[-1]) for n in scales]


def pyramid(latents: jax.Array, scales) -> list[jax.Array]:
    """latents [B, s, s, C] -> level k = area-downsampled to n_k ([B, n_k, n_k, C])."""
    return [latents if n == latents.shape[1] else resize(latents, n, "area") for n in scales]


def next_input(level: jax.Array, side: int, n_next: int) -> jax.Array:
    """The trunk input of the next scale: level bicubic -> side, area -> n_next; [B, n^2, C]."""
    x = resize(resize(level, side, "bicubic"), n_next, "area")
    return x.reshape(x.shape[0], n_next * n_next, -1)


def teacher_inputs(latents: jax.Array, scales) -> tuple[list[jax.Array], jax.Array]:
    """(targets per scale [B, n_k^2, C], trunk inputs for scales 1.. [B, L - 1, C])."""
    levels = pyramid(latents, scales)
    targets = [lv.reshape(lv.shape[0], -1, lv.shape[-1]) for lv in levels]
    side = latents.shape[1]
    inputs = [next_input(levels[k], side, n) for k, n in enumerate(scales[1:])]
    return targets, jnp.concatenate(inputs, axis=1)


def flow_matching_loss(velocity, x: jax.Array, key: jax.Array) -> jax.Array:
    """Per-sample MSE of `velocity(x_t, t)` to eps - x on the straight path
    x_t = (1 - t) x + t eps, t ~ U(0, 1) per sample (t = 1 is noise); x [B, ...]."""
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (x.shape[0],))
    eps = jax.random.normal(k_eps, x.shape)
    tb = t.reshape(-1, *[1] * (x.ndim - 1))
    err = velocity((1 - tb) * x + tb * eps, t) - (eps - x)
    return jnp.mean(err**2, axis=tuple(range(1, x.ndim)))


def rms(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """RMSNorm without weight, in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)


def _linear(cin, cout, kw, rngs, bias=True):
    """Official init: every Linear xavier-uniform with zero bias (FlowAR's final `apply` also
    re-initialises the flow head's, so its output layer is not zero at init). `kw`: dtypes
    (`arjax.nn.policy.dtypes` for matmuls in the compute dtype, `float32` for AdaLN/heads)."""
    return Linear(cin, cout, use_bias=bias, rngs=rngs, **kw,
                  kernel_init=nnx.initializers.xavier_uniform())


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


class Mlp(nnx.Module):
    """timm SwiGLU with exact GELU: fc2(gelu(fc1_g x) * fc1_x x), all with biases."""

    def __init__(self, dim: int, ratio: float, kw: dict, *, rngs: nnx.Rngs):
        hidden = int(dim * ratio * 2 / 3)
        self.fc1_g = _linear(dim, hidden, kw, rngs)
        self.fc1_x = _linear(dim, hidden, kw, rngs)
        self.fc2 = _linear(hidden, dim, kw, rngs)

    def __call__(self, x, rate=0.0, key=None):
        k1, k2 = _keys(key, 2)
        h = dropout(jax.nn.gelu(self.fc1_g(x), approximate=False) * self.fc1_x(x), rate, k1)
        return dropout(self.fc2(h), rate, k2)


class SelfAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, kw: dict, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = _linear(dim, 3 * dim, kw, rngs, bias=qkv_bias)
        self.proj = _linear(dim, dim, kw, rngs)

    def _qkv(self, x, rope):
        b, t, c = x.shape
        qkv = self.qkv(x)
        q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, self.heads, c // self.heads), 2, 0)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x, rope, mask=None, rate=0.0, key=None):
        q, k, v = self._qkv(x, rope)
        k1, k2 = _keys(key, 2)
        out = attend(q, k, v, mask, dropout=None if k1 is None else (k1, rate))
        return dropout(self.proj(out.reshape(x.shape)), rate, k2)

    def decode(self, x, rope, cache, begin: int, end: int):
        """One scale's tokens (positions begin..end-1, static) against the cache."""
        out, cache = attend_scale(*self._qkv(x, rope), cache, begin, end)
        return self.proj(out.reshape(x.shape)), cache


class Block(nnx.Module):
    """Trunk block, AdaLN from the class embedding (`ada_lin` = SiLU -> Linear upstream)."""

    def __init__(self, cfg: FlowARConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        self.rate = cfg.dropout
        self.attn = SelfAttention(d, cfg.heads, True, dtypes(cfg), rngs=rngs)
        self.mlp = Mlp(d, cfg.mlp_ratio, dtypes(cfg), rngs=rngs)
        self.ada_lin = _linear(d, 6 * d, float32(cfg), rngs)

    def _residual(self, x, cond, attn, key=None):
        g1, g2, s1, s2, b1, b2 = jnp.moveaxis(
            self.ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 6, -1), 2, 0)
        out, aux = attn(rms(x) * (1 + s1) + b1)
        x = x + g1 * out  # the residual stream stays float32 (gates are)
        return x + g2 * self.mlp(rms(x) * (1 + s2) + b2, self.rate, key), aux

    def __call__(self, x, cond, rope, mask, key=None):
        k1, k2 = _keys(key, 2)
        attn = lambda h: (self.attn(h, rope, mask, self.rate, k1), None)
        return self._residual(x, cond, attn, k2)[0]

    def decode(self, x, cond, rope, cache, begin: int, end: int):
        return self._residual(x, cond, lambda h: self.attn.decode(h, rope, cache, begin, end))


class CrossAttention(nnx.Module):
    """Head tokens attend to the trunk vectors of the same scale (same grid, RoPE on both)."""

    def __init__(self, dim: int, z_dim: int, heads: int, kw: dict, *, rngs: nnx.Rngs):
        self.heads = heads
        self.q = _linear(dim, dim, kw, rngs, bias=False)
        self.kv = _linear(z_dim, 2 * dim, kw, rngs, bias=False)
        self.proj = _linear(dim, dim, kw, rngs)

    def context(self, z, rope):
        """k, v from the trunk vectors: fixed over the ODE steps, so computed once a scale."""
        b, n, _ = z.shape
        k, v = jnp.moveaxis(self.kv(z).reshape(b, n, 2, self.heads, -1), 2, 0)
        return apply_rope(k, rope).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x, kv, rope):
        b, n, c = x.shape
        q = apply_rope(self.q(x).reshape(b, n, self.heads, -1), rope)
        return self.proj(attend(q, *kv, None).reshape(b, n, c))


class HeadBlock(nnx.Module):
    """Block_v1 (no cross-attention): all six modulations per token from SiLU(t_emb + c)."""

    def __init__(self, width: int, z_dim: int, cfg: FlowARConfig, *, rngs: nnx.Rngs):
        self.attn = SelfAttention(width, width // 64, False, dtypes(cfg), rngs=rngs)
        self.mlp = Mlp(width, 4.0, dtypes(cfg), rngs=rngs)
        self.ada_lin = _linear(width, 6 * width, float32(cfg), rngs)

    def context(self, z, rope):
        return None

    def __call__(self, x, temb, c, ctx, rope):
        mods = self.ada_lin(jax.nn.silu(temb + c)).reshape(*c.shape[:2], 6, -1)
        g1, g2, s1, s2, b1, b2 = jnp.moveaxis(mods, 2, 0)
        x = x + g1 * self.attn(rms(x) * (1 + s1) + b1, rope)
        return x + g2 * self.mlp(rms(x) * (1 + s2) + b2)


class CrossHeadBlock(nnx.Module):
    """Block_v2: attention modulated per sample by SiLU(t_emb), cross-attention to the trunk
    vectors (weighted RMSNorms on both sides), MLP modulated per token by SiLU(c + t_emb)."""

    def __init__(self, width: int, z_dim: int, cfg: FlowARConfig, *, rngs: nnx.Rngs):
        kw, pdt = dtypes(cfg), jnp.dtype(cfg.param_dtype)
        self.attn = SelfAttention(width, width // 64, False, kw, rngs=rngs)
        self.crossattn = CrossAttention(width, z_dim, width // 64, kw, rngs=rngs)
        self.norm2_1 = RMSNorm(width, 1e-6, pdt)
        self.norm2_2 = RMSNorm(z_dim, 1e-6, pdt)
        self.mlp = Mlp(width, 4.0, kw, rngs=rngs)
        self.ada_lin_attn = _linear(width, 3 * width, float32(cfg), rngs)
        self.ada_lin_mlp = _linear(width, 3 * width, float32(cfg), rngs)

    def context(self, z, rope):
        return self.crossattn.context(self.norm2_2(z), rope)

    def __call__(self, x, temb, c, ctx, rope):
        split3 = lambda m: jnp.moveaxis(m.reshape(*m.shape[:2], 3, -1), 2, 0)
        g1, s1, b1 = split3(self.ada_lin_attn(jax.nn.silu(temb)))
        g2, s2, b2 = split3(self.ada_lin_mlp(jax.nn.silu(c + temb)))
        x = x + g1 * self.attn(rms(x) * (1 + s1) + b1, rope)
        x = x + self.crossattn(self.norm2_1(x), ctx, rope)
        return x + g2 * self.mlp(rms(x) * (1 + s2) + b2)


class FinalLayer(nnx.Module):
    def __init__(self, width: int, out: int, kw: dict, *, rngs: nnx.Rngs):
        self.linear = _linear(width, out, kw, rngs)
        self.adaLN_modulation = _linear(width, 2 * width, kw, rngs)

    def __call__(self, x, c):
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(rms(x) * (1 + scale) + shift)


class FlowHead(nnx.Module):
    """v(x_t, t | z): x [B, n, C], t [B] in [0, 1], z [B, n, D] (one scale's trunk vectors)."""

    def __init__(self, cfg: FlowARConfig, *, rngs: nnx.Rngs):
        w, f32 = cfg.head_width, float32(cfg)
        self.remat, self.scan = cfg.remat, cfg.scan_layers
        self.time_embed = TimestepEmbedder(w, f32, nnx.initializers.xavier_uniform(), rngs=rngs)
        self.cond_embed = _linear(cfg.width, w, dtypes(cfg), rngs)
        self.input_proj = _linear(cfg.token_dim, w, f32, rngs)
        block = CrossHeadBlock if cfg.cross else HeadBlock
        self.res_blocks = nnx.List([block(w, cfg.width, cfg, rngs=rngs)
                                    for _ in range(cfg.head_depth)])
        self.final_layer = FinalLayer(w, cfg.token_dim, f32, rngs=rngs)

    def context(self, z, rope):
        """Everything that depends on z only (computed once per scale when sampling)."""
        return {"c": self.cond_embed(z).astype(jnp.float32),
                "blocks": [b.context(z, rope) for b in self.res_blocks]}

    def velocity(self, x, t, ctx, rope):
        """Float32 in and out (the ODE state); the blocks' matmuls in the compute dtype."""
        temb = self.time_embed(jnp.floor(t.astype(jnp.float32) * 1000))[:, None]
        h = self.input_proj(x)
        h = run_blocks(self.res_blocks, lambda blk, h, bctx: blk(h, temb, ctx["c"], bctx, rope),
                       h, ctx["blocks"], remat=self.remat, scan=self.scan)
        return self.final_layer(h, ctx["c"] + temb)

    def __call__(self, x, t, z, rope):
        return self.velocity(x, t, self.context(z, rope), rope)


class FlowAR(nnx.Module):
    def __init__(self, cfg: FlowARConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        d, length = cfg.width, cfg.seq_len
        f32, pdt = float32(cfg), jnp.dtype(cfg.param_dtype)
        normal = lambda: nnx.Param((0.02 * jax.random.normal(rngs.params(), (1, length, d))
                                    ).astype(pdt))
        self.class_emb = nnx.Embed(cfg.num_classes + 1, d, rngs=rngs, **f32,
                                   embedding_init=nnx.initializers.normal(0.02))
        self.z_proj = _linear(cfg.token_dim, d, f32, rngs)
        self.z_proj_ln = RMSNorm(d, 1e-6, pdt)
        self.encoder_pos_embed_learned = normal()
        self.encoder_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.encoder_norm = RMSNorm(d, 1e-6, pdt)
        self.decoder_embed = _linear(d, d, dtypes(cfg), rngs)
        self.decoder_pos_embed_learned = normal()
        self.decoder_blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.decoder_norm = RMSNorm(d, 1e-6, pdt)
        self.diffusion_pos_embed_learned = normal()
        self.flownet = FlowHead(cfg, rngs=rngs)

    @property
    def head_ropes(self) -> list[np.ndarray]:
        return rope_tables(self.cfg.scales, 64)

    def _trunk(self, x, cond, begin: int, stack):
        """Embedded tokens x [B, n, D] at positions begin.. through both stacks;
        `stack(blocks, first, x) -> x` runs one stack whose first block is layer `first` of
        the two (full or cached)."""
        end = begin + x.shape[1]
        pos = lambda p: p[:, begin:end].astype(jnp.float32)
        x = self.z_proj_ln(x + pos(self.encoder_pos_embed_learned))
        x = stack(self.encoder_blocks, 0, x)
        x = self.decoder_embed(self.encoder_norm(x)) + pos(self.decoder_pos_embed_learned)
        x = stack(self.decoder_blocks, self.cfg.depth, x)
        return self.decoder_norm(x) + pos(self.diffusion_pos_embed_learned)

    def drop_labels(self, labels, key):
        drop = jax.random.bernoulli(key, self.cfg.label_drop, labels.shape)
        return jnp.where(drop, self.cfg.num_classes, labels)

    def __call__(self, labels, inputs, *, key=None):
        """Teacher forcing: labels [B] (already label-dropped), inputs [B, L - 1, C] ->
        trunk vectors z [B, L, D]. With `key`, dropout is on (training)."""
        cfg = self.cfg
        cond = self.class_emb(labels)
        x = jnp.concatenate([cond[:, None], self.z_proj(inputs)], axis=1)
        mask = jnp.asarray(block_causal_mask(cfg.scales))
        rope = jnp.asarray(np.concatenate(rope_tables(cfg.scales, cfg.width // cfg.heads)))
        keys = _keys(key, 2 * cfg.depth)
        call = lambda blk, h, k: blk(h, cond, rope, mask, k)
        return self._trunk(x, cond, 0, lambda blocks, first, h: run_blocks(
            blocks, call, h, keys[first:first + cfg.depth], remat=cfg.remat,
            scan=cfg.scan_layers))

    def loss(self, labels, latents, key):
        """Flow-matching loss (training): latents [B, s, s, C] scaled; per scale a uniform t
        per sample, MSE to the velocity eps - x, weighted by n_k^2 / s^2 and summed."""
        cfg = self.cfg
        k_drop, k_trunk, k_flow = jax.random.split(key, 3)
        targets, inputs = teacher_inputs(latents, cfg.scales)
        z = self(self.drop_labels(labels, k_drop), inputs, key=k_trunk)
        total, per_scale = 0.0, {}
        for k, ((begin, end), rope) in enumerate(zip(scale_bounds(cfg.scales),
                                                     self.head_ropes)):
            velocity = functools.partial(self.flownet, z=z[:, begin:end],
                                         rope=jnp.asarray(rope))
            mse = flow_matching_loss(velocity, targets[k], jax.random.fold_in(k_flow, k))
            per_scale[f"scale_{cfg.scales[k]}"] = jnp.mean(mse)
            total += per_scale[f"scale_{cfg.scales[k]}"] * (end - begin) / cfg.side**2
        return total, per_scale

    def init_cache(self, batch: int):
        cfg = self.cfg
        return init_scale_cache(batch, cfg.heads, cfg.seq_len, cfg.width // cfg.heads,
                                2 * cfg.depth, jnp.dtype(cfg.dtype))

    def embed(self, cond, inputs, scale: int):
        """Scale 0: the class embedding; later: z_proj(next input [B, n^2, C])."""
        return cond[:, None] if scale == 0 else self.z_proj(inputs)

    def decode_scale(self, x, cond, cache, scale: int):
        """One scale's embedded tokens [B, n^2, D] against the cache -> (z, cache)."""
        cfg = self.cfg
        begin, end = scale_bounds(cfg.scales)[scale]
        rope = jnp.asarray(rope_tables(cfg.scales, cfg.width // cfg.heads)[scale])
        new_cache = list(cache)

        def stack(blocks, first, h):
            last = first + len(blocks)
            h, new_cache[first:last] = decode_blocks(
                blocks, cache[first:last],
                lambda blk, h, c: blk.decode(h, cond, rope, c, begin, end), h,
                span=(begin, end), scan=cfg.scan_layers)
            return h
        return self._trunk(x, cond, begin, stack), new_cache
