"""VAR (Tian et al. 2024): class-conditional next-scale prediction over multi-scale VQ codes.

Token 0 is the start token (class embedding + pos_start); tokens of scale k > 0 embed the
running reconstruction f_hat after scales < k, area-downsampled to scale k's side. All tokens of
a scale are predicted in parallel; the attention mask is block-causal over scales (a token sees
its own and all coarser scales). Blocks are pre-norm with AdaLN from the class (gates, scales,
shifts in the official order g1, g2, s1, s2, b1, b2), q/k are L2-normalised per head with a
learned log-scale (capped at ln 100) and softmax scale 1, FFN uses tanh-GELU, and the head is
AdaLN-modulated in float32. Module names follow the official `var_d{16,20,24,30}.pth`.
Shapes: B batch, L = sum(pn^2) tokens, C width, V codebook size, Cv code dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.config import check
from arjax.nn.attention import attend
from arjax.nn.layers import Linear
from arjax.nn.policy import check_policy, decode_blocks, dtypes, float32, run_blocks
from arjax.nn.scales import (
    attend_scale,
    block_causal_mask,
    chunk_mask,
    init_scale_cache,
    scale_levels,
)


@dataclasses.dataclass(frozen=True)
class VARConfig:
    depth: int = 16
    width: int = 0  # 0: 64 * depth (official)
    heads: int = 0  # 0: depth (head dim 64)
    mlp_ratio: float = 4.0
    vocab_size: int = 4096
    codebook_dim: int = 32
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_classes: int = 1000
    shared_aln: bool = False  # d36: one AdaLN projection shared by all blocks
    attn_l2_norm: bool = True
    label_drop: float = 0.1  # cond_drop_rate
    drop_path: float = 0.0  # stochastic depth of the last block (linear from 0; official 0.1 d/24)
    norm_eps: float = 1e-6
    aln_gamma_init: float = 1e-3  # alng: scale of the gate rows of ada_lin at init
    dtype: str = "float32"  # matmul/attention compute and KV caches; see arjax.nn.policy
    param_dtype: str = "float32"
    remat: str = "none"  # per-block rematerialisation in training: none | full | dots
    scan_layers: bool = False  # teacher-forced pass as lax.scan over the blocks (compile time)

    @property
    def dim(self) -> int:
        return self.width or 64 * self.depth

    @property
    def num_heads(self) -> int:
        return self.heads or self.depth

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def validate(self) -> None:
        check(self.dim % self.num_heads == 0,
              f"VAR width {self.dim} must be divisible by heads {self.num_heads}")
        check(0 <= self.label_drop < 1 and 0 <= self.drop_path < 1,
              "label_drop and drop_path must be in [0, 1)")
        check(self.patch_nums[0] == 1 and all(
            a < b for a, b in zip(self.patch_nums, self.patch_nums[1:])),
              f"patch_nums must start at 1 and increase, got {self.patch_nums}")
        check_policy(self)


def var_config(depth: int, **overrides) -> VARConfig:
    """Official VAR-d{16,20,24,30} (256 px) and d36 (512 px, shared AdaLN)."""
    alng = {16: 1e-3, 20: 1e-3, 24: 1e-4, 30: 1e-5, 36: 5e-6}.get(depth, 1e-3)
    base = dict(depth=depth, aln_gamma_init=alng, drop_path=0.1 * depth / 24)
    if depth == 36:
        base.update(shared_aln=True, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32))
    return VARConfig(**{**base, **overrides})


def layer_norm(x, eps):
    """LayerNorm without affine parameters, in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _linear(cin, cout, rngs, std, bias=True, **dtype_kw):
    return Linear(cin, cout, use_bias=bias, rngs=rngs, **dtype_kw,
                  kernel_init=nnx.initializers.truncated_normal(std, lower=-2 / std,
                                                                upper=2 / std))


