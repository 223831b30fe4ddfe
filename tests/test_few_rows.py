"""The few-row CPU kernel: the same products as XLA's dot, and the raster sampler on packed
weights draws the same tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt

from arjax.nn import few_rows
from arjax.sampling import raster
from arjax.sampling.common import SampleConfig

pytestmark = pytest.mark.skipif(not few_rows.available(),
                                reason="no C++ compiler: XLA's dot runs instead")


@pytest.mark.parametrize("rows", [1, 5, 16, 20])
def test_matmul_equals_the_dot(rows):
    """Up to 16 rows the kernel (rows padded inside a 16-row block); more: XLA's dot on the
    unpacked weights. K not a multiple of anything, N = 3 panels."""
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(rows, 37)).astype(np.float32)
    w = rng.normal(size=(37, 48)).astype(np.float32)
    panels = few_rows.pack(jnp.asarray(w))
    np.testing.assert_array_equal(few_rows.unpack(panels), w)
    out = jax.jit(few_rows.matmul)(jnp.asarray(x), panels)
    np.testing.assert_allclose(out, x @ w, rtol=1e-5, atol=1e-5)
    program = jax.jit(few_rows.matmul).lower(jnp.asarray(x), panels).as_text()
    assert (few_rows.TARGET in program) == (rows <= 16)


def test_sampler_on_packed_weights_draws_the_same_tokens(monkeypatch):
    """Batch 4 with CFG = 8 rows: every dense kernel packed (the size threshold lowered for the
    tiny model), the kernel in the token loop, the same tokens and log-probabilities."""
    graphdef, params = tiny_gpt()
    labels, cfg = jnp.array([0, 1, 2, 3]), SampleConfig(cfg=2.0, top_k=8)
    sampler = lambda: jax.jit(lambda p, k: raster.sample(graphdef, p, k, labels, cfg))
    plain = sampler()(params, jax.random.key(3))  # a new function each time: traced anew
    monkeypatch.setattr(few_rows, "MIN_WEIGHTS", 0)
    packed = sampler()(params, jax.random.key(3))
    assert few_rows.TARGET in sampler().lower(params, jax.random.key(3)).as_text()
    np.testing.assert_array_equal(packed[0], plain[0])
    np.testing.assert_allclose(packed[1].logprob, plain[1].logprob, rtol=1e-5, atol=1e-5)


def test_nothing_is_packed_outside_8_to_16_rows_in_bfloat16_or_under_a_mesh(monkeypatch,
                                                                            devices):
    from arjax import sharding

    monkeypatch.setattr(few_rows, "MIN_WEIGHTS", 0)
    params = tiny_gpt()[1]
    assert few_rows.decode_params(params, 2, "float32") is params
    assert few_rows.decode_params(params, 8, "bfloat16") is params  # the kernel is float32
    assert few_rows.decode_params(params, 8, "float32") is not params
    with jax.set_mesh(sharding.make_mesh((("data", 8),), devices)):
        assert few_rows.decode_params(params, 8, "float32") is params
