"""DD1's sequence flow map on tiny teachers: its law is the teacher's exact joint (all
sequences enumerated), it is deterministic, causal, and restarts from any trajectory point."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from flax import nnx
from scipy import stats

from arjax.distill.flow import FlowDraw, time_grid
from arjax.models import bind, split
from arjax.models.raster_ar import RasterAR, RasterARConfig
from arjax.models.var import VAR, VARConfig
from arjax.sampling import raster
from arjax.sampling import var as var_sampling
from arjax.sampling.common import SampleConfig, filter_logits
from arjax.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE

GPT = RasterARConfig(vocab_size=3, grid=2, num_classes=2, dim=16, depth=1, heads=2,
                     multiple_of=8, dropout=0.0, label_drop=0.0)
SAMPLE = SampleConfig(cfg=2.0, top_k=2)
CODES = np.array([[1.0, 0.0], [-0.5, 0.9], [-0.4, -0.8]], np.float32)


def _gpt():
    module_fn = lambda: RasterAR(GPT, rngs=nnx.Rngs(0))
    return split(nnx.eval_shape(module_fn))[0], random_params(module_fn, 0, 0.8)


def _flow_map(model, label, noise, prefix=None):
    labels = jnp.full((noise.shape[0],), label)
    flow = FlowDraw(noise, jnp.asarray(CODES), jnp.asarray(time_grid()))
    return jax.jit(lambda p, n: raster.sample(model[0], p, jax.random.key(0), labels, SAMPLE,
                                              flow._replace(noise=n), prefix)[0])(model[1],
                                                                                  noise)


def _check_law(samples, log_joint, cells):
    """chi-square over the cells (the rare ones pooled) and total variation."""
    n = len(samples)
    index = {c: i for i, c in enumerate(cells)}
    counts = np.bincount([index[tuple(s)] for s in samples], minlength=len(cells))
    p = np.exp(log_joint)
    assert counts[p == 0].sum() == 0
    expected = n * p
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    keep = wanted > 0
    chi2 = stats.chisquare(observed[keep], wanted[keep] * observed.sum() / wanted[keep].sum())
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert chi2.pvalue > 1e-3 and tv < 0.02, (chi2, tv)


def test_raster_flow_map_draws_the_teachers_guided_filtered_joint():
    model = _gpt()
    cells = list(itertools.product(range(3), repeat=4))
    tokens = jnp.asarray(cells, jnp.int32)
    forward = jax.jit(lambda p, y: bind(model[0], p)(tokens, jnp.full((81,), y)))
    cond, null = forward(model[1], 1), forward(model[1], GPT.num_classes)
    logits = filter_logits(null + SAMPLE.cfg * (cond - null), SAMPLE.top_k, 1.0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1)[..., 0]
    log_joint = np.asarray(logp.sum(-1), np.float64)
    np.testing.assert_allclose(np.exp(log_joint).sum(), 1, atol=1e-5)
    noise = jax.random.normal(jax.random.key(1), (100_000, 4, 2))
    _check_law(np.asarray(_flow_map(model, 1, noise)), log_joint, cells)


def test_raster_flow_map_is_deterministic_causal_and_restartable():
    model = _gpt()
    noise = jax.random.normal(jax.random.key(2), (256, 4, 2))
    base = np.asarray(_flow_map(model, 0, noise))
    np.testing.assert_array_equal(base, _flow_map(model, 0, noise))
    for j in range(4):
        moved = np.asarray(_flow_map(model, 0, noise.at[:, j].set(-noise[:, j])))
        np.testing.assert_array_equal(moved[:, :j], base[:, :j])  # earlier tokens untouched
        assert (moved[:, j] != base[:, j]).any()
    # X_k: the first k tokens as a prefix, the same noise: the rest comes out the same
    for k in (1, 3):
        np.testing.assert_array_equal(_flow_map(model, 0, noise, jnp.asarray(base[:, :k])),
                                      base)


@pytest.mark.slow  # ~50 s on 2 cores: make test-all
def test_var_flow_map_draws_the_teachers_guided_filtered_joint():
    patch = (1, 2)
    vae_cfg = MSVQConfig(codebook_size=4, codebook_dim=2, patch_nums=patch, ch=8,
                         ch_mult=(1, 2), num_res_blocks=1, norm_groups=4)
    var_cfg = VARConfig(depth=1, width=16, heads=2, vocab_size=4, codebook_dim=2,
                        patch_nums=patch, num_classes=2, label_drop=0.0, aln_gamma_init=1.0)
    vae_fn = lambda: MultiScaleVQVAE(vae_cfg, rngs=nnx.Rngs(0))
    var_fn = lambda: VAR(var_cfg, rngs=nnx.Rngs(0))
    vae = split(nnx.eval_shape(vae_fn))[0], random_params(vae_fn, 1, 0.8)
    var = split(nnx.eval_shape(var_fn))[0], random_params(var_fn, 2, 0.8)
    sc = var_sampling.VARSampleConfig(cfg=3.0, top_k=3, top_p=1.0)
    codebook = bind(*vae).quantize.embedding.embedding[...]

    # exact joint: p(q0) prod_j p(q1_j | q0), logits from teacher forcing of every q0
    def scale_logp(p, vp, y):
        model, quantizer = bind(var[0], p), bind(vae[0], vp).quantize
        inputs = quantizer.teacher_inputs([jnp.arange(4)[:, None],
                                           jnp.zeros((4, 4), jnp.int32)], 2)
        cond, null = model(jnp.full((4,), y), inputs), model(jnp.full((4,), 2), inputs)
        w = jnp.array([1.0] + [sc.cfg] * 4)[:, None]  # the linear ramp over two scales
        return jax.nn.log_softmax(filter_logits(null + w * (cond - null), sc.top_k, 1.0))

    logp = np.asarray(jax.jit(scale_logp)(var[1], vae[1], 1), np.float64)  # [q0, 5, V]
    cells = list(itertools.product(range(4), repeat=5))
    c = np.asarray(cells)
    log_joint = logp[c[:, 0], 0, c[:, 0]] + sum(logp[c[:, 0], 1 + j, c[:, 1 + j]]
                                                for j in range(4))
    np.testing.assert_allclose(np.exp(log_joint).sum(), 1, atol=1e-5)
    n = 300_000
    noise = jax.random.normal(jax.random.key(3), (n, 5, 2))
    flow = FlowDraw(noise, codebook, jnp.asarray(time_grid()))
    codes = jax.jit(lambda p, vp, f: var_sampling.sample(
        var[0], p, vae[0], vp, jax.random.key(0), jnp.ones((n,), jnp.int32), sc,
        f).aux["codes"])(var[1], vae[1], flow)
    _check_law(np.asarray(codes), log_joint, cells)
    # a scale's codes depend on their own noise only, never on a sibling's
    moved = jax.jit(lambda p, vp, f: var_sampling.sample(
        var[0], p, vae[0], vp, jax.random.key(0), jnp.ones((64,), jnp.int32), sc,
        f).aux["codes"])(var[1], vae[1], flow._replace(noise=noise[:64].at[:, 2].add(3.0)))
    np.testing.assert_array_equal(np.delete(np.asarray(moved), 2, 1),
                                  np.delete(np.asarray(codes[:64]), 2, 1))


def test_flow_map_is_the_same_on_one_and_eight_devices(devices):
    """Pairs are generated sharded over the mesh: the tokens must not depend on the layout."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = _gpt()
    noise = jax.random.normal(jax.random.key(4), (64, 4, 2))
    one = _flow_map(model, 1, jax.device_put(noise, devices[0]))
    spread = jax.device_put(noise, NamedSharding(Mesh(np.asarray(devices), ("data",)),
                                                 PartitionSpec("data")))
    eight = _flow_map(model, 1, spread)
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_array_equal(one, eight)