class SelfAttention(nnx.Module):
    def __init__(self, cfg: VARConfig, std: float, *, rngs: nnx.Rngs):
        c, h = cfg.dim, cfg.num_heads
        self.cfg = cfg
        kw, pdt = dtypes(cfg), jnp.dtype(cfg.param_dtype)
        self.mat_qkv = _linear(c, 3 * c, rngs, std, bias=False, **kw)
        self.q_bias = nnx.Param(jnp.zeros((c,), pdt))
        self.v_bias = nnx.Param(jnp.zeros((c,), pdt))
        self.scale_mul_1H11 = nnx.Param(jnp.full((1, h, 1, 1), math.log(4.0), pdt))
        self.proj = _linear(c, c, rngs, std / math.sqrt(2 * cfg.depth), **kw)

    def qkv(self, x):
        """q [B,T,H,d], k/v [B,H,T,d] in the compute dtype (bias, l2 norms and the learned
        scale in float32)."""
        b, t, c = x.shape
        h = self.cfg.num_heads
        bias = jnp.concatenate([self.q_bias[...], jnp.zeros((c,)), self.v_bias[...]])
        qkv = self.mat_qkv(x).astype(jnp.float32) + bias.astype(jnp.float32)
        q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, h, c // h), 2, 0)
        if self.cfg.attn_l2_norm:
            unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
            log_scale = jnp.minimum(self.scale_mul_1H11[...].astype(jnp.float32),
                                    math.log(100.0)).reshape(h, 1)
            q, k = unit(q) * jnp.exp(log_scale), unit(k)
        dt = jnp.dtype(self.cfg.dtype)
        return q.astype(dt), k.transpose(0, 2, 1, 3).astype(dt), v.transpose(0, 2, 1, 3
                                                                            ).astype(dt)

    def scale(self) -> float:
        return 1.0 if self.cfg.attn_l2_norm else 0.25 / math.sqrt(self.cfg.dim
                                                                  // self.cfg.num_heads)

    def __call__(self, x, mask):
        q, k, v = self.qkv(x)
        return self.proj(attend(q, k, v, mask, self.scale()).reshape(x.shape))

    def decode(self, x, cache, begin: int, end: int, mask=None):
        """Whole scales' tokens (positions begin..end-1, static) against the cache."""
        out, cache = attend_scale(*self.qkv(x), cache, begin, end, self.scale(), mask)
        return self.proj(out.reshape(x.shape)), cache


class FFN(nnx.Module):
    def __init__(self, cfg: VARConfig, std: float, *, rngs: nnx.Rngs):
        hidden = round(cfg.dim * cfg.mlp_ratio)
        self.fc1 = _linear(cfg.dim, hidden, rngs, std, **dtypes(cfg))
        self.fc2 = _linear(hidden, cfg.dim, rngs, std / math.sqrt(2 * cfg.depth), **dtypes(cfg))

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class AdaLNBlock(nnx.Module):
    def __init__(self, cfg: VARConfig, std: float, *, rngs: nnx.Rngs):
        c = cfg.dim
        self.cfg = cfg
        self.attn = SelfAttention(cfg, std, rngs=rngs)
        self.ffn = FFN(cfg, std, rngs=rngs)
        if cfg.shared_aln:
            self.ada_gss = nnx.Param((jax.random.normal(rngs.params(), (1, 1, 6, c)) / c**0.5
                                      ).astype(cfg.param_dtype))
        else:
            self.ada_lin = _linear(c, 6 * c, rngs, std, **float32(cfg))
            kernel = self.ada_lin.kernel[...]
            self.ada_lin.kernel[...] = jnp.concatenate(
                [kernel[:, :2 * c] * cfg.aln_gamma_init, kernel[:, 2 * c:] * 0.5], axis=1)

    def modulation(self, cond):
        """cond [B, C] (or the shared [B, 1, 6, C]) -> six [B, 1, C]."""
        if self.cfg.shared_aln:
            mods = self.ada_gss[...].astype(jnp.float32) + cond
        else:
            mods = self.ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 6, -1)
        return [mods[:, :, i] for i in range(6)]

    def _residual(self, x, cond, attn, drop=None, mid=None):
        """attn: normalised input -> (output, aux); returns (x, aux). `drop` = (key, rate):
        stochastic depth per sample on both branches (training); `mid` is added to the
        stream between the two branches (Distilled Decoding's per-block noise/data term)."""
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        eps = self.cfg.norm_eps
        keep = lambda branch, k: branch
        if drop is not None:
            key, rate = drop
            keep = lambda branch, k: branch * jax.random.bernoulli(
                jax.random.fold_in(key, k), 1 - rate, (x.shape[0], 1, 1)) / (1 - rate)
        out, aux = attn(layer_norm(x, eps) * (1 + s1) + b1)
        x = x + keep(g1 * out, 0)
        if mid is not None:
            x = x + mid
        return x + keep(g2 * self.ffn(layer_norm(x, eps) * (1 + s2) + b2), 1), aux

    def __call__(self, x, cond, mask, drop=None, mid=None):
        return self._residual(x, cond, lambda h: (self.attn(h, mask), None), drop, mid)[0]

    def decode(self, x, cond, cache, begin: int, end: int, mask=None):
        return self._residual(x, cond, lambda h: self.attn.decode(h, cache, begin, end, mask))


