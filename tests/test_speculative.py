"""Speculative samplers: lossless ones reproduce the plain AR joint exactly (enumeration +
chi-square at batch 20000 with CFG), relaxed ones stay within their bounds, greedy equals AR."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_gpt
from scipy import stats

from arjax.config import ConfigError
from arjax.models import bind
from arjax.sampling import raster, speculative
from arjax.sampling.acceptance import Exact, Grouped, Relaxed, nearest_codes
from arjax.sampling.common import SampleConfig, cfg_scale_at
from arjax.sampling.speculative import SpeculativeConfig, token_probs

spec_jit = jax.jit(speculative.sample, static_argnames=("scfg", "cfg"))
VOCAB, GRID = 3, 2
# Small weights keep the 81-sequence joint spread out (a peaked joint would hide errors).
TARGET = dict(seed=1, vocab_size=VOCAB, grid=GRID, scale=0.05)
DRAFT = dict(seed=7, vocab_size=VOCAB, grid=GRID, scale=0.1, dim=16, heads=1)


def exact_joint(graphdef, params, label: int, cfg: SampleConfig) -> np.ndarray:
    """P(sequence) for all VOCAB^L sequences (lexicographic), from teacher-forced logits
    guided at each position's scale and filtered as the plain sampler does."""
    model = bind(graphdef, params)
    seqs = jnp.array(list(itertools.product(range(VOCAB), repeat=GRID * GRID)))
    logits = model(seqs, jnp.full((len(seqs),), label))
    if cfg.uses_cfg:
        uncond = model(seqs, jnp.full((len(seqs),), model.cfg.num_classes))
        scale = jnp.broadcast_to(cfg_scale_at(cfg, jnp.arange(GRID * GRID), GRID * GRID),
                                 (GRID * GRID,))
        logits = uncond + scale[:, None] * (logits - uncond)
    probs = jnp.take_along_axis(token_probs(logits, cfg), seqs[..., None], -1)[..., 0]
    return np.prod(np.asarray(probs, np.float64), axis=-1)


def sequence_counts(tokens) -> np.ndarray:
    index = np.asarray(tokens) @ (VOCAB ** np.arange(GRID * GRID)[::-1])
    return np.bincount(index, minlength=VOCAB ** (GRID * GRID))


def chi_square_pvalue(counts, probs) -> float:
    expected = probs / probs.sum() * counts.sum()
    assert counts[probs == 0].sum() == 0, "sampled a sequence of probability zero"
    counts, expected = counts[probs > 0], expected[probs > 0]
    keep = expected >= 5
    if not keep.all():  # pool the rare sequences into one bin
        counts = np.append(counts[keep], counts[~keep].sum())
        expected = np.append(expected[keep], expected[~keep].sum())
    return stats.chisquare(counts, expected).pvalue


# sd and sjd-uniform sample with the default cache runs; the others with one cache (a loop
# to compile, not four), which test_cache_runs_give_the_same_samples shows samples the same.
LOSSLESS = [
    ("sd", dict(), SampleConfig()),
    ("sd-cfg-linear-topk", dict(), SampleConfig(cfg=3.0, cfg_schedule="linear",
                                                temperature=0.8, top_k=2, segments=1)),
    ("spectr", dict(num_drafts=3), SampleConfig(cfg=2.5, segments=1)),
    ("sjd-uniform", dict(drafter="jacobi"), SampleConfig(cfg=2.5)),
    ("sjd-onehot-topk", dict(drafter="jacobi", init="onehot"),
     SampleConfig(top_k=2, segments=1)),
    ("sjd-up", dict(drafter="jacobi", init="up"), SampleConfig(cfg=2.5, segments=1)),
    ("sjd-left", dict(drafter="jacobi", init="left", draft_len=5), SampleConfig(segments=1)),
]


@pytest.mark.parametrize("name,spec,sample_cfg", LOSSLESS, ids=[c[0] for c in LOSSLESS])
def test_lossless_joint_equals_plain_sampling(name, spec, sample_cfg):
    target, draft = tiny_gpt(**TARGET), tiny_gpt(**DRAFT)
    cfg = SpeculativeConfig(**{"draft_len": 3, **spec})
    n = 20000  # one batch: every row is its own chain, at its own position
    tokens, st = spec_jit(*target, jax.random.key(0), jnp.ones((n,), jnp.int32), sample_cfg,
                          cfg, draft=draft)
    assert chi_square_pvalue(sequence_counts(tokens), exact_joint(*target, 1, sample_cfg)) > 1e-3
    assert int(st.target_passes) <= GRID * GRID
    rounds = np.asarray(st.rounds)
    assert np.all(np.asarray(st.accepted) <= cfg.draft_len * rounds)
    assert np.mean(rounds) < GRID * GRID  # drafts do get accepted


