"""Draft-model speculative sampling is lossless: exact enumeration + chi-square, greedy equality."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt
from scipy import stats
from test_sampling import exact_sequence_probs

from arjax.config import ConfigError
from arjax.sampling import raster, speculative
from arjax.sampling.common import SampleConfig

spec_jit = jax.jit(speculative.sample, static_argnames="cfg")


@pytest.mark.parametrize("sample_cfg,draft_len", [
    (SampleConfig(), 2), (SampleConfig(cfg_scale=2.5), 3),
    (SampleConfig(cfg_scale=3.0, cfg_schedule="linear", temperature=0.8), 5),
])
def test_joint_distribution_equals_target(sample_cfg, draft_len):
    vocab, grid = 3, 2
    target = tiny_gpt(seed=0, vocab_size=vocab, grid=grid, scale=0.5)
    draft = tiny_gpt(seed=7, vocab_size=vocab, grid=grid, scale=0.5, dim=16, heads=1)
    cfg = speculative.SpeculativeConfig(draft_len=draft_len, sample=sample_cfg)
    if sample_cfg.cfg_schedule == "linear":  # exact reference for a per-position schedule
        probs = exact_linear_cfg_probs(*target, sample_cfg, vocab, grid)
    else:
        _, probs = exact_sequence_probs(*target, 1, sample_cfg, grid, vocab)
    n = 4000
    tokens, st = spec_jit(*target, *draft, jax.random.key(0), jnp.ones((n,), jnp.int32), cfg)
    index = np.asarray(tokens) @ (vocab ** np.arange(grid * grid)[::-1])
    observed = np.bincount(index, minlength=len(probs))
    expected = probs / probs.sum() * n
    keep = expected >= 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert int(st.forward_passes) <= grid * grid
    assert np.all(np.asarray(st.accepted) <= draft_len * np.asarray(st.rounds))


def exact_linear_cfg_probs(graphdef, params, sample_cfg, vocab, grid):
    import itertools

    from arjax.models import bind

    model = bind(graphdef, params)
    seqs = jnp.array(list(itertools.product(range(vocab), repeat=grid * grid)))
    cond = model(seqs, jnp.ones((len(seqs),), jnp.int32))
    uncond = model(seqs, jnp.full((len(seqs),), model.cfg.num_classes))
    length = grid * grid
    scale = 1 + (sample_cfg.cfg_scale - 1) * jnp.arange(length) / (length - 1)
    logits = (uncond + scale[None, :, None] * (cond - uncond)) / sample_cfg.temperature
    logp = jax.nn.log_softmax(logits, -1)
    return np.exp(np.asarray(jnp.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(-1),
                             np.float64))


def test_speculative_with_cfg_schedule_matches_plain_sampler_reference():
    """The plain sampler and the exact reference agree on the linear schedule too."""
    vocab, grid = 3, 2
    target = tiny_gpt(seed=0, vocab_size=vocab, grid=grid, scale=0.5)
    cfg = SampleConfig(cfg_scale=3.0, cfg_schedule="linear", temperature=0.8)
    probs = exact_linear_cfg_probs(*target, cfg, vocab, grid)
    tokens, _ = jax.jit(raster.sample, static_argnames="cfg")(
        *target, jax.random.key(3), jnp.ones((4000,), jnp.int32), cfg)
    index = np.asarray(tokens) @ (vocab ** np.arange(grid * grid)[::-1])
    observed = np.bincount(index, minlength=len(probs))
    expected = probs / probs.sum() * 4000
    keep = expected >= 5
    assert stats.chisquare(np.append(observed[keep], observed[~keep].sum()),
                           np.append(expected[keep], expected[~keep].sum())).pvalue > 1e-3


@pytest.mark.parametrize("draft_len", [1, 4])
def test_greedy_speculative_equals_greedy_ar(draft_len):
    target, draft = tiny_gpt(seed=0), tiny_gpt(seed=3)
    labels = jnp.array([0, 1, 2, 3, 1, 0])
    for cfg_scale in (1.0, 2.0):
        sc = SampleConfig(temperature=0.0, cfg_scale=cfg_scale)
        ar, _ = jax.jit(raster.sample, static_argnames="cfg")(*target, jax.random.key(0),
                                                               labels, sc)
        spec, st = spec_jit(*target, *draft, jax.random.key(1), labels,
                            speculative.SpeculativeConfig(draft_len=draft_len, sample=sc))
        np.testing.assert_array_equal(spec, ar)


def test_identical_draft_accepts_everything():
    target = tiny_gpt(seed=0)
    cfg = speculative.SpeculativeConfig(draft_len=4)
    _, st = spec_jit(*target, *target, jax.random.key(0), jnp.arange(4) % 4, cfg)
    # p == q: every draft is accepted, 9 tokens take ceil(9 / 5) = 2 target calls.
    assert int(st.forward_passes) == 2
    np.testing.assert_array_equal(st.accepted, [8, 8, 8, 8])


def test_bad_draft_len():
    target = tiny_gpt(seed=0)
    with pytest.raises(ConfigError, match="draft_len"):
        spec_jit(*target, *target, jax.random.key(0), jnp.zeros((1,), jnp.int32),
                 speculative.SpeculativeConfig(draft_len=0))