class HeadNorm(nnx.Module):
    def __init__(self, c: int, std: float, *, rngs: nnx.Rngs, **dtype_kw):
        self.ada_lin = _linear(c, 2 * c, rngs, std, **dtype_kw)
        self.ada_lin.kernel[...] = self.ada_lin.kernel[...] * 0.5

    def __call__(self, x, cond, eps):
        scale, shift = jnp.split(self.ada_lin(jax.nn.silu(cond))[:, None], 2, axis=-1)
        return layer_norm(x, eps) * (1 + scale) + shift


def class_conditioning(model, labels):
    """(cond [B, C] for the head, what each block's AdaLN takes) from a VAR-like module's
    `class_emb` (and `shared_ada_lin` with `shared_aln`)."""
    cond = model.class_emb(labels)
    if model.cfg.shared_aln:
        shared = model.shared_ada_lin(jax.nn.silu(cond)).reshape(cond.shape[0], 1, 6, -1)
        return cond, shared
    return cond, cond


def build_trunk(module, cfg: VARConfig, positions: int, levels: int, rngs: nnx.Rngs,
                logits: bool = True):
    """VAR's parameters on `module`, with `positions` rows of position embedding and `levels`
    of level embedding (Distilled Decoding's student adds a level and a position); without
    `logits` no logits head (DD2's networks end in a velocity head instead)."""
    c, std = cfg.dim, math.sqrt(1 / (3 * cfg.dim))
    f32 = float32(cfg)  # embeddings, AdaLN and the head: float32 (residual stream too)
    normal = lambda shape: nnx.Param((jnp.clip(jax.random.normal(rngs.params(), shape),
                                               -2, 2) * std).astype(cfg.param_dtype))
    module.class_emb = nnx.Embed(cfg.num_classes + 1, c, rngs=rngs, **f32,
                                 embedding_init=nnx.initializers.truncated_normal(std))
    module.pos_start = normal((1, 1, c))
    module.pos_1LC = normal((1, positions, c))
    module.lvl_embed = nnx.Embed(levels, c, rngs=rngs, **f32,
                                 embedding_init=nnx.initializers.truncated_normal(std))
    module.word_embed = _linear(cfg.codebook_dim, c, rngs, std, **dtypes(cfg))
    if cfg.shared_aln:
        module.shared_ada_lin = _linear(c, 6 * c, rngs, std, **f32)
    module.blocks = nnx.List([AdaLNBlock(cfg, std, rngs=rngs) for _ in range(cfg.depth)])
    module.head_nm = HeadNorm(c, std, rngs=rngs, **f32)
    if logits:
        module.head = _linear(c, cfg.vocab_size, rngs, std * 0.02, **f32)


