"""TTS-VAR search: potentials, resampling guards and k-means selection against brute-force
NumPy statements; the gather keeps a candidate's decoding state exactly (its continuation
equals decoding that path alone); one candidate per label is plain VAR sampling."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_var import PATCH, TINY_VAE, TINY_VAR, randomised

from arjax.config import ConfigError
from arjax.models import bind
from arjax.models.var import VAR
from arjax.nn.scales import scale_bounds
from arjax.sampling import search
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import MultiScaleVQVAE

HISTORY = np.array([[0.1, 0.5, 0.3], [0.2, 0.4, 0.9]])


@pytest.mark.parametrize("kind,r", [
    ("value", HISTORY[-1]), ("diff", HISTORY[-1] - HISTORY[-2]), ("max", HISTORY.max(0)),
    ("sum", HISTORY.sum(0))])
def test_potentials_are_exp_lambda_r(kind, r):
    p = search.potentials(HISTORY, kind, 10.0)
    expected = np.exp(10.0 * r)
    np.testing.assert_allclose(p / p.sum(), expected / expected.sum(), rtol=1e-12)


def test_resampling_is_proportional_with_uniform_guards():
    rng = np.random.default_rng(0)
    draws = search.resample(rng, np.array([1.0, 3.0, 0.0, 4.0]), 40_000)
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 40_000,
                               [0.125, 0.375, 0.0, 0.5], atol=0.01)
    for bad in ([np.nan, 1.0, 1.0, 1.0], [0.0] * 4, [np.inf, 1.0, 1.0, 1.0]):
        draws = search.resample(rng, np.array(bad), 40_000)
        np.testing.assert_allclose(np.bincount(draws, minlength=4) / 40_000, [0.25] * 4,
                                   atol=0.01)


def test_cluster_selection_matches_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 6.0]])
    points = np.concatenate([c + 0.5 * rng.normal(size=(n, 2))
                             for c, n in zip(centres, (3, 3, 3))])  # no ties of 2
    best = None
    for assign in itertools.product(range(3), repeat=len(points)):  # every partition
        assign = np.array(assign)
        if len(set(assign)) < 3:
            continue
        inertia = sum(((points[assign == c] - points[assign == c].mean(0)) ** 2).sum()
                      for c in range(3))
        if best is None or inertia < best[0]:
            best = (inertia, assign)
    expected = set()
    for c in range(3):
        members = np.flatnonzero(best[1] == c)
        centroid = points[members].mean(0)
        expected.add(int(members[np.argmin(np.linalg.norm(points[members] - centroid, axis=1))]))
    assert set(search.cluster_select(points, 3).tolist()) == expected


def test_structure_vectors_are_the_first_principal_projection():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=16), rng.normal(size=8)
    feats = np.outer(u, v) + 3.0  # rank one around a constant
    (p,) = search.structure_vectors(feats[None])
    expected = (u - u.mean()) * np.linalg.norm(v)
    expected *= np.sign(expected[np.argmax(np.abs(expected))])
    np.testing.assert_allclose(p, expected, rtol=1e-8, atol=1e-8)
    (flipped,) = search.structure_vectors(-feats[None] + 6.0)  # same layout, sign fixed
    np.testing.assert_allclose(np.abs(flipped), np.abs(p), atol=1e-8)


@functools.cache  # built once per test process
def models():
    model = randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3)
    vae = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    return model, vae


SAMPLE = var_sampling.VARSampleConfig(cfg=3.0, top_k=6, top_p=0.9)
NO_SEARCH = search.SearchConfig(batch_schedule=(1,) * len(PATCH), cluster_scales=(),
                                resample_scales=())


@pytest.mark.slow  # compiles a step per scale plus the plain sampler
def test_one_candidate_per_label_is_plain_sampling():
    model, vae = models()
    labels = np.array([0, 1, 2, 3])
    plain = jax.jit(var_sampling.sample, static_argnames="cfg")(
        *model, *vae, jax.random.key(5), jnp.asarray(labels), SAMPLE)
    out, stats = search.search_sample(*model, *vae, jax.random.key(5), labels, SAMPLE,
                                      NO_SEARCH, reward=lambda im, y: np.zeros(len(y)))
    np.testing.assert_array_equal(out.aux["codes"], plain.aux["codes"])
    np.testing.assert_allclose(out.images, plain.images, atol=1e-5)
    assert stats["token_passes_per_image"] == 2 * sum(p * p for p in PATCH)


@pytest.mark.slow
def test_gathered_candidate_continues_as_if_decoded_alone():
    """Candidate 2 of 4 after scales 0-1, gathered, then scale 2 == a fresh decoding state
    built from its own codes (the model's prefill over scales 0-1), then scale 2."""
    (graphdef, params), (vae_graphdef, vae_params) = models()
    model, vae = bind(graphdef, params), bind(vae_graphdef, vae_params)
    labels = jnp.array([1, 1, 1, 1])
    s = var_sampling._start(model, labels, True)
    state = {"cache": s.cache, "x": model.embed(s.cond, None, 0),
             "f_hat": jnp.zeros((4, 4, 4, 4)), "codes": jnp.zeros((4, 30), jnp.int32)}
    for k in (0, 1):
        state, _ = search._scale_step(graphdef, params, vae_graphdef, vae_params, state,
                                      labels, jax.random.key(9), k, SAMPLE, 4)
    kept = search.gather(state, np.array([2]), guided=True)
    after, _ = search._scale_step(graphdef, params, vae_graphdef, vae_params, kept,
                                  labels[:1], jax.random.key(11), 2, SAMPLE, 1)
    # Alone: rebuild f_hat and the inputs of scales 1-2 from candidate 2's codes.
    codes = state["codes"][2:3]
    codebook = vae.quantize.embedding.embedding[...]
    f_hat, inputs = jnp.zeros((1, 4, 4, 4)), []
    for k, (b, e) in enumerate(scale_bounds(PATCH)[:2]):
        f_hat, nxt = vae.quantize.next_input(k, f_hat, codebook[codes[:, b:e]], 4)
        inputs.append(nxt)
    alone = var_sampling._start(model, labels[:1], True)
    x = jnp.concatenate([model.embed(alone.cond, None, 0),
                         model.embed(None, jnp.concatenate([inputs[0]] * 2), 1)], axis=1)
    _, cache = model.decode_scale(x, alone.cond, alone.block_cond, alone.cache, 0)
    fresh = {"cache": cache, "f_hat": f_hat, "codes": codes,
             "x": model.embed(None, jnp.concatenate([inputs[1]] * 2), scale_bounds(PATCH)[1][1])}
    again, _ = search._scale_step(graphdef, params, vae_graphdef, vae_params, fresh,
                                  labels[:1], jax.random.key(11), 2, SAMPLE, 1)
    np.testing.assert_array_equal(after["codes"], again["codes"])
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(again)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_search_keeps_the_best_rewarded_candidate_and_counts_its_compute():
    model, vae = models()
    cfg = search.SearchConfig(batch_schedule=(4, 3, 2, 1), cluster_scales=(1,),
                              resample_scales=(2,))
    rewards = []

    def reward(images, labels):  # brighter is better
        rewards.append(images.mean(axis=(1, 2, 3)))
        return rewards[-1]

    features = lambda images: images.reshape(len(images), 16, -1)  # 4x4 patches
    out, stats = search.search_sample(*model, *vae, jax.random.key(0), np.array([0, 3]),
                                      SAMPLE, cfg, reward, features)
    assert out.images.shape == (2, 16, 16, 3) and out.aux["codes"].shape == (2, 30)
    final = rewards[-1].reshape(2, 2)  # the last scale's candidates, 2 per label
    np.testing.assert_allclose(np.asarray(out.images).mean(axis=(1, 2, 3)), final.max(1),
                               atol=1e-5)
    counts = (4, 4, 3, 2)  # candidates decoded at each scale
    assert stats["token_passes_per_image"] == sum(2 * c * p * p for c, p in
                                                  zip(counts, PATCH))
    assert stats["vae_decodes_per_image"] == 4 + 3 + 2  # the last scale's are the output


@pytest.mark.parametrize("bad,match", [
    (dict(batch_schedule=(4, 4, 4)), "one per scale"),
    (dict(batch_schedule=(4, 2, 2, 1), cluster_scales=(), resample_scales=()),
     "drops from 4 to 2 at scale 1"),
    (dict(batch_schedule=(4, 4, 8, 1)), "must not grow"),
    (dict(potential="mean"), "potential must be one of"),
    (dict(batch_schedule=(4, 4, 4, 1), cluster_scales=(3,), resample_scales=()),
     "must lie in"),
])
def test_bad_search_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        search.SearchConfig(**{"batch_schedule": (4, 4, 2, 1), "cluster_scales": (2,),
                               "resample_scales": (), **bad}).validate(len(PATCH))


def test_digits_classifier_gives_structure_features_and_rewards():
    from arjax.data.sources import digits
    from arjax.metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator.load()
    source = digits("test", 32)
    images, labels = source.images[:40], source.labels[:40]
    feats = evaluator.spatial_features(images)
    assert feats.shape == (40, 16, 64) and search.structure_vectors(feats).shape == (40, 16)
    right = evaluator.log_prob(images, labels)
    wrong = evaluator.log_prob(images, (labels + 1) % 10)
    assert right.shape == (40,) and np.all(right <= 0) and right.mean() > wrong.mean() + 2
