"""DD1 students: the teacher's transformer re-wired into a one-pass map from a partly noised
sequence X_k = (tokens before unit k, noise from unit k on) to the whole token sequence.

As in the released models (microsoft/distilled_decoding): every position carries a continuous
vector (a code vector or its noise) through a linear input projection, a two-row noise/data
embedding marks which is which (the only "time" the student sees), and two heads read each
position: the teacher's logits head (copied) and a new continuous head (PixArt's final layer:
affine-free LayerNorm modulated by the class embedding). The output at a position predicts
*that position's* token (no next-token shift).

- `DDRaster` (LlamaGen): [class, x_0..x_{L-1}] under the teacher's causal mask and 2-D RoPE;
  units are tokens (k in 0..L). Submodule names follow the released `DDTransformer`.
- `DDVAR`: an extra first level holds the class (sos) slot, so scale s sits at level s + 1;
  a position sees strictly earlier levels and itself (the flow map's dependence: a token
  depends on its own noise and earlier scales only), and a per-block projection of the
  noise/data embedding enters between attention and FFN (and once before the heads). Units
  are scales (k in 0..K). Submodule names follow the released `DD_Model`.

`*_from_teacher` build the student's initial weights: the teacher's where shapes carry over,
fresh ones (the student's own init) elsewhere.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.models.raster_ar import Block, RasterARConfig, _rope_table
from arjax.models.var import (
    VARConfig,
    _linear,
    build_trunk,
    class_conditioning,
    layer_norm,
)
from arjax.nn.layers import Linear, RMSNorm
from arjax.nn.policy import dtypes, float32, run_blocks
from arjax.nn.scales import scale_bounds, scale_levels


class ContinuousHead(nnx.Module):
    """PixArt's final layer: LayerNorm(h) * (1 + scale) + shift, (shift, scale) = a learned
    table + the class embedding, then a linear map to the code dimension."""

    def __init__(self, dim: int, out: int, *, rngs: nnx.Rngs, kernel_init=None):
        self.scale_shift_table = nnx.Param(jax.random.normal(rngs.params(), (2, dim))
                                           / math.sqrt(dim))
        self.linear = Linear(dim, out, rngs=rngs, **({"kernel_init": kernel_init}
                                                     if kernel_init else {}))

    def __call__(self, h: jax.Array, cond: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.scale_shift_table[...][None] + cond[:, None], 2, axis=1)
        x = layer_norm(h, 1e-6) * (1 + scale) + shift
        return self.linear(x).astype(jnp.float32)


def data_positions(k: jax.Array, starts: np.ndarray, length: int) -> jax.Array:
    """bool [B, length]: the positions before unit k's first position (`starts[k]`)."""
    return jnp.arange(length)[None] < jnp.asarray(starts)[k][:, None]


