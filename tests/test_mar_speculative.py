"""CSpD: the exact rule reproduces the target (Gaussian toy and a tiny MAR pair, KS tests),
its residual sampler draws (p - q)_+, draft == target accepts everything, the schedule."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_mar import tiny

from arjax.config import ConfigError
from arjax.models.mar import DiffusionMLP, diffusion
from arjax.sampling.mar import MARSampleConfig, mask_schedule, sample_latents
from arjax.sampling.mar_speculative import (
    CSpDConfig,
    residual,
    schedule,
    verify,
    window_runs,
)
from arjax.sampling.mar_speculative import sample_latents as cspd_latents


def test_schedule_prefill_and_windows():
    prefill, windows = schedule(64, CSpDConfig(num_draft=8, ratio=0.15))
    assert prefill == 10  # steps 0..9 <= 0.15 * 64 = 9.6
    assert windows.tolist() == [[10, 16], [17, 24], [25, 32], [33, 40], [41, 48], [49, 56],
                                [57, 63]]
    assert schedule(4, CSpDConfig(num_draft=1, ratio=0.0))[1].tolist() == [[1, 1], [2, 2],
                                                                           [3, 3]]
    with pytest.raises(ConfigError, match="rule"):
        CSpDConfig(rule="fast").validate()


@pytest.mark.parametrize("count", [1, 3, 4])
def test_window_runs_cover_every_window_with_enough_room(count):
    """Runs keep the windows in order, and each run's shapes fit all its windows: the cap
    holds every token known at a step start, the widths every token a step or window
    predicts; later runs are wider than the first (the point of splitting)."""
    m, first = mask_schedule(256, 64)
    _, windows = schedule(64, CSpDConfig(num_draft=4, ratio=0.05))
    runs = window_runs(m, first, windows, count)
    assert len(runs) == count
    assert np.concatenate([r for r, _ in runs]).tolist() == windows.tolist()
    for run, (cap, width, window_width) in runs:
        for a, b in run:
            assert m[a] - first[b] <= window_width
            for s in range(a, b + 1):
                assert 256 - m[s] <= cap and m[s] - first[s] <= width
    if count > 1:
        assert runs[0][1][2] < runs[-1][1][2] and runs[0][1][0] < runs[-1][1][0]


@pytest.mark.parametrize("num_iter,num_draft,count,draft,target", [
    (32, 4, 3, (1.0, 40.0), (4.0, 10.0)), (24, 2, 4, (2.0, 0.5), (1.0, 5.0)),
    (16, 3, 2, (1.0, 1.0), (1.0, 1.0))])
def test_window_runs_have_the_least_padded_work(num_iter, num_draft, count, draft, target):
    """The chosen boundaries are the cheapest of every choice (brute force), with the padded
    work of both models: draft steps at the run's draft width, one target pass per window at
    its window width, every pass at the run's encoder cap."""
    m, first = mask_schedule(256, num_iter)
    _, windows = schedule(num_iter, CSpDConfig(num_draft=num_draft, ratio=0.1))

    def work(parts):
        total = 0.0
        for part in parts:
            steps = [s for a, b in part for s in range(a, b + 1)]
            cap = max(1, 256 - min(m[s] for s in steps))
            width = max(m[s] - first[s] for s in steps)
            verified = max(m[a] - first[b] for a, b in part)
            total += (len(steps) * draft[0] * (cap + draft[1] * width)
                      + len(part) * target[0] * (cap + target[1] * verified))
        return total

    chosen = work([r for r, _ in window_runs(m, first, windows, count, draft, target)])
    n = len(windows)
    best = min(work([windows[a:b] for a, b in zip((0, *cuts), (*cuts, n))])
               for cuts in itertools.combinations(range(1, n), min(count, n) - 1))
    assert chosen == pytest.approx(best)


def gaussians(n, c=2, seed=0):
    rng = np.random.default_rng(seed)
    mu_p, mu_q = rng.normal(size=(2, c)), rng.normal(size=(2, c))
    s_p, s_q = rng.uniform(0.5, 1.5, (2, c)), rng.uniform(0.5, 1.5, (2, c))
    rep = lambda a: jnp.asarray(np.repeat(a[:1], n, 0), jnp.float32)
    return rep(mu_p), rep(s_p), rep(mu_q), rep(s_q)


