"""Llama-style class-conditional raster-order AR transformer (LlamaGen c2i GPT).

Shapes: B batch, L tokens (grid*grid), V vocabulary, D width, S cache length (= L).
Input at position 0 is the class embedding (row `num_classes` is the CFG null class), at
position t > 0 the embedding of token t-1; logits at position t predict token t.
Submodule names follow the official state_dict (`layers.{i}.attention.wqkv`, ...), which the
converter in `arjax.convert.llamagen` relies on.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.config import check
from arjax.nn.attention import Attention, KVCache, init_cache
from arjax.nn.layers import Linear, RMSNorm, SwiGLU, dropout, find_multiple
from arjax.nn.policy import check_policy, decode_blocks, dtypes, run_blocks
from arjax.nn.rope import rope_2d_table


@dataclasses.dataclass(frozen=True)
class RasterARConfig:
    vocab_size: int = 16384
    grid: int = 16  # tokens per side; L = grid * grid
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    kv_heads: int | None = None  # GQA; None = MHA
    multiple_of: int = 256  # SwiGLU hidden rounded up to this
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    dropout: float = 0.1  # token, residual and FFN dropout while training
    label_drop: float = 0.1  # CFG null-label rate while training
    dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators); KV caches too
    param_dtype: str = "float32"
    remat: str = "none"  # per-block rematerialisation in training: none | full | dots
    scan_layers: bool = False  # teacher-forced pass as lax.scan over the blocks (compile time)

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    def validate(self) -> None:
        check(self.dim % self.heads == 0, f"model.dim={self.dim} not divisible by heads")
        check((self.dim // self.heads) % 4 == 0, "2D RoPE needs head_dim divisible by 4")
        check(self.kv_heads is None or self.heads % self.kv_heads == 0,
              "model.heads must be a multiple of model.kv_heads")
        check(0 <= self.dropout < 1 and 0 <= self.label_drop < 1,
              "model.dropout and model.label_drop must be in [0, 1)")
        check_policy(self)


# The official LlamaGen sizes (autoregressive/models/gpt.py), 16x16 tokens at 256 px.
GPT_SIZES = {
    "B": dict(dim=768, depth=12, heads=12),
    "L": dict(dim=1024, depth=24, heads=16),
    "XL": dict(dim=1280, depth=36, heads=20),
    "XXL": dict(dim=1536, depth=48, heads=24),
    "3B": dict(dim=3200, depth=24, heads=32),
}


def gpt_config(size: str, **overrides) -> RasterARConfig:
    check(size in GPT_SIZES, f"unknown GPT size {size!r}; choose from {list(GPT_SIZES)}")
    return RasterARConfig(**{**GPT_SIZES[size], **overrides})


class Block(nnx.Module):
    def __init__(self, cfg: RasterARConfig, *, rngs: nnx.Rngs):
        kw = dtypes(cfg)
        self.attention = Attention(cfg.dim, cfg.heads, cfg.kv_heads, **kw, rngs=rngs)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden, **kw, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, kw["param_dtype"])
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, kw["param_dtype"])
        self.rate = cfg.dropout

    def __call__(self, x, rope, mask, key=None):
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        h = x + dropout(self.attention(self.attention_norm(x), rope, mask), self.rate, k1)
        return h + dropout(self.feed_forward(self.ffn_norm(h)), self.rate, k2)

    def decode(self, x, rope, cache, pos):
        a, cache = self.attention.decode(self.attention_norm(x), rope, cache, pos)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), cache


class RasterAR(nnx.Module):
    def __init__(self, cfg: RasterARConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dtypes(cfg)
        init = nnx.initializers.normal(0.02)
        self.cls_embedding = nnx.Embed(cfg.num_classes + 1, cfg.dim, **kw,
                                       embedding_init=init, rngs=rngs)
        self.tok_embeddings = nnx.Embed(cfg.vocab_size, cfg.dim, **kw,
                                        embedding_init=init, rngs=rngs)
        self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, kw["param_dtype"])
        # Zero-initialised head, as in the official model; logits accumulate in float32.
        self.output = Linear(cfg.dim, cfg.vocab_size, use_bias=False, **kw,
                             preferred_element_type=jnp.float32,
                             kernel_init=nnx.initializers.zeros, rngs=rngs)

    @property
    def rope(self) -> np.ndarray:
        """[1 + L, hd/2, 2] table; a trace-time constant, not a parameter (as upstream)."""
        cfg = self.cfg
        return _rope_table(cfg.grid, cfg.dim // cfg.heads, cfg.rope_base)

    def _logits(self, h: jax.Array) -> jax.Array:
        return self.output(self.norm(h)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, labels: jax.Array, *, key: jax.Array | None = None
                 ) -> jax.Array:
        """Teacher-forced logits. tokens int [B,L], labels int [B] -> float32 [B,L,V].

        With `key` (training): label dropout to the null class and token/residual/FFN dropout.
        """
        cfg = self.cfg
        length = tokens.shape[1]
        keys = list(jax.random.split(key, cfg.depth + 2)) if key is not None else None
        if keys is not None and cfg.label_drop > 0:
            drop = jax.random.uniform(keys[0], labels.shape) < cfg.label_drop
            labels = jnp.where(drop, cfg.num_classes, labels)
        x = jnp.concatenate([self.cls_embedding(labels)[:, None],
                             self.tok_embeddings(tokens[:, :-1])], axis=1)
        x = dropout(x, cfg.dropout, keys[1] if keys else None)
        rope = jnp.asarray(self.rope[:length])
        mask = jnp.tril(jnp.ones((length, length), bool))
        x = run_blocks(self.layers, lambda layer, h, k: layer(h, rope, mask, k), x,
                       keys[2:] if keys else [None] * cfg.depth, remat=cfg.remat,
                       scan=cfg.scan_layers)
        return self._logits(x)

    def init_cache(self, batch: int, length: int | None = None) -> list[KVCache]:
        cfg = self.cfg
        return [init_cache(batch, length or cfg.seq_len, cfg.kv_heads or cfg.heads,
                           cfg.dim // cfg.heads, jnp.dtype(cfg.dtype)) for _ in range(cfg.depth)]

    def embed(self, prev_tokens: jax.Array, labels: jax.Array, pos: jax.Array) -> jax.Array:
        """Input embeddings for positions pos..pos+T-1 given the tokens before them.

        prev_tokens int [B,T] holds token (p-1) for each position p; at p == 0 the class
        embedding is used instead (so one code path serves prefill and decode). `pos` is a
        scalar or int [B] (per-row positions).
        """
        b, t = prev_tokens.shape
        positions = jnp.asarray(pos)[..., None] + jnp.arange(t)
        is_cls = jnp.broadcast_to(positions == 0, (b, t))[..., None]
        return jnp.where(is_cls, self.cls_embedding(labels)[:, None],
                         self.tok_embeddings(prev_tokens))

    def decode(self, x: jax.Array, cache: list[KVCache], pos: jax.Array
               ) -> tuple[jax.Array, list[KVCache]]:
        """Cached step: input embeddings x [B,T,D] at pos..pos+T-1 -> logits [B,T,V], cache.

        `pos` is a scalar or int [B]; see `Attention.decode`.
        """
        # Zero rows past the end keep dynamic_slice from clamping (and shifting) the start when
        # a window reaches beyond the last position (speculative drafts near the end).
        table = jnp.pad(jnp.asarray(self.rope), ((0, x.shape[1]), (0, 0), (0, 0)))
        pos = jnp.asarray(pos, jnp.int32)
        slice_at = lambda p: jax.lax.dynamic_slice_in_dim(table, p, x.shape[1])
        rope = slice_at(pos) if pos.ndim == 0 else jax.vmap(slice_at)(pos)
        x, new_cache = decode_blocks(
            self.layers, cache, lambda layer, h, c: layer.decode(h, rope, c, pos), x)
        return self._logits(x), new_cache


@functools.lru_cache(maxsize=16)
def _rope_table(grid: int, head_dim: int, base: float) -> np.ndarray:
    return rope_2d_table(grid, head_dim, base, prefix=1)
