"""Multi-head (grouped-query) causal self-attention with an explicit KV-cache pytree.

Shapes: B batch, T new tokens, S cache length, H query heads, K key/value heads, d head dim.
The cache is a plain pytree `{"k": [B,K,S,d], "v": [B,K,S,d]}` (heads-major, so attention
reads it without transposes) passed in and returned, so
samplers can carry it through `lax` loops and roll back by simply not advancing a position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.nn import cpu_attention
from arjax.nn.layers import Linear, keep_mask
from arjax.nn.rope import apply_rope

KVCache = dict[str, jax.Array]


def init_cache(batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
    shape = (batch, kv_heads, length, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def extend_cache(cache: KVCache, length: int) -> KVCache:
    """The cache with room for `length` positions (zeros after the ones it holds)."""
    pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)))
    return {name: pad(a) for name, a in cache.items()}


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           scale: float | None = None, dropout: tuple[jax.Array, float] | None = None
           ) -> jax.Array:
    """q [B,T,H,d], k/v [B,K,S,d], mask [T,S] or [B,T,S] (True = visible; None = all)
    -> [B,T,H,d]. `scale` defaults to d^-0.5; `dropout` = (key, rate) drops attention
    probabilities (training, as torch's SDPA dropout_p).

    The queries are scaled, moved heads-major and each group's queries stacked as rows, so
    both matmuls are plain [B*K]-batched ones: XLA:CPU took 1.5-1.9x as long with 5-D
    einsums over (b, t, k, g) (`benchmarks.attention_rates`, docs/benchmarks.md). On the CPU
    in float32 the fused kernel of `nn.cpu_attention` computes the same (its dropout draws
    differ from `nn.layers.keep_mask`'s, with the same law)."""
    b, t, h, d = q.shape
    kv, g = k.shape[1], h // k.shape[1]
    q = q * jnp.asarray(d**-0.5 if scale is None else scale, q.dtype)
    q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    out = _fused(q, k, v, mask, dropout)
    if out is None:
        out = _unfused(q, k, v, mask, g, dropout)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _fused(q, k, v, mask, dropout):
    """`nn.cpu_attention` on q [B, K, M, d] (M = g x T rows), or None where it does not
    apply."""
    b, kv, m, d = q.shape
    flat = lambda x: x.reshape(b * kv, x.shape[2], d)
    rate = 0.0 if dropout is None else dropout[1]
    if not cpu_attention.usable(flat(q), flat(k), flat(v)):
        return None
    s = k.shape[2]
    mask = jnp.ones((1, m, s), jnp.uint8) if mask is None else mask.astype(jnp.uint8)
    mask = mask.reshape(-1, *mask.shape[-2:])
    seed = (jnp.zeros(2, jnp.uint32) if rate == 0
            else jax.random.bits(dropout[0], (2,), jnp.uint32))
    return cpu_attention.attention(flat(q), flat(k), flat(v), mask, seed, b,
                                   float(rate)).reshape(b, kv, m, d)


def _unfused(q, k, v, mask, g, dropout):
    logits = jnp.einsum("bkmd,bksd->bkms", q, k).astype(jnp.float32)
    if mask is not None:  # rows (g, t) as the queries'
        mask = jnp.tile(mask, (1,) * (mask.ndim - 2) + (g, 1))
        logits = jnp.where(mask[None, None] if mask.ndim == 2 else mask[:, None], logits,
                           -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None and dropout[1] > 0:
        probs = jnp.where(keep_mask(dropout[0], dropout[1], probs.shape),
                          probs / (1 - dropout[1]), 0.0)
    return jnp.einsum("bkms,bksd->bkmd", probs.astype(v.dtype), v)


class Attention(nnx.Module):
    """LlamaGen attention: fused `wqkv` (rows [q; k; v]), no biases, RoPE on q and k."""

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, *, dtype,
                 rngs: nnx.Rngs, init_std: float = 0.02, param_dtype=jnp.float32):
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        init = nnx.initializers.normal(init_std)
        total = (self.heads + 2 * self.kv_heads) * self.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
                  rngs=rngs)
        self.wqkv = Linear(dim, total, **kw)
        self.wo = Linear(dim, dim, **kw)

    def _qkv(self, x, rope):
        b, t, _ = x.shape
        hd, nq, nk = self.head_dim, self.heads, self.kv_heads
        qkv = self.wqkv(x)
        q = qkv[..., : nq * hd].reshape(b, t, nq, hd)
        k = qkv[..., nq * hd:(nq + nk) * hd].reshape(b, t, nk, hd)
        v = qkv[..., (nq + nk) * hd:].reshape(b, t, nk, hd)
        return apply_rope(q, rope), apply_rope(k, rope), v

    def __call__(self, x: jax.Array, rope: jax.Array, mask: jax.Array) -> jax.Array:
        """Full (teacher-forced) pass: x [B,T,D], rope [T,hd/2,2], mask [T,T]."""
        q, k, v = self._qkv(x, rope)
        out = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
        return self.wo(out.reshape(*x.shape[:2], -1))

    def decode(self, x: jax.Array, rope: jax.Array, cache: KVCache, pos: jax.Array
               ) -> tuple[jax.Array, KVCache]:
        """Feeds T tokens at positions pos..pos+T-1, attending to the cache.

        `pos` is a scalar (all rows at the same position: the plain sampler) or int [B] (each
        row at its own position: speculative decoders roll a row back by lowering its
        position; entries past it are masked and later overwritten). The caller keeps
        pos + T <= S.
        """
        q, k, v = self._qkv(x, rope)
        pos = jnp.asarray(pos, jnp.int32)
        zero = jnp.zeros((), jnp.int32)

        def write(c, new):  # c [B,K,S,d], new [B,T,K,d]
            new = new.transpose(0, 2, 1, 3).astype(c.dtype)
            if pos.ndim == 0:
                return jax.lax.dynamic_update_slice(c, new, (zero, zero, pos, zero))
            return jax.vmap(lambda ci, ni, pi: jax.lax.dynamic_update_slice(
                ci, ni, (zero, pi, zero)))(c, new, pos)

        cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
        t, s = x.shape[1], cache["k"].shape[2]
        last = pos[..., None, None] + jnp.arange(t)[:, None]  # [T,1] or [B,T,1]
        mask = jnp.arange(s) <= last
        out = attend(q, cache["k"], cache["v"], mask)
        return self.wo(out.reshape(*x.shape[:2], -1)), cache
