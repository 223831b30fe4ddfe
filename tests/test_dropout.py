"""Dropout's counter-hash keep mask: the Bernoulli law, independent neighbours and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arjax.nn.layers import dropout, keep_mask


def within(count, n, p, sigmas=5.0):
    return abs(count - n * p) < sigmas * (n * p * (1 - p)) ** 0.5


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_law_and_independence(rate):
    shape = (8, 256, 512)
    keep = np.asarray(keep_mask(jax.random.key(0), rate, shape))
    p, n = 1 - rate, keep.size
    assert within(keep.sum(), n, p)
    for pairs in (keep[..., 1:] & keep[..., :-1], keep[:, 1:] & keep[:, :-1],
                  keep[1:] & keep[:-1]):  # neighbours along each axis: p^2
        assert within(pairs.sum(), pairs.size, p * p)
    other = np.asarray(keep_mask(jax.random.key(1), rate, shape))
    assert within((keep & other).sum(), n, p * p)  # another key: an independent pattern
    split = np.asarray(keep_mask(jax.random.split(jax.random.key(0))[0], rate, shape))
    assert within((keep & split).sum(), n, p * p)


def test_dropout_scales_the_kept_entries():
    x = jnp.arange(1.0, 1001.0)
    out = dropout(x, 0.25, jax.random.key(2))
    kept = out != 0
    np.testing.assert_allclose(out[kept], x[kept] / 0.75, rtol=1e-6)
    assert dropout(x, 0.25, None) is x and dropout(x, 0.0, jax.random.key(2)) is x