def test_exact_rule_outputs_the_target_gaussian():
    """x ~ q, then accept / residual: the output must be ~ p (KS per channel)."""
    n = 20000
    mu_p, s_p, mu_q, s_q = gaussians(n)
    x_q = mu_q + s_q * jax.random.normal(jax.random.key(0), mu_q.shape)
    lam = jnp.zeros_like(mu_p)
    out, accepted, fallback, log_r, _ = jax.jit(lambda k: verify(
        k, CSpDConfig(), x_q, (mu_q, s_q, lam), mu_p, (mu_p, s_p, lam)))(jax.random.key(1))
    assert 0.05 < float(accepted.mean()) < 0.95 and int(fallback.sum()) == 0
    log_pdf = lambda m, s: stats.norm.logpdf(np.asarray(x_q), np.asarray(m), np.asarray(s))
    np.testing.assert_allclose(log_r, (log_pdf(mu_p, s_p) - log_pdf(mu_q, s_q)).sum(-1),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(accepted.mean()), np.minimum(1, np.exp(log_r)).mean(),
                               atol=0.02)
    for d in range(2):
        z = lambda a, d=d: (np.asarray(a[:, d]) - float(mu_p[0, d])) / float(s_p[0, d])
        assert stats.kstest(z(out), "norm").pvalue > 1e-3, d
        assert stats.kstest(z(x_q), "norm").pvalue < 1e-6, d  # the test has power


