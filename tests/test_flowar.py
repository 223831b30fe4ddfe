"""FlowAR: official sizes, KV-cache decode = teacher forcing, block causality over scales,
the flow-matching objective, ODE solver orders, the sampler's guidance logic and DiSA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from arjax.convert.torch_io import abstract_params
from arjax.models import param_count, split
from arjax.models.flowar import (
    FlowAR,
    FlowARConfig,
    flow_matching_loss,
    flowar_config,
    teacher_inputs,
)
from arjax.nn.scales import scale_bounds
from arjax.sampling import ode
from arjax.sampling.flowar import FlowSampleConfig, sample_latents
from arjax.tokenizers.kl import KL_16, KLVAE


def tiny(cross=False, seed=0, noise=0.2, **overrides):
    cfg = FlowARConfig(**{**dict(width=32, depth=2, heads=2, head_width=64, head_depth=2,
                                 cross=cross, scales=(1, 2, 4), token_dim=3, num_classes=3,
                                 dropout=0.0), **overrides})
    graphdef, params = split(FlowAR(cfg, rngs=nnx.Rngs(seed)))
    # randomise everything (biases and norm weights too) so no term can hide
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
    leaves = [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return cfg, graphdef, jax.tree.unflatten(tree, leaves)


@pytest.mark.slow  # > 20 s on 2 cores: make test-all
def test_official_parameter_counts():
    count = lambda fn: param_count(abstract_params(fn))
    for size, total, head in (("S", 171.7, 42.0), ("L", 586.9, 281.5), ("H", 1913.3, 633.0)):
        params = abstract_params(lambda s=size: FlowAR(flowar_config(s), rngs=nnx.Rngs(0)))
        assert round(param_count(params) / 1e6, 1) == total, size
        assert round(param_count(params["flownet"]) / 1e6, 1) == head, size
    assert round(count(lambda: KLVAE(KL_16, rngs=nnx.Rngs(0))) / 1e6, 1) == 66.5


@pytest.mark.parametrize("cross,scan", [pytest.param(False, False, marks=pytest.mark.slow),
                                        (True, False), (True, True)])
def test_cached_decode_equals_teacher_forcing(cross, scan):
    """Also with `scan_layers` (the cached decode scans each stack over the filled part of
    its caches) against the unrolled teacher-forced pass of the same weights."""
    cfg, graphdef, params = tiny(cross)
    latents = jax.random.normal(jax.random.key(1), (2, 4, 4, cfg.token_dim))
    labels = jnp.array([0, 3])  # 3 = the null class
    _, inputs = teacher_inputs(latents, cfg.scales)

    def cached(model):
        cond, cache, out = model.class_emb(labels), model.init_cache(2), []
        for k, (begin, end) in enumerate(scale_bounds(cfg.scales)):
            zk, cache = model.decode_scale(model.embed(cond, inputs[:, begin - 1:end - 1], k),
                                           cond, cache, k)
            out.append(zk)
        return jnp.concatenate(out, axis=1)

    full = jax.jit(lambda p: nnx.merge(graphdef, p)(labels, inputs))(params)
    if scan:
        graphdef = tiny(cross, scan_layers=True)[1]
        program = str(jax.make_jaxpr(lambda p: cached(nnx.merge(graphdef, p)))(params))
        assert program.count("scan[") == 2 * len(cfg.scales)  # both stacks, each scale
    np.testing.assert_allclose(jax.jit(lambda p: cached(nnx.merge(graphdef, p)))(params),
                               full, atol=2e-5)


def test_block_causal_across_scales():
    cfg, graphdef, params = tiny()
    model = nnx.merge(graphdef, params)
    labels = jnp.array([1, 2])
    inputs = jax.random.normal(jax.random.key(2), (2, cfg.seq_len - 1, cfg.token_dim))
    forward = jax.jit(model)
    z = forward(labels, inputs)
    bounds = scale_bounds(cfg.scales)
    for k, (_, end) in enumerate(bounds[:-1]):
        # change every input of scales > k (input position p feeds token p + 1)
        changed = inputs.at[:, end - 1:].add(1.0)
        z2 = forward(labels, changed)
        np.testing.assert_array_equal(z2[:, :end], z[:, :end])
        assert float(jnp.abs(z2[:, end:] - z[:, end:]).min(axis=-1).max()) > 1e-3, k
    # and a token does see its own scale and coarser ones
    z3 = forward(labels, inputs.at[:, 0].add(1.0))  # the scale-1 input
    assert float(jnp.abs(z3[:, 1:5] - z[:, 1:5]).max()) > 1e-3


def test_flow_matching_loss_is_minimised_by_the_true_velocity():
    """x ~ N(mu, s^2): the marginal velocity E[eps - x | x_t] is linear in x_t (closed form);
    with common random numbers every perturbation of it has a higher loss, by E[delta^2]."""
    mu, s = 1.5, 0.5

    def true_velocity(xt, t):
        t = t[:, None, None]
        cov = t - (1 - t) * s**2
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + cov / var * (xt - (1 - t) * mu)

    x = mu + s * jax.random.normal(jax.random.key(0), (100_000, 1, 1))
    key = jax.random.key(1)
    best = float(flow_matching_loss(true_velocity, x, key).mean())
    for delta in (lambda xt, t: 0.1, lambda xt, t: 0.1 * xt,
                  lambda xt, t: 0.1 * t[:, None, None]):
        worse = float(flow_matching_loss(lambda xt, t, d=delta: true_velocity(xt, t) + d(xt, t),
                                         x, key).mean())
        assert worse > best + 0.002
    # and integrating it from noise (t = 1) to data (t = 0) gives N(mu, s^2)
    noise = jax.random.normal(jax.random.key(2), (20_000, 1, 1))
    out, calls = ode.integrate(lambda xt, t, flag: true_velocity(xt, jnp.full(xt.shape[:1], t)),
                               noise, ode.time_grid(40, "uniform"), "heun")
    assert int(calls) == 80
    assert abs(float(out.mean()) - mu) < 0.02 and abs(float(out.std()) - s) < 0.02


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2)])
def test_ode_solver_order_on_a_linear_ode(solver, order):
    a = 1.3  # dx/dt = a x from t = 1 to 0: x(0) = x(1) exp(-a)
    errors = []
    for n in (10, 20, 40):
        out, _ = ode.integrate(lambda x, t, flag: a * x, jnp.ones(()),
                               ode.time_grid(n, "uniform"), solver)
        errors.append(abs(float(out) - np.exp(-a)))
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    np.testing.assert_allclose(ratios, 2.0**order, rtol=0.15)


def test_official_time_grid_and_disa_schedule():
    grid = ode.time_grid(25)
    assert len(grid) == 25 and grid[0] == 1.0 and grid[-1] == 0.0  # 24 steps
    np.testing.assert_allclose(grid[:12], np.linspace(1, 0.3, 12))
    np.testing.assert_allclose(grid[12:], np.linspace(0.25, 0, 13))
    np.testing.assert_allclose(ode.time_grid(50), np.linspace(1, 0, 51))
    cfg = FlowSampleConfig(num_steps=25, disa_min_steps=15)
    assert cfg.steps(5) == [25, 23, 20, 18, 15]
    assert FlowSampleConfig(num_steps=25).steps(5) == [25] * 5
    # FlowAR-S at 25 steps: 5 scales x 24 Euler steps
    assert sum(len(g) - 1 for g in FlowSampleConfig(num_steps=25).grids(5)) == 120


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
@pytest.mark.parametrize("cross", [False, True])
def test_sampler_guidance_interval(cross):
    """Guidance only while t <= `guidance`: with guidance 0 no step is guided and the cond
    half is exactly the unguided sample (same noise); guided sampling differs; stats count
    the flow-head calls of the DiSA schedule."""
    cfg, graphdef, params = tiny(cross, seed=3, noise=0.05)  # 0.2: chaotic, |v| ~ 30
    labels = jnp.array([0, 1, 2, 0])
    run = lambda **kw: jax.jit(lambda p: sample_latents(
        graphdef, p, jax.random.key(5), labels, FlowSampleConfig(num_steps=6, **kw)))(params)
    plain, stats = run(cfg=1.0)
    never, _ = run(cfg=3.0, guidance=0.0)
    guided, _ = run(cfg=3.0, guidance=1.0)
    assert plain.shape == (4, 4, 4, cfg.token_dim)
    np.testing.assert_allclose(never, plain, atol=5e-5)
    assert float(jnp.abs(guided - plain).max()) > 1e-2
    assert int(stats["target_passes"]) == 3 and int(stats["nfe"]) == 3 * 6
    _, stats = run(cfg=3.0, disa_min_steps=2, solver="heun")
    assert int(stats["nfe"]) == 2 * (6 + 4 + 2)


def test_sample_config_errors():
    from arjax.config import ConfigError

    for bad in (dict(solver="rk4"), dict(cfg=-0.5), dict(cfg_schedule="cosine"),
                dict(disa_min_steps=30),
                dict(grid="cosine"), dict(guidance=1.5)):
        with pytest.raises(ConfigError):
            FlowSampleConfig(**bad).validate()
