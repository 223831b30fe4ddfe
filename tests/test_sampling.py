import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt
from scipy import stats

from arjax.config import ConfigError
from arjax.models import bind
from arjax.sampling.common import SampleConfig, cfg_combine, filter_logits, guided_logits
from arjax.sampling.raster import sample

sample_jit = jax.jit(sample, static_argnames="cfg")


def hf_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Reference: LlamaGen/HF top_k_top_p_filtering, written out in numpy."""
    logits = logits.copy()
    if top_k > 0:
        kth = np.sort(logits)[::-1][top_k - 1]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = np.exp(logits[order] - logits[order].max())
        probs /= probs.sum()
        remove = np.cumsum(probs) > top_p
        remove[1:] = remove[:-1].copy()
        remove[0] = False
        logits[order[remove]] = -np.inf
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (1, 1.0), (0, 0.5), (0, 0.9),
                                         (5, 0.7), (0, 0.01)])
def test_filters_match_reference(top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 20)).astype(np.float32) * 2
    got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
    for row in range(6):
        np.testing.assert_array_equal(np.isinf(got[row]),
                                      np.isinf(hf_filter(logits[row], top_k, top_p)))
    assert np.all(np.isfinite(got).sum(-1) >= 1)


def test_filters_match_reference_on_a_whole_vocabulary():
    """VAR's vocabulary and cut-offs, with negative, positive and already masked logits (the
    radix select works on the float bit patterns, so every sign and -inf must order right)."""
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(4, 4096)) * 3).astype(np.float32)
    logits[:, :100] = -np.inf
    for top_k, top_p in [(900, 0.96), (0, 0.8), (4096, 0.5), (1, 0.3)]:
        got = np.asarray(filter_logits(jnp.asarray(logits), top_k, top_p))
        for row in range(4):
            np.testing.assert_array_equal(np.isinf(got[row]),
                                          np.isinf(hf_filter(logits[row], top_k, top_p)))


def test_top_k_keeps_ties():
    got = filter_logits(jnp.array([[1.0, 3.0, 2.0, 2.0, 0.0]]), 2, 1.0)
    np.testing.assert_array_equal(np.isfinite(got[0]), [False, True, True, True, False])


def test_cfg_logits_equal_manual_formula():
    cond, uncond = jnp.array([[1.0, 2.0, -1.0]]), jnp.array([[0.5, 0.0, 1.0]])
    np.testing.assert_allclose(cfg_combine(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    doubled = jnp.concatenate([cond, uncond])
    lin = SampleConfig(cfg=4.0, cfg_schedule="linear")
    np.testing.assert_allclose(guided_logits(doubled, lin, 0, 5), cond)  # ramp starts at 1
    np.testing.assert_allclose(guided_logits(doubled, lin, 4, 5), uncond + 4 * (cond - uncond))
    interval = SampleConfig(cfg=4.0, cfg_interval=2)
    np.testing.assert_allclose(guided_logits(doubled, interval, 3, 5), cond)


def exact_sequence_probs(graphdef, params, label: int, cfg: SampleConfig, grid: int, vocab):
    """p(x_1..x_L) for every sequence, from teacher-forced (guided) logits."""
    model = bind(graphdef, params)
    seqs = jnp.array(list(itertools.product(range(vocab), repeat=grid * grid)))
    cond = model(seqs, jnp.full((len(seqs),), label))
    logits = cond
    if cfg.uses_cfg:
        uncond = model(seqs, jnp.full((len(seqs),), model.cfg.num_classes))
        logits = uncond + cfg.cfg * (cond - uncond)
    logp = jax.nn.log_softmax(logits / cfg.temperature, -1)
    joint = jnp.take_along_axis(logp, seqs[..., None], -1)[..., 0].sum(-1)
    return np.asarray(seqs), np.exp(np.asarray(joint, np.float64))


@pytest.mark.parametrize("cfg", [SampleConfig(), SampleConfig(cfg=2.5),
                                 SampleConfig(temperature=0.7)])
def test_sampled_sequences_follow_model_distribution(cfg):
    """Chi-square over all 3^4 = 81 sequences of a tiny model, batch 4000."""
    vocab, grid = 3, 2
    graphdef, params = tiny_gpt(vocab_size=vocab, grid=grid, scale=0.5)
    seqs, probs = exact_sequence_probs(graphdef, params, 1, cfg, grid, vocab)
    n = 4000
    tokens, _ = sample_jit(graphdef, params, jax.random.key(0), jnp.ones((n,), jnp.int32), cfg)
    index = np.asarray(tokens) @ (vocab ** np.arange(grid * grid)[::-1])
    observed = np.bincount(index, minlength=len(seqs))
    expected = probs / probs.sum() * n
    keep = expected >= 5  # pool rare cells
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    assert stats.chisquare(obs, exp).pvalue > 1e-3


def test_greedy_equals_argmax_rollout_and_keys_are_deterministic():
    graphdef, params = tiny_gpt()
    model = bind(graphdef, params)
    labels = jnp.array([0, 2])
    greedy, _ = sample_jit(graphdef, params, jax.random.key(0), labels,
                           SampleConfig(temperature=0.0))
    seq = np.zeros((2, 9), np.int32)
    for t in range(9):
        seq[:, t] = np.argmax(model(jnp.asarray(seq), labels)[:, t], -1)
    np.testing.assert_array_equal(greedy, seq)
    a = sample_jit(graphdef, params, jax.random.key(5), labels, SampleConfig())[0]
    b = sample_jit(graphdef, params, jax.random.key(5), labels, SampleConfig())[0]
    c = sample_jit(graphdef, params, jax.random.key(6), labels, SampleConfig())[0]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_logprob_stat_matches_teacher_forcing():
    graphdef, params = tiny_gpt()
    labels = jnp.array([1, 3])
    tokens, stats_ = sample_jit(graphdef, params, jax.random.key(1), labels, SampleConfig())
    logits = bind(graphdef, params)(tokens, labels)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(stats_.logprob, lp, rtol=1e-4)
    assert int(stats_.target_passes) == 9


def test_cache_runs_give_the_same_samples():
    """The steps in runs with caches that end where each run does (the default) sample what
    one loop over the whole cache samples, with a prefix and a stop too."""
    graphdef, params = tiny_gpt()
    labels = jnp.array([1, 3])
    runs = lambda n, **kw: jax.jit(lambda p: sample(
        graphdef, p, jax.random.key(2), labels, SampleConfig(cfg=2.0, segments=n), **kw))(params)
    whole, whole_stats = runs(1)
    for n in (2, 4, 9, 20):
        tokens, stats_ = runs(n)
        np.testing.assert_array_equal(tokens, whole)
        np.testing.assert_allclose(stats_.logprob, whole_stats.logprob, rtol=1e-5)
    prefix = whole[:, :3]
    span = [runs(n, prefix=prefix, stop=7)[0] for n in (1, 3)]
    np.testing.assert_array_equal(span[0], span[1])
    np.testing.assert_array_equal(span[1][:, :3], prefix)
    assert np.all(np.asarray(span[1][:, 7:]) == 0)


@pytest.mark.parametrize("bad,match", [
    (SampleConfig(segments=0), "segments"),
    (SampleConfig(temperature=-1.0), "temperature"),
    (SampleConfig(top_k=17), "top_k"),
    (SampleConfig(top_p=0.0), "top_p"),
    (SampleConfig(cfg=-0.5), "sample.cfg"),
    (SampleConfig(cfg_schedule="cosine"), "cfg_schedule"),
])
def test_bad_sample_config_raises_before_compilation(bad, match):
    graphdef, params = tiny_gpt()
    with pytest.raises(ConfigError, match=match):
        jax.jit(sample, static_argnames="cfg").lower(graphdef, params, jax.random.key(0),
                                                     jnp.array([0]), bad)


def test_generator_contract_on_8_devices(devices):
    """make_generator: images (uint8 on the host) and aux sharded over the batch, stats as
    Python numbers plus the timed seconds; labels reach the sampler unchanged."""
    from arjax import sharding
    from arjax.sampling.generator import Samples, make_generator

    traced_under = []

    def sample_fn(params, fixed, key, labels):
        traced_under.append(dict(jax.sharding.get_abstract_mesh().shape))
        images = jnp.broadcast_to((labels[:, None, None, None] / 8.0) * params["scale"]
                                  * fixed["one"],
                                  (labels.shape[0], 4, 4, 3))
        passes = jax.lax.fori_loop(0, 5, lambda i, n: n + 1, jnp.int32(0))
        return Samples(images, {"labels_seen": labels}, {"target_passes": passes})

    generate = make_generator(sample_fn, sharding.make_mesh((("data", 8),), devices),
                              fixed={"one": jnp.float32(1.0)})
    labels = np.arange(8, dtype=np.int32)
    out = generate({"scale": jnp.float32(1.0)}, labels, jax.random.key(0))
    assert out.images.dtype == np.uint8 and out.images.shape == (8, 4, 4, 3)
    np.testing.assert_array_equal(out.images[:, 0, 0, 0], np.round((labels / 8 + 1) * 127.5))
    np.testing.assert_array_equal(out.aux["labels_seen"], labels)
    assert out.stats["target_passes"] == 5 and out.stats["seconds"] > 0
    assert traced_under == [{"data": 8}]  # traced under the mesh (the blocks' constraints)
