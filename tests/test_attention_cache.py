import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt

from arjax.models import bind


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_cached_decoding_equals_full_forward(kv_heads):
    graphdef, params = tiny_gpt(kv_heads=kv_heads, heads=4)
    model = bind(graphdef, params)
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 16)
    labels = jnp.array([0, 3, 4])  # 4 = null class
    full = model(tokens, labels)
    cache = model.init_cache(3)
    step_logits = []
    for t in range(9):
        prev = tokens[:, max(t - 1, 0):max(t - 1, 0) + 1]
        logits, cache = model.decode(model.embed(prev, labels, jnp.int32(t)), cache,
                                     jnp.int32(t))
        step_logits.append(logits[:, 0])
    np.testing.assert_allclose(np.stack(step_logits, 1), full, rtol=1e-4, atol=1e-5)


def test_chunked_decoding_equals_full_forward():
    """Feeding several tokens at once (speculative verification) matches too."""
    graphdef, params = tiny_gpt()
    model = bind(graphdef, params)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 16)
    labels = jnp.array([1, 2])
    full = model(tokens, labels)
    cache = model.init_cache(2)
    prev = jnp.concatenate([tokens[:, :1], tokens[:, :4]], axis=1)  # slot 0 is the class
    a, cache = model.decode(model.embed(prev, labels, jnp.int32(0)), cache, jnp.int32(0))
    b, cache = model.decode(model.embed(tokens[:, 4:8], labels, jnp.int32(5)), cache,
                            jnp.int32(5))
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, rtol=1e-4, atol=1e-5)


def test_causality():
    """Changing token t changes no logit at positions <= t."""
    graphdef, params = tiny_gpt()
    model = bind(graphdef, params)
    tokens = jax.random.randint(jax.random.key(3), (1, 9), 0, 16)
    other = tokens.at[0, 4].set((tokens[0, 4] + 1) % 16)
    a, b = model(tokens, jnp.array([1])), model(other, jnp.array([1]))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4


def test_class_token_rope_rows_are_zero():
    """LlamaGen quirk: the class position's q/k are zeroed by an all-zero RoPE row."""
    graphdef, params = tiny_gpt()
    rope = bind(graphdef, params).rope
    assert rope.shape == (1 + 9, 8, 2)
    assert np.all(rope[0] == 0) and np.allclose(rope[1, :, 0], 1.0)


def test_per_row_positions_and_rollback_equal_full_forward():
    """Rows at different positions in one call; a rolled-back row overwrites stale entries."""
    graphdef, params = tiny_gpt()
    model = bind(graphdef, params)
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, 16)
    labels = jnp.array([1, 2])
    full = model(tokens, labels)

    def prev(row, p, t):  # tokens before positions p..p+t-1 (slot 0 is the class)
        return jnp.stack([tokens[row, max(q - 1, 0)] for q in range(p, p + t)])

    cache = model.init_cache(2)
    _, cache = model.decode(model.embed(jnp.stack([prev(0, 0, 3), prev(1, 0, 3)]), labels,
                                        jnp.array([0, 0])), cache, jnp.array([0, 0]))
    wrong = (jnp.stack([prev(0, 3, 2), prev(1, 3, 2)]) + 7) % 16  # row 0 will be rejected
    wrong = wrong.at[1].set(prev(1, 3, 2))
    _, cache = model.decode(model.embed(wrong, labels, jnp.array([3, 3])), cache,
                            jnp.array([3, 3]))
    pos = jnp.array([3, 5])  # row 0 rolled back to 3, row 1 advanced to 5
    logits, _ = model.decode(model.embed(jnp.stack([prev(0, 3, 2), prev(1, 5, 2)]), labels,
                                         pos), cache, pos)
    np.testing.assert_allclose(logits[0], full[0, 3:5], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[1], full[1, 5:7], rtol=1e-4, atol=1e-5)