def test_official_rule_is_the_released_ratio():
    """log R against a NumPy statement of the released DistributionProcessor.judge_accept
    (x1 = draft, x2 = target; Lambda = the chains' summed log sigmas of steps t >= 1), with
    the draft token at its mean as the released runner emits it."""
    rng = np.random.default_rng(5)
    n, c, tau = 64, 16, 42.0
    mu_q, mu_p = rng.normal(size=(2, n, c))
    s_q, s_p = rng.uniform(0.01, 0.05, (2, n, c))
    lam_q, lam_p = rng.normal(-60, 1, (2, n, c))
    x = mu_q
    unnorm = lambda m, s: np.exp(-0.5 * (((x - m) / s / tau) ** 2).sum(-1))
    fixed = np.exp((lam_p - lam_q).sum(-1))
    released = unnorm(mu_p, s_p) * fixed * s_q.prod(-1) / (unnorm(mu_q, s_q) * s_p.prod(-1))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    _, _, _, log_r, log_f = verify(jax.random.key(0), CSpDConfig(rule="official"), f32(x),
                                   (f32(mu_q), f32(s_q), f32(lam_q)), f32(mu_p),
                                   (f32(mu_p), f32(s_p), f32(lam_p)))
    np.testing.assert_allclose(log_f, (lam_p - lam_q).sum(-1), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(log_r, np.log(released), rtol=1e-4, atol=5e-2)


def test_residual_sampler_draws_the_normalised_difference():
    """1-D: samples of (p - q)_+ against its numerically normalised density."""
    n = 20000
    mu_p, s_p, mu_q, s_q = (a[:, :1] for a in gaussians(n, seed=3))
    out, found = jax.jit(lambda k: residual(k, (mu_p, s_p), (mu_q, s_q), jnp.zeros((n,)), 16,
                                            100))(jax.random.key(2))
    assert bool(found.all())
    grid = np.linspace(-8, 8, 20001)
    pdf = lambda m, s: np.exp(-0.5 * ((grid - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))
    diff = np.maximum(pdf(float(mu_p[0, 0]), float(s_p[0, 0]))
                      - pdf(float(mu_q[0, 0]), float(s_q[0, 0])), 0)
    cdf = np.cumsum(diff) / np.sum(diff)
    assert stats.kstest(np.asarray(out[:, 0]), lambda x: np.interp(x, grid, cdf)).pvalue > 1e-3


def test_draft_equal_to_target_accepts_everything_and_matches_plain_sampling():
    """One draft step per window: the target verifies with the very same context, weight and
    noise, so p == q; the official rule then reproduces the plain sampler token for token."""
    _, graphdef, params = tiny()
    labels = jnp.array([0, 2])
    cfg = MARSampleConfig(num_iter=4, cfg=2.0, diffusion_steps=4)
    plain = jax.jit(lambda p: sample_latents(graphdef, p, jax.random.key(3), labels, cfg)[0])
    for rule in ("official", "exact"):
        spec = CSpDConfig(num_draft=1, ratio=0.0, rule=rule)
        out, st = jax.jit(lambda p, s=spec: cspd_latents(
            (graphdef, p), (graphdef, p), jax.random.key(3), labels, cfg, s))(params)
        assert float(st["acceptance"]) == 1.0 and int(st["target_passes"]) == 4
        assert int(st["draft_passes"]) == 3
        if rule == "official":  # the plain sampler's encoder sees fewer tokens (cap):
            expected = plain(params)  # float rounding, amplified by the random heads
            np.testing.assert_allclose(out, expected, rtol=1e-3,
                                       atol=1e-5 * np.abs(expected).max())


def gaussian_head(self, x, t, c):
    """A stand-in diffusion MLP: the exact denoiser of data N(2 tanh(c[:, :C]), I) (its
    variance channel at the middle of the range). Random MLP heads are chaotic along the chain
    (x0 = x_t / sqrt(alpha_bar) with a wrong eps), so their Gaussians never overlap; this one
    keeps the two models' tokens comparable while the trunks (and so c) differ."""
    a = jnp.asarray(np.cumprod(1 - np.asarray(diffusion().betas)), jnp.float32)[t][:, None]
    mu = 2 * jnp.tanh(c[:, :x.shape[-1]])
    eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu)
    return jnp.concatenate([eps, jnp.zeros_like(x)], -1)


def test_exact_cspd_reproduces_the_target_distribution(monkeypatch):
    """A draft MAR close to the target (its weights perturbed by 3e-4: with aligned noise the
    last-step Gaussians are narrow, so the exact rule accepts only near-identical models'
    tokens). Per position and channel, CSpD's tokens (exact rule, one step per window) and the
    target's own tokens (with the last-step noise) pass a two-sample KS test."""
    monkeypatch.setattr(DiffusionMLP, "denoise", gaussian_head)
    # the samplers call the head through its hoisted per-step inputs: pass (t, c) through
    monkeypatch.setattr(DiffusionMLP, "modulations", lambda self, t, c: (
        jnp.broadcast_to(t[:, None], t.shape + c.shape[:1]),
        jnp.broadcast_to(c, t.shape + c.shape)))
    monkeypatch.setattr(DiffusionMLP, "denoise_modulated",
                        lambda self, x, mods: gaussian_head(self, x, *mods))
    _, graphdef, t_params = tiny(seed=0, side=2, token_dim=2)
    leaves, tree = jax.tree.flatten(t_params)
    keys = jax.random.split(jax.random.key(9), len(leaves))
    d_params = jax.tree.unflatten(tree, [x + 3e-4 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
    n = 4000
    labels = jnp.zeros((n,), jnp.int32)
    cfg = MARSampleConfig(num_iter=4, cfg=1.0, diffusion_steps=10, final_noise=True)
    spec = CSpDConfig(num_draft=1, ratio=0.0)
    out, st = jax.jit(lambda: cspd_latents((graphdef, t_params), (graphdef, d_params),
                                           jax.random.key(0), labels, cfg, spec))()
    target = jax.jit(lambda: sample_latents(graphdef, t_params, jax.random.key(1), labels,
                                            cfg))()[0]
    assert 0.1 < float(st["acceptance"]) < 0.9 and int(st["residual_fallbacks"]) == 0
    flat = lambda a: np.asarray(a).reshape(n, -1)
    same = [stats.ks_2samp(a, b).pvalue for a, b in zip(flat(out).T, flat(target).T)]
    assert min(same) > 1e-3 / len(same), same