class DDRaster(nnx.Module):
    def __init__(self, cfg: RasterARConfig, code_dim: int, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg, self.code_dim = cfg, code_dim
        kw, init = dtypes(cfg), nnx.initializers.normal(0.02)
        self.cls_embedding = nnx.Embed(cfg.num_classes + 1, cfg.dim, **kw,
                                       embedding_init=init, rngs=rngs)
        self.tok_embeddings = Linear(code_dim, cfg.dim, **kw, kernel_init=init, rngs=rngs)
        self.n_d_embed = nnx.Embed(2, cfg.dim, **kw, embedding_init=init, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, kw["param_dtype"])
        self.output = Linear(cfg.dim, cfg.vocab_size, use_bias=False, **kw,
                             preferred_element_type=jnp.float32, rngs=rngs)
        self.final_layer_conti = ContinuousHead(cfg.dim, code_dim, rngs=rngs)

    @property
    def unit_starts(self) -> np.ndarray:
        """First sequence position of unit k = 0..L ([class, x_0, ...]: k data tokens are
        positions 1..k, so position p is data iff p <= k)."""
        return np.arange(self.cfg.seq_len + 1) + 1

    def __call__(self, x: jax.Array, labels: jax.Array, k: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        """x [B, L, C] (code vectors of the first k[b] tokens, noise after), labels [B], k int
        [B] -> (continuous [B, L, C], logits [B, L, V]), both float32."""
        cfg = self.cfg
        length = x.shape[1] + 1
        cls = self.cls_embedding(labels)
        h = jnp.concatenate([cls[:, None], self.tok_embeddings(x)], axis=1)
        h = h + self.n_d_embed(data_positions(k, self.unit_starts, length).astype(jnp.int32))
        rope = jnp.asarray(_rope_table(cfg.grid, cfg.dim // cfg.heads, cfg.rope_base)[:length])
        mask = jnp.tril(jnp.ones((length, length), bool))
        h = run_blocks(self.layers, lambda layer, h: layer(h, rope, mask), h, remat=cfg.remat,
                       scan=cfg.scan_layers)
        h = h[:, 1:]
        logits = self.output(self.norm(h)).astype(jnp.float32)
        return self.final_layer_conti(h, cls), logits


def raster_from_teacher(student: dict, teacher: dict) -> dict:
    """The teacher's class table, blocks, final norm and logits head in the student."""
    return {**student, **{name: teacher[name]
                          for name in ("cls_embedding", "layers", "norm", "output")}}


def dd_var_config(cfg: VARConfig) -> VARConfig:
    """The teacher's config with DD's extra first level (the sos slot): the shapes of the
    student's position and level tables."""
    return dataclasses.replace(cfg, patch_nums=(1, *cfg.patch_nums))


def dd_var_mask(patch_nums) -> np.ndarray:
    """bool [1 + L, 1 + L]: position a sees b iff level(a) > level(b) or a == b."""
    levels = scale_levels((1, *patch_nums))
    return (levels[:, None] > levels[None, :]) | np.eye(len(levels), dtype=bool)


class DDVAR(nnx.Module):
    def __init__(self, cfg: VARConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        wide = dd_var_config(cfg)
        build_trunk(self, cfg, wide.seq_len, len(wide.patch_nums), rngs)
        c, std, f32 = cfg.dim, math.sqrt(1 / (3 * cfg.dim)), float32(cfg)
        self.n_d_embed = nnx.Embed(2, c, rngs=rngs, **f32,
                                   embedding_init=nnx.initializers.truncated_normal(0.02))
        self.layerwise_n_d_embed = nnx.List([_linear(c, c, rngs, std, **f32)
                                             for _ in range(cfg.depth + 1)])
        self.final_layer_conti = ContinuousHead(
            c, cfg.codebook_dim, rngs=rngs,
            kernel_init=nnx.initializers.truncated_normal(std, lower=-2 / std, upper=2 / std))

    @property
    def unit_starts(self) -> np.ndarray:
        """First sequence position of scale k = 0..K (position 0 is the sos slot)."""
        return np.array([1 + b for b, _ in scale_bounds(self.cfg.patch_nums)]
                        + [1 + self.cfg.seq_len])

    def __call__(self, x: jax.Array, labels: jax.Array, k: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        """x [B, L, Cv] (code vectors of scales < k[b], noise after), labels [B], k int [B]
        (data scales) -> (continuous [B, L, Cv], logits [B, L, V]), float32."""
        cfg = self.cfg
        length = cfg.seq_len + 1
        cond, block_cond = class_conditioning(self, labels)
        h = jnp.concatenate([cond[:, None] + self.pos_start[...].astype(jnp.float32),
                             self.word_embed(x).astype(jnp.float32)], axis=1)
        levels = scale_levels(dd_var_config(cfg).patch_nums)
        h = h + self.lvl_embed(jnp.asarray(levels))[None] + self.pos_1LC[...].astype(jnp.float32)
        nd = self.n_d_embed(data_positions(k, self.unit_starts, length).astype(jnp.int32))
        h = h + nd
        mask = jnp.asarray(dd_var_mask(cfg.patch_nums))
        h = run_blocks(self.blocks, lambda blk, h, mid: blk(h, block_cond, mask, mid=mid), h,
                       [proj(nd) for proj in self.layerwise_n_d_embed[:cfg.depth]],
                       remat=cfg.remat, scan=cfg.scan_layers)
        h = h + self.layerwise_n_d_embed[cfg.depth](nd)
        logits = self.head(self.head_nm(h, cond, cfg.norm_eps))
        return self.final_layer_conti(h, cond)[:, 1:], logits[:, 1:].astype(jnp.float32)


def var_from_teacher(student: dict, teacher: dict) -> dict:
    """The teacher's weights in the student: everything of the same shape, and the level /
    position tables shifted one level on (teacher level 0 -> student 0, level s -> s + 1 for
    s >= 1; the student's level 1, where scale 0's token input now sits, keeps its init)."""
    out = dict(student)
    for name in ("word_embed", "class_emb", "pos_start", "blocks", "head_nm", "head",
                 "shared_ada_lin"):
        if name in teacher:
            out[name] = teacher[name]
    lvl_t, lvl_s = teacher["lvl_embed"]["embedding"], student["lvl_embed"]["embedding"]
    out["lvl_embed"] = {"embedding": jnp.concatenate([lvl_t[:1], lvl_s[1:2], lvl_t[1:]])}
    pos_t, pos_s = teacher["pos_1LC"], student["pos_1LC"]
    out["pos_1LC"] = jnp.concatenate([pos_t[:, :1], pos_s[:, 1:2], pos_t[:, 1:]], axis=1)
    return out
