"""DD1's token flow: closed forms, the exact maps it must equal, its output law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from arjax.config import ConfigError
from arjax.distill import flow


def _codes(rng, v, c, unit=False):
    codes = rng.normal(size=(v, c))
    return codes / np.linalg.norm(codes, axis=-1, keepdims=True) if unit else codes


def test_closed_forms_match_autodiff_and_identities():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        codes = jnp.asarray(_codes(rng, 7, 3))
        logp = jnp.log(jnp.asarray(rng.dirichlet(np.ones(7))))
        for t in (0.9, 0.5, 0.1):
            x = jnp.asarray(rng.normal(size=(5, 3)))

            def log_density(xi, t=t):  # log sum_j p_j N(xi; (1 - t) c_j, t^2 I) + const
                sq = jnp.sum((xi - (1 - t) * codes) ** 2, -1)
                return jax.nn.logsumexp(logp - sq / (2 * t**2))

            s = flow.score(x, t, logp, codes)
            np.testing.assert_allclose(s, jax.vmap(jax.grad(log_density))(x), atol=1e-8)
            v = flow.velocity(x, t, logp, codes)
            np.testing.assert_allclose(v, (-t * s - x) / (1 - t), atol=1e-8)
            np.testing.assert_allclose(flow.denoise(x, t, logp, codes), x - t * v, atol=1e-8)


def test_one_dimensional_flow_is_the_quantile_map():
    rng = np.random.default_rng(1)
    codes = np.sort(rng.normal(size=5))[:, None]
    p = rng.dirichlet(np.ones(5))
    eps = np.linspace(-4, 4, 20001)[:, None]
    tokens, _ = flow.flow_tokens(jnp.asarray(eps), jnp.log(jnp.asarray(p))[None], codes)
    thresholds = stats.norm.ppf(np.cumsum(p)[:-1])
    exact = np.searchsorted(thresholds, eps[:, 0])
    wrong = np.asarray(tokens) != exact
    assert wrong.mean() < 2e-3, wrong.mean()
    # errors only right at a boundary between two tokens' regions
    gap = np.min(np.abs(eps[wrong] - thresholds[None]), axis=-1) if wrong.any() else 0
    assert np.all(gap < 0.01), gap


def test_two_codes_split_space_by_a_hyperplane():
    rng = np.random.default_rng(2)
    codes = _codes(rng, 2, 8)
    p1 = 0.3
    eps = rng.normal(size=(20000, 8))
    tokens, _ = flow.flow_tokens(jnp.asarray(eps), jnp.log(jnp.asarray([[p1, 1 - p1]])),
                                 codes)
    u = (codes[1] - codes[0]) / np.linalg.norm(codes[1] - codes[0])
    proj = eps @ u
    exact = (proj >= stats.norm.ppf(p1)).astype(int)
    wrong = np.asarray(tokens) != exact
    assert wrong.mean() < 1e-3
    assert np.all(np.abs(proj[wrong] - stats.norm.ppf(p1)) < 1e-2)


def test_pushforward_is_the_filtered_categorical():
    rng = np.random.default_rng(3)
    v, n = 64, 100_000
    codes = _codes(rng, v, 8, unit=True)
    logits = jnp.asarray(rng.normal(size=v) * 1.5, jnp.float32)
    kept = jax.lax.top_k(logits, 20)[0][-1]
    logits = jnp.where(logits < kept, -jnp.inf, logits)
    p = np.asarray(jax.nn.softmax(logits))
    noise = jax.random.normal(jax.random.key(0), (n, 8))
    tokens, _ = jax.jit(flow.flow_tokens)(noise, jnp.broadcast_to(logits, (n, v)), codes)
    counts = np.bincount(np.asarray(tokens), minlength=v)
    assert counts[p == 0].sum() == 0  # filtered tokens never come out
    support = p > 0
    chi2 = stats.chisquare(counts[support], n * p[support])
    assert chi2.pvalue > 1e-3, chi2
    assert 0.5 * np.abs(counts / n - p).sum() < 0.01


def test_one_hot_maps_everything_to_its_code_and_batching_changes_nothing():
    rng = np.random.default_rng(4)
    codes = _codes(rng, 6, 4)
    noise = jnp.asarray(rng.normal(size=(64, 4)) * 3, jnp.float32)
    one_hot = jnp.where(jnp.arange(6) == 2, 0.0, -jnp.inf)
    tokens, end = flow.flow_tokens(noise, jnp.broadcast_to(one_hot, (64, 6)), codes)
    assert np.all(np.asarray(tokens) == 2)
    np.testing.assert_allclose(end, np.broadcast_to(codes[2], (64, 4)), atol=1e-3)
    logits = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    whole = flow.flow_tokens(noise, logits, codes)[0]
    alone = jnp.concatenate([flow.flow_tokens(noise[i:i + 16], logits[i:i + 16], codes)[0]
                             for i in range(0, 64, 16)])
    np.testing.assert_array_equal(whole, alone)


def test_heun_converges_faster_than_euler():
    rng = np.random.default_rng(5)
    codes = np.sort(rng.normal(size=5))[:, None]
    p = rng.dirichlet(np.ones(5))
    eps = np.linspace(-4, 4, 20001)[:, None]
    exact = np.searchsorted(stats.norm.ppf(np.cumsum(p)[:-1]), eps[:, 0])

    def mismatch(steps, solver):
        grid = np.linspace(1, 1e-4, steps + 1)
        tokens, _ = flow.flow_tokens(jnp.asarray(eps), jnp.log(jnp.asarray(p))[None], codes,
                                     grid, solver)
        return np.mean(np.asarray(tokens) != exact)

    euler = [mismatch(n, "euler") for n in (32, 64)]
    heun = [mismatch(n, "heun") for n in (32, 64)]
    assert euler[1] < 0.75 * euler[0]  # first order: about halves
    assert heun[1] < 0.5 * heun[0]  # second order
    assert heun[1] < euler[1]


def test_bad_grid_and_solver_fail_with_a_message():
    with pytest.raises(ConfigError, match="t_min"):
        flow.time_grid(t_min=0.2)
    with pytest.raises(ConfigError, match="solver"):
        flow.flow_tokens(jnp.zeros((1, 2)), jnp.zeros((1, 3)), jnp.zeros((3, 2)),
                         solver="rk4")
