"""Scale-wise search (TTS-VAR, and the same on FlowAR): potentials, resampling guards and
k-means selection against brute-force NumPy statements; for both families the gather keeps a
candidate's decoding state exactly (its continuation equals decoding that path alone) and one
candidate per label is plain sampling."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_convert_flowar import TINY_KL
from test_flowar import tiny as tiny_flowar
from test_var import PATCH, TINY_VAE, TINY_VAR, randomised

from arjax.config import ConfigError
from arjax.models import bind, split
from arjax.models.flowar import next_input
from arjax.models.var import VAR
from arjax.nn.scales import scale_bounds
from arjax.sampling import flowar as flowar_sampling
from arjax.sampling import search
from arjax.sampling import var as var_sampling
from arjax.tokenizers.kl import KLVAE
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


@functools.cache
def flowar_models():
    _, graphdef, params = tiny_flowar(cross=True, seed=4)
    return (graphdef, params), split(KLVAE(TINY_KL, rngs=nnx.Rngs(0)))


SAMPLE = var_sampling.VARSampleConfig(cfg=3.0, top_k=6, top_p=0.9)
FLOW_SAMPLE = flowar_sampling.FlowSampleConfig(num_steps=3, cfg=3.0)
NO_SEARCH = lambda scales: search.SearchConfig(batch_schedule=(1,) * scales,
                                               cluster_scales=(), resample_scales=())
ZERO = lambda images, labels: np.zeros(len(labels))


def candidates(family):
    if family == "var":
        return var_sampling.Candidates(*models()[0], *models()[1], SAMPLE)
    return flowar_sampling.Candidates(*flowar_models()[0], *flowar_models()[1], FLOW_SAMPLE,
                                      0.5)


@pytest.mark.slow  # compiles a step per scale plus the plain sampler
def test_one_candidate_per_label_is_plain_var_sampling():
    model, vae = models()
    labels = np.array([0, 1, 2, 3])
    plain = jax.jit(var_sampling.sample, static_argnames="cfg")(
        *model, *vae, jax.random.key(5), jnp.asarray(labels), SAMPLE)
    out, stats = search.search(candidates("var"), jax.random.key(5), labels,
                               NO_SEARCH(len(PATCH)), ZERO)
    np.testing.assert_array_equal(out.aux["codes"], plain.aux["codes"])
    np.testing.assert_allclose(out.images, plain.images, atol=1e-5)
    assert stats["token_passes_per_image"] == 2 * sum(p * p for p in PATCH)


@pytest.mark.slow  # 95 s on 2 busy cores; the gather test below stays in the quick suite
def test_one_candidate_per_label_is_plain_flowar_sampling():
    model, vae = flowar_models()
    labels = np.array([0, 2, 1])
    plain = jax.jit(flowar_sampling.sample, static_argnames=("cfg", "latent_scale"))(
        *model, *vae, jax.random.key(5), jnp.asarray(labels), FLOW_SAMPLE, 0.5)
    out, stats = search.search(candidates("flowar"), jax.random.key(5), labels, NO_SEARCH(3),
                               ZERO)
    # random weights give latents of tens: one jit against per-scale jits differ by float
    # rounding only
    np.testing.assert_allclose(out.aux["latents"], plain.aux["latents"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.images, plain.images, rtol=1e-4, atol=1e-4)
    assert stats["token_passes_per_image"] == 2 * (1 + 4 + 16)  # CFG doubles
    steps = plain.stats["nfe"]  # flow-head calls, counted by the plain sampler
    assert stats["head_token_passes_per_image"] == 2 * steps / 3 * (1 + 4 + 16)


@pytest.mark.slow
def test_gathered_var_candidate_continues_as_if_decoded_alone():
    """Candidate 2 of 4 after scales 0-1, gathered, then scale 2 == a fresh decoding state
    built from its own codes (the model's prefill over scales 0-1), then scale 2."""
    (graphdef, params), (vae_graphdef, vae_params) = models()
    model, vae = bind(graphdef, params), bind(vae_graphdef, vae_params)
    cands = candidates("var")
    labels = jnp.array([1, 1, 1, 1])
    state = cands.start(labels)
    for k in (0, 1):
        state, _, _ = cands.step(state, labels, jax.random.key(9), k, False)
    kept = cands.gather(state, jnp.array([2]))
    after, _, _ = cands.step(kept, labels[:1], jax.random.key(11), 2, False)
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
    again, _, _ = cands.step(fresh, labels[:1], jax.random.key(11), 2, False)
    np.testing.assert_array_equal(after["codes"], again["codes"])
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(again)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.slow  # 78 s on 2 cores
def test_gathered_flowar_candidate_continues_as_if_decoded_alone():
    """Candidate 2 of 4 (of different labels) after scales 0-1, gathered, then scale 2 == the
    trunk run alone over that candidate's own levels, then scale 2."""
    (graphdef, params), _ = flowar_models()
    model, cands = bind(graphdef, params), candidates("flowar")
    labels = jnp.array([0, 2, 1, 2])
    state, levels = cands.start(labels), []
    for k in (0, 1):
        state, _, _ = cands.step(state, labels, jax.random.key(9), k, False)
        levels.append(state["level"][2:3])
    kept = cands.gather(state, jnp.array([2]))
    after, _, _ = cands.step(kept, labels[2:3], jax.random.key(11), 2, True)
    cond = model.class_emb(jnp.array([1, model.cfg.num_classes]))
    x, cache = model.embed(cond, None, 0), model.init_cache(2)
    for k in (0, 1):
        _, cache = model.decode_scale(x, cond, cache, k)
        nxt = next_input(levels[k], model.cfg.side, model.cfg.scales[k + 1])
        x = model.embed(None, jnp.concatenate([nxt, nxt]), k + 1)
    fresh = {"cache": cache, "x": x, "level": levels[1]}
    again, _, _ = cands.step(fresh, labels[2:3], jax.random.key(11), 2, True)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(again)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", [pytest.param("var", marks=pytest.mark.slow),
                                    pytest.param("flowar", marks=pytest.mark.slow)])
