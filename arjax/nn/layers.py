"""Small layers shared by the model families."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from arjax.nn import few_rows


class Linear(nnx.Linear):
    """`nnx.Linear` (same parameters and initialisers) applied to the rows of a 2-D view of
    the input. Why: for a [batch, tokens, features] input the weight gradient contracts two
    dimensions, which XLA:CPU's matmul kernels do not take, so it first writes the activation
    gradient transposed, fused into its elementwise producer as a strided loop (1.4 s of
    GPT-B's 5.9 s train step on a 2-core CPU; docs/benchmarks.md, issue 14). Over rows the
    contraction is one dimension and the kernel reads the operand as it lies.

    A decoding sampler may hand it the kernel packed for the few-row CPU matmul
    (`nn.few_rows.decode_params`: a 3-D kernel), which it then uses."""

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        rows, kernel = inputs.reshape(-1, inputs.shape[-1]), self.kernel[...]
        if kernel.ndim == 3:
            out = few_rows.matmul(rows, kernel)
            if self.bias is not None:
                out = out + self.bias[...]
        else:
            out = super().__call__(rows, out_sharding)
        return out.reshape(*inputs.shape[:-1], out.shape[-1])


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 and cast back (Llama/LlamaGen: eps 1e-5, weighted)."""

    def __init__(self, dim: int, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(x.dtype) * self.weight[...].astype(x.dtype)


class SwiGLU(nnx.Module):
    """w2(silu(w1 x) * w3 x), no biases (Llama)."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, init_std: float = 0.02,
                 param_dtype=jnp.float32):
        init = nnx.initializers.normal(init_std)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, kernel_init=init,
                  rngs=rngs)
        self.w1 = Linear(dim, hidden, **kw)
        self.w3 = Linear(dim, hidden, **kw)
        self.w2 = Linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """bool `shape`, each entry True with probability 1 - rate: a counter hash (two rounds of
    MurmurHash3's 32-bit finaliser over the entry's index, keyed by 64 bits drawn from `key`),
    compared with rate x 2^32. Why not `jax.random.bernoulli`: its threefry draw took 22 ms
    for a [4, 256, 3072] mask on a 2-core CPU, this 1 ms (fused into its consumer), about 5 %
    of GPT-B's train step (docs/benchmarks.md, twelfth stop). The law is the same to 2^-32;
    the draws differ."""
    seed = jax.random.bits(key, (2,), jnp.uint32)
    size = math.prod(shape)
    if size >= 2**32:
        raise ValueError(f"keep_mask: {size} entries, more than a 32-bit counter indexes")

    def mix(x):
        x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
        x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
        return x ^ (x >> 16)

    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    bits = mix(mix(index * jnp.uint32(0x9E3779B1) ^ seed[0]) ^ seed[1])
    return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (`keep_mask`); identity when `key` is None (evaluation) or rate == 0."""
    if key is None or rate == 0.0:
        return x
    return jnp.where(keep_mask(key, rate, x.shape), x / (1.0 - rate), 0).astype(x.dtype)


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class TimestepEmbedder(nnx.Module):
    """DiT's timestep embedding: sinusoid of dim 256 in [cos, sin] order (max period 1e4) ->
    Linear -> SiLU -> Linear (`mlp_0`, `mlp_2`: upstream `mlp.0`, `mlp.2`). `kw`: dtypes."""

    def __init__(self, width: int, kw: dict, kernel_init, *, rngs: nnx.Rngs):
        linear = lambda cin: Linear(cin, width, rngs=rngs, kernel_init=kernel_init, **kw)
        self.mlp_0 = linear(256)
        self.mlp_2 = linear(width)

    def __call__(self, t: jax.Array) -> jax.Array:
        half = 128
        freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
        args = t.astype(jnp.float32)[:, None] * freqs[None]
        emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
        return self.mlp_2(jax.nn.silu(self.mlp_0(emb)))


def code_distances(x: jax.Array, table: jax.Array) -> jax.Array:
    """Squared L2 distances |x - c_j|^2, x [..., C], table [V, C] -> [..., V], in the expanded
    form (no [..., V, C] intermediate) at full float32 matmul precision (TPUs default to
    bfloat16 passes, which can flip near-ties)."""
    cross = jnp.einsum("...c,vc->...v", x, table, precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(x * x, -1, keepdims=True) + jnp.sum(table * table, -1) - 2 * cross


def nearest_code(x: jax.Array, table: jax.Array) -> jax.Array:
    """Index of the nearest codebook row: x [..., C] -> int32 [...]."""
    return jnp.argmin(code_distances(x, table), axis=-1).astype(jnp.int32)