class VAR(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        build_trunk(self, cfg, cfg.seq_len, len(cfg.patch_nums), rngs)

    @property
    def levels(self) -> np.ndarray:
        return scale_levels(self.cfg.patch_nums)

    def conditioning(self, labels):
        return class_conditioning(self, labels)

    def embed(self, cond, inputs, begin: int):
        """Token embeddings at positions begin..: the start token (begin == 0, `inputs`
        ignored) or word_embed(inputs [B, n, Cv]), plus level and position embeddings."""
        if begin == 0:
            x = cond[:, None] + self.pos_start[...].astype(jnp.float32)
        else:
            x = self.word_embed(inputs).astype(jnp.float32)
        end = begin + x.shape[1]
        lvl = self.lvl_embed(jnp.asarray(self.levels[begin:end]))
        return x + lvl[None] + self.pos_1LC[:, begin:end].astype(jnp.float32)

    def logits(self, x, cond):
        return self.head(self.head_nm(x.astype(jnp.float32), cond, self.cfg.norm_eps))

    def __call__(self, labels, inputs, *, key=None):
        """Teacher forcing: labels [B], inputs [B, L - pn0^2, Cv] -> logits [B, L, V].
        With `key` (training) labels drop to the null class with rate label_drop and blocks
        are skipped per sample with rates rising linearly to drop_path (stochastic depth)."""
        return self.logits(*self.hidden(labels, inputs, key=key))

    def features(self, labels, inputs):
        """What the logits head reads: the head's AdaLN norm of the last hidden state
        [B, L, C], float32 (position i sees the class and the scales before its own)."""
        x, cond = self.hidden(labels, inputs)
        return self.head_nm(x.astype(jnp.float32), cond, self.cfg.norm_eps)

    def hidden(self, labels, inputs, *, key=None):
        """The teacher-forced trunk: (last hidden state [B, L, C], class condition)."""
        if key is not None and self.cfg.label_drop > 0:
            drop = jax.random.bernoulli(key, self.cfg.label_drop, labels.shape)
            labels = jnp.where(drop, self.cfg.num_classes, labels)
        cond, block_cond = self.conditioning(labels)
        x = jnp.concatenate([self.embed(cond, None, 0), self.embed(cond, inputs, 1)], axis=1)
        mask = jnp.asarray(block_causal_mask(self.cfg.patch_nums))
        cfg = self.cfg
        rates = np.linspace(0, cfg.drop_path, cfg.depth)
        # Per block (key, rate); a rate-0 block skips the draw unless the blocks are scanned
        # (one traced body: there a rate of 0 keeps every row, the same result).
        drops = [None if key is None or cfg.drop_path == 0 or (rate == 0 and not cfg.scan_layers)
                 else (jax.random.fold_in(key, i + 1), float(rate))
                 for i, rate in enumerate(rates)]
        x = run_blocks(self.blocks, lambda blk, h, drop: blk(h, block_cond, mask, drop), x,
                       drops, remat=cfg.remat, scan=cfg.scan_layers)
        return x, cond

    def init_cache(self, batch: int):
        cfg = self.cfg
        return init_scale_cache(batch, cfg.num_heads, cfg.seq_len, cfg.dim // cfg.num_heads,
                                cfg.depth, jnp.dtype(cfg.dtype))

    def decode_scale(self, x, cond, block_cond, cache, begin: int):
        """Embedded tokens x [B, n, C] of one scale, or of several whole scales in one
        block-causal pass (a prefill, as CoDe's refiner does) -> (logits [B, n, V], cache)."""
        end = begin + x.shape[1]
        mask = chunk_mask(self.cfg.patch_nums, begin, end)
        x, new_cache = decode_blocks(
            self.blocks, cache, lambda blk, h, c: blk.decode(h, block_cond, c, begin, end, mask), x,
            span=(begin, end), scan=self.cfg.scan_layers)
        return self.logits(x, cond), new_cache