def test_plain_sampler_matches_exact_reference():
    """The reference used above is the plain sampler's distribution (linear CFG, top-k)."""
    target = tiny_gpt(**TARGET)
    cfg = LOSSLESS[1][2]
    tokens, _ = jax.jit(raster.sample, static_argnames="cfg")(
        *target, jax.random.key(3), jnp.ones((20000,), jnp.int32), cfg)
    assert chi_square_pvalue(sequence_counts(tokens), exact_joint(*target, 1, cfg)) > 1e-3


@pytest.mark.parametrize("spec", [dict(), dict(num_drafts=2), dict(drafter="jacobi", init="up")])
def test_greedy_speculative_equals_greedy_ar(spec):
    target, draft = tiny_gpt(seed=0), tiny_gpt(seed=3)
    labels = jnp.array([0, 1, 2, 3, 1, 0])
    sc = SampleConfig(temperature=0.0, cfg=2.0)
    ar, _ = jax.jit(raster.sample, static_argnames="cfg")(*target, jax.random.key(0), labels, sc)
    spec_tokens, _ = spec_jit(*target, jax.random.key(1), labels, sc,
                              SpeculativeConfig(draft_len=4, **spec), draft=draft)
    np.testing.assert_array_equal(spec_tokens, ar)


@pytest.mark.parametrize("spec", [dict(num_drafts=2), dict(drafter="jacobi")])
def test_cache_runs_give_the_same_samples(spec):
    """Rounds over caches in runs (the default 4) are the rounds of one loop over the whole
    cache: same tokens and the same counts, with rows at different positions (batch 6); the
    draft model's cache grows in the same runs."""
    target, draft = tiny_gpt(seed=0), tiny_gpt(seed=3, dim=16, heads=1)
    labels = jnp.array([0, 1, 2, 3, 1, 0])
    runs = lambda n: spec_jit(*target, jax.random.key(5), labels, SampleConfig(cfg=2.0, segments=n),
                              SpeculativeConfig(draft_len=2, **spec), draft=draft)
    (whole, whole_stats), (tokens, st) = runs(1), runs(4)
    np.testing.assert_array_equal(tokens, whole)
    for a, b in zip(st, whole_stats):
        np.testing.assert_array_equal(a, b)
    assert len(set(np.asarray(whole_stats.rounds).tolist())) > 1  # rows did drift apart


def test_identical_draft_accepts_everything():
    target = tiny_gpt(seed=0)
    _, st = spec_jit(*target, jax.random.key(0), jnp.arange(4) % 4, SampleConfig(),
                     SpeculativeConfig(), draft=target)
    # p == q: every draft is accepted, 9 tokens take ceil(9 / 5) = 2 target calls.
    assert int(st.target_passes) == 2
    np.testing.assert_array_equal(st.accepted, [8, 8, 8, 8])


@pytest.mark.parametrize("relaxed,exact", [
    (dict(drafter="jacobi", accept="group", group_window=0), dict(drafter="jacobi")),
    (dict(accept="relaxed", delta=0.0), dict()),
])
def test_relaxations_switched_off_are_the_lossless_rule(relaxed, exact):
    """GSD with a one-token group is SJD, LANTERN with delta = 0 is SD: same tokens, same key."""
    target, draft = tiny_gpt(seed=0), tiny_gpt(seed=3)
    codes = jax.random.normal(jax.random.key(5), (16, 4))
    labels, sc = jnp.array([0, 1, 2, 3, 1, 0]), SampleConfig(cfg=2.0, top_k=8)
    run = lambda spec: spec_jit(*target, jax.random.key(2), labels, sc,
                                SpeculativeConfig(**spec), draft=draft, codes=codes)
    np.testing.assert_array_equal(run(relaxed)[0], run(exact)[0])
    if relaxed.get("accept") == "relaxed":  # a precomputed neighbour table: the same tokens
        table = nearest_codes(codes, SpeculativeConfig().neighbours)
        np.testing.assert_array_equal(
            spec_jit(*target, jax.random.key(2), labels, sc, SpeculativeConfig(**relaxed),
                     draft=draft, neighbours=table)[0], run(exact)[0])


