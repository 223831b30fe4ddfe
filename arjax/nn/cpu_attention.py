"""Fused float32 attention and its gradient for XLA:CPU (C++ in `cpu_attention.cc`, through
`jax.ffi`).

Why: XLA:CPU computes attention as einsum, softmax, einsum, writing the whole [rows, keys]
logit and probability matrices to memory and reading them back several times; at VAR-d16's
training shape that took 3.6-4.5x torch's fused CPU kernel forward and 2.2-2.4x its forward +
backward (`benchmarks.attention_rates`, docs/benchmarks.md). The kernel takes 24 query rows
at a time against the keys up to the block's last visible one, so logits stay in a
per-thread buffer, and splits the (batch x head) groups over the cores. The backward pass
recomputes the probabilities (nothing [rows, keys]-sized is kept between the passes), and
with dropout the same keep pattern, a hash of (seed, group, row, key): the law of
`nn.layers.keep_mask`, not its draws.

Semantics are `nn.attention.attend`'s: a masked logit is -1e30, so a row with no visible key
is uniform over all keys.
"""

from __future__ import annotations

import functools
import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np

from arjax.nn import cpu_kernels

FORWARD, BACKWARD = "arjax_attention_forward", "arjax_attention_backward"
MIN_ROWS = 16  # fewer query rows per group (decoding one token): XLA's ops, no thread start


def usable(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `attention` may take these heads-major, grouped operands (q [G, M, d], k/v
    [G, S, d]): float32, d a multiple of 16, at least `MIN_ROWS` query rows, kernels wanted
    and built."""
    return (all(x.dtype == jnp.float32 for x in (q, k, v)) and q.shape[-1] % 16 == 0
            and q.shape[1] >= MIN_ROWS and cpu_kernels.wanted() and available())


FLAGS = ("-ffast-math",)  # vectorised expf (glibc's libmvec)


def source() -> str:
    return importlib.resources.files("arjax.nn").joinpath("cpu_attention.cc").read_text()


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered in this process (built on the first call)."""
    return cpu_kernels.build("cpu_attention", source(),
                             (("AttentionForward", FORWARD), ("AttentionBackward", BACKWARD)),
                             FLAGS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, seed: jax.Array,
              batch: int, rate: float = 0.0) -> jax.Array:
    """softmax(q k^T masked) v for q [G, M, d] (already scaled), k/v [G, S, d], mask uint8
    [1 or batch, T, S] (row m of group g is query m % T of batch g // (G // batch)); with
    dropout at `rate` on the probabilities, drawn from `seed` (uint32 [2])."""
    return _forward(q, k, v, mask, seed, batch, rate)


def _forward(q, k, v, mask, seed, batch, rate):
    return jax.ffi.ffi_call(FORWARD, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, mask, seed, batch=batch, rate=np.float32(rate))


def _attention_fwd(q, k, v, mask, seed, batch, rate):
    out = _forward(q, k, v, mask, seed, batch, rate)
    return out, (q, k, v, mask, seed, out)


def _attention_bwd(batch, rate, residuals, dout):
    q, k, v, mask, seed, out = residuals
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(BACKWARD, shapes)(
        q, k, v, mask, seed, out, dout.astype(jnp.float32), batch=batch, rate=np.float32(rate))
    return dq, dk, dv, None, None


attention.defvjp(_attention_fwd, _attention_bwd)
