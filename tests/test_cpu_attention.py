"""The fused CPU attention kernel: `attend`'s values and gradients with it equal those of
XLA's own ops (masks of every form, grouped heads, ragged sizes), and `attend` uses it only
where it applies."""

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.nn import cpu_attention, cpu_kernels
from arjax.nn.attention import attend
from arjax.nn.scales import block_causal_mask

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="no C++ compiler: XLA's ops run instead")


def compiled(kernels: bool, fn, *args):
    """jit(fn) traced with the CPU kernels on or off (read at trace time)."""
    with mock.patch.dict(os.environ, ARJAX_CPU_KERNELS="on" if kernels else "off"):
        return jax.jit(fn).lower(*args).compile()


def operands(b, t, h, kv, s, d, seed=0):
    rng = np.random.default_rng(seed)
    q, g = (jnp.asarray(rng.standard_normal((b, t, h, d), np.float32)) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, kv, s, d), np.float32)) for _ in range(2))
    return q, k, v, g


def masks(b, t, s):
    rng = np.random.default_rng(1)
    ragged = rng.random((b, t, s)) < 0.4
    ragged[-1, 2] = False  # a row with no visible key: uniform over all keys in both
    return {"none": None,
            "causal suffix": jnp.asarray(np.tril(np.ones((t, s), bool), s - t)),
            "per row": jnp.asarray(ragged)}


@pytest.mark.parametrize("shape", [(2, 30, 4, 4, 30, 64),    # one group per head
                                   (3, 17, 6, 3, 40, 16),    # grouped queries, ragged sizes
                                   (1, 50, 2, 1, 70, 32)])   # over two row blocks
@pytest.mark.parametrize("mask", ["none", "causal suffix", "per row"])
def test_values_and_gradients_equal_xla(shape, mask):
    q, k, v, g = operands(*shape)
    m = masks(shape[0], shape[1], shape[4])[mask]
    fwd = lambda q, k, v: attend(q, k, v, m)
    grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v) * g), (0, 1, 2))
    fused = compiled(True, fwd, q, k, v)
    assert cpu_attention.FORWARD in fused.as_text()
    assert cpu_attention.BACKWARD in compiled(True, grad, q, k, v).as_text()
    got = (fused(q, k, v), *compiled(True, grad, q, k, v)(q, k, v))
    want = (compiled(False, fwd, q, k, v)(q, k, v), *compiled(False, grad, q, k, v)(q, k, v))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_block_causal_training_shape():
    """VAR's scale mask, whose row blocks end at different keys."""
    sides = (1, 2, 3, 4, 5)
    q, k, v, g = operands(2, 55, 2, 2, 55, 64, seed=3)
    m = jnp.asarray(block_causal_mask(sides))
    fwd = lambda q, k, v: attend(q, k, v, m)
    np.testing.assert_allclose(compiled(True, fwd, q, k, v)(q, k, v),
                               compiled(False, fwd, q, k, v)(q, k, v), rtol=2e-5, atol=2e-5)


def test_dropout_law_and_its_gradient():
    """With v the identity the output is the dropped probabilities themselves: each kept one
    is the plain probability / (1 - rate), about `rate` of them are dropped, another key
    draws another pattern, and the gradients are those of attention under that fixed
    pattern."""
    rate, (b, t, h, s) = 0.3, (2, 32, 4, 16)
    q, k, _, g = operands(b, t, h, h, s, 16, seed=5)
    v = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32), (b, h, s, s))
    fwd = lambda q, k, v, key: attend(q, k, v, None, dropout=(key, rate))
    program = compiled(True, fwd, q, k, v, jax.random.key(0))
    assert cpu_attention.FORWARD in program.as_text()
    dropped = program(q, k, v, jax.random.key(0))
    plain = compiled(False, lambda q, k, v: attend(q, k, v, None), q, k, v)(q, k, v)
    keep = dropped != 0
    np.testing.assert_allclose(jnp.where(keep, plain / (1 - rate), 0.0), dropped, rtol=1e-5,
                               atol=1e-7)
    n = keep.size
    assert abs(float(n - keep.sum()) - rate * n) < 5 * (n * rate * (1 - rate)) ** 0.5
    other = compiled(True, fwd, q, k, v, jax.random.key(1))(q, k, v, jax.random.key(1))
    assert float(jnp.mean((other != 0) != keep)) > 0.2

    factor = jnp.where(keep, 1 / (1 - rate), 0.0).transpose(0, 2, 1, 3)  # [b, h, t, s]

    def fixed(q, k, v):  # attention with that pattern, in XLA's ops
        logits = jnp.einsum("bthd,bhsd->bhts", q, k) * 16**-0.5
        return jnp.einsum("bhts,bhsd->bthd", jax.nn.softmax(logits, -1) * factor, v)

    loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * g))
    key = jax.random.key(0)
    got = compiled(True, jax.grad(loss(lambda q, k, v: fwd(q, k, v, key)), (0, 1, 2)),
                   q, k, v)(q, k, v)
    want = jax.grad(loss(fixed), (0, 1, 2))(q, k, v)
    for a, w in zip(got, want):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["bfloat16", "few rows", "kernels off"])
def test_xla_ops_where_the_kernel_does_not_apply(case):
    q, k, v, _ = operands(2, 4 if case == "few rows" else 20, 2, 2, 20, 16)
    if case == "bfloat16":
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    program = compiled(case != "kernels off", lambda q, k, v: attend(q, k, v, None), q, k, v)
    assert cpu_attention.FORWARD not in program.as_text()


def test_built_library_is_kept_for_the_next_process(monkeypatch, tmp_path):
    """The kernel this process built is in the cache folder under a name that hashes its
    source (an edited kernel is never loaded from an older build)."""
    path = cpu_kernels.library_path("cpu_attention", cpu_attention.source(), cpu_attention.FLAGS)
    assert os.path.exists(path)
    assert path != cpu_kernels.library_path("cpu_attention", cpu_attention.source() + "\n",
                                            cpu_attention.FLAGS)
    monkeypatch.setenv("ARJAX_KERNEL_CACHE", str(tmp_path))
    assert cpu_kernels.library_path("x", "").startswith(str(tmp_path))