def test_search_keeps_the_best_rewarded_candidate_and_counts_its_compute(family):
    cands = candidates(family)
    schedule = (4, 3, 2, 1)[-cands.scales:]
    cfg = search.SearchConfig(batch_schedule=schedule,
                              cluster_scales=(cands.scales - 3,),
                              resample_scales=(cands.scales - 2,))
    rewards = []

    def reward(images, labels):  # brighter is better
        rewards.append(images.mean(axis=(1, 2, 3)))
        return rewards[-1]

    features = lambda images: images.reshape(len(images), 16, -1)  # 16 patches
    out, stats = search.search(cands, jax.random.key(0), np.array([0, 2]), cfg, reward,
                               features)
    assert len(out.images) == 2
    final = rewards[-1].reshape(2, 2)  # the last scale's candidates, 2 per label
    np.testing.assert_allclose(np.asarray(out.images).mean(axis=(1, 2, 3)), final.max(1),
                               atol=1e-5)
    counts = (schedule[0],) + schedule[:-1]  # candidates decoded at each scale
    tokens = {"var": [p * p for p in PATCH], "flowar": [1, 4, 16]}[family]  # per scale
    assert stats["token_passes_per_image"] == sum(2 * c * t for c, t in zip(counts, tokens))
    assert stats["vae_decodes_per_image"] == sum(counts[-3:])  # the selection scales


@pytest.mark.slow  # compiles a step per scale and count, with and without the mesh
def test_search_on_8_devices_splits_the_candidates_and_equals_one_device(devices):
    """Candidates split over the mesh while their count divides it (8, then 4 replicated):
    the same selections, codes and images as the search on one device."""
    from arjax import sharding

    mesh = sharding.make_mesh((("data", 8),), devices)
    cfg = search.SearchConfig(batch_schedule=(4, 4, 2, 1), cluster_scales=(),
                              resample_scales=(2,))
    reward = lambda images, labels: np.asarray(images).mean(axis=(1, 2, 3))
    cands, split_rows = candidates("var"), []

    class Recorded:  # records whether each step's candidates were split over the devices
        scales, start, gather, outputs = cands.scales, cands.start, cands.gather, cands.outputs

        def step(self, state, labels, key, k, decode):
            out = cands.step(state, labels, key, k, decode)
            split_rows.append(not out[0]["codes"].sharding.is_fully_replicated)
            return out

    labels = np.array([0, 2])
    alone, stats = search.search(cands, jax.random.key(4), labels, cfg, reward)
    split, split_stats = search.search(Recorded(), jax.random.key(4), labels, cfg, reward,
                                       mesh=mesh)
    assert split_rows == [True, True, True, False]  # 8, 8, 8 candidates, then 4
    np.testing.assert_array_equal(split.aux["codes"], alone.aux["codes"])
    np.testing.assert_allclose(split.images, alone.images, atol=1e-5)
    assert split_stats == pytest.approx(stats)


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


def brightness(images, labels):
    """A reward `hook` resolves by name (`test_search:brightness`)."""
    return np.asarray(images).mean(axis=(1, 2, 3))


@pytest.mark.slow  # 70 s: compiles a FlowAR step per scale and count
def test_experiment_generator_searches_with_a_named_reward():
    from arjax import sharding

    mesh = sharding.make_mesh()
    cfg = search.SearchConfig(enabled=True, batch_schedule=(3, 2, 1), cluster_scales=(),
                              resample_scales=(1,), reward="test_search:brightness")
    generate = search.make_generator(lambda p: flowar_sampling.Candidates(
        flowar_models()[0][0], p, *flowar_models()[1], FLOW_SAMPLE, 0.5), cfg, mesh)
    out = generate(flowar_models()[0][1], np.array([0, 1]), jax.random.key(3))
    assert out.images.dtype == np.uint8 and out.images.shape == (2, 8, 8, 3)
    assert out.aux["latents"].shape == (2, 4, 4, 3)
    assert out.stats["vae_decodes_per_image"] == 3 + 2 and out.stats["seconds"] > 0


@pytest.mark.parametrize("sets,match", [
    (["search.enabled=true", "search.batch_schedule=4,2,1"], "one per scale"),
    (["search.enabled=true", "search.reward=no_such_module:f"], "cannot be imported"),
    (["search.enabled=true", "search.reward="], "search.reward is empty"),
])
def test_experiment_search_config_errors(sets, match):
    from arjax import config as cfglib
    from arjax import sharding
    from experiments import flowar_imagenet as exp

    cfg = cfglib.override(exp.DIGITS, sets)
    mesh = sharding.make_mesh(cfg.mesh)
    with pytest.raises(ConfigError, match=match):
        exp.validate(cfg, mesh)
        search.make_generator(None, cfg.search, mesh)