def random_rows(seed, rows=64, vocab=12, zeros=3):
    """Random distributions with some exact zeros (as after top-k)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(vocab, 0.7), rows)
    p[np.arange(rows)[:, None], rng.integers(0, vocab, (rows, zeros))] = 0
    return jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)


def output_law(rule, p, q, x):
    """P(output) for a draft x fixed in advance (q = one-hot): accept or draw the residual."""
    a = rule.accept(p[:, None], q[:, None], x[:, None])[:, 0]
    r = rule.residual(p, q, x)
    r = r / jnp.maximum(r.sum(-1, keepdims=True), 1e-30)
    return a[:, None] * jax.nn.one_hot(x, p.shape[-1]) + (1 - a[:, None]) * r


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.2, 0.5])
def test_relaxed_rule_stays_within_tv_budget(delta):
    p = random_rows(0)
    x = jax.random.randint(jax.random.key(1), (p.shape[0],), 0, p.shape[1])
    codes = jax.random.normal(jax.random.key(2), (p.shape[1], 3))
    rule = Relaxed(nearest_codes(codes, 5), delta)
    out = output_law(rule, p, jax.nn.one_hot(x, p.shape[1]), x)
    tv = 0.5 * jnp.abs(out - p).sum(-1)
    moved = rule.moved(p, x)[2]
    assert np.all(np.asarray(tv) <= delta + 1e-6)
    np.testing.assert_allclose(tv, moved, atol=1e-6)  # exactly the moved mass
    px = jnp.take_along_axis(p, x[:, None], 1)[:, 0]
    np.testing.assert_allclose(rule.accept(p[:, None], jax.nn.one_hot(x, 12)[:, None],
                                           x[:, None])[:, 0], jnp.minimum(1, px + moved),
                               atol=1e-6)
    if delta == 0:
        np.testing.assert_allclose(out, p, atol=1e-6)
    if delta >= 0.2:
        assert float(jnp.mean(moved)) > 0.02  # the relaxation actually does something


def test_relaxed_and_group_rules_reduce_to_exact():
    p, q = random_rows(3), random_rows(4)
    x = jax.random.categorical(jax.random.key(0), jnp.log(q))[:, None]
    codes = jax.random.normal(jax.random.key(2), (12, 3))
    exact = Exact().accept(p[:, None], q[:, None], x)
    for rule in (Relaxed(nearest_codes(codes, 11), 0.0), Grouped(window=0)):
        np.testing.assert_allclose(rule.accept(p[:, None], q[:, None], x), exact)
        np.testing.assert_allclose(rule.residual(p, q, x[:, 0]), Exact().residual(p, q, x))


def test_group_masses_match_the_official_description():
    """Rank window 7 below / 6 above in ascending order = 6 above / 7 below descending,
    |p(y) - p(x)| < p_thr and squared code distance < d_thr; brute force in numpy."""
    p, q = np.asarray(random_rows(5, vocab=30, zeros=0)), np.asarray(random_rows(6, vocab=30))
    codes = np.asarray(jax.random.normal(jax.random.key(3), (30, 2))) * 0.5
    x = np.random.default_rng(0).integers(0, 30, p.shape[0])
    rule = Grouped(window=6, p_threshold=0.05, dist_threshold=0.6, codes=jnp.asarray(codes))
    got_p, got_q = rule.group_masses(jnp.asarray(p), jnp.asarray(q), jnp.asarray(x))
    for row in range(p.shape[0]):
        ascending = list(np.argsort(p[row], kind="stable"))
        r = ascending.index(x[row])
        group = [y for y in ascending[max(r - 7, 0):r + 7]
                 if abs(p[row, y] - p[row, x[row]]) < 0.05
                 and ((codes[y] - codes[x[row]]) ** 2).sum() < 0.6]
        assert x[row] in group
        np.testing.assert_allclose(got_p[row], p[row, group].sum(), rtol=1e-5)
        np.testing.assert_allclose(got_q[row], q[row, group].sum(), rtol=1e-5)
    assert np.mean(np.asarray(got_p) > p[np.arange(len(x)), x] + 1e-7) > 0.3  # groups form


def test_nearest_codes_brute_force():
    codes = jax.random.normal(jax.random.key(0), (50, 3))
    got = nearest_codes(codes, 4, chunk=16)
    d2 = ((np.asarray(codes)[:, None] - np.asarray(codes)[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    np.testing.assert_array_equal(got, np.argsort(d2, 1, kind="stable")[:, :4])


@pytest.mark.parametrize("bad,match", [
    (dict(draft_len=0), "draft_len"), (dict(drafter="eagle"), "drafter"),
    (dict(accept="typical"), "accept"), (dict(num_drafts=2, drafter="jacobi"), "num_drafts"),
    (dict(init="diagonal", drafter="jacobi"), "init"), (dict(delta=1.5), "delta"),
    (dict(accept="relaxed"), "code vectors"),
])
def test_bad_config_fails_before_compiling(bad, match):
    target = tiny_gpt(seed=0)
    with pytest.raises(ConfigError, match=match):
        spec_jit(*target, jax.random.key(0), jnp.zeros((1,), jnp.int32), SampleConfig(),
                 SpeculativeConfig(**bad), draft=target)
