"""VAR: residual quantiser sums, block-causal teacher forcing = cached per-scale decoding,
official sizes and Phi tables, sampler shapes and bad input."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params
from flax import nnx

from arjax.config import ConfigError
from arjax.models import bind, split
from arjax.models.var import VAR, VARConfig, var_config
from arjax.nn.scales import scale_bounds
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import VAR_VAE, MSVQConfig, MultiScaleVQVAE

PATCH = (1, 2, 3, 4)
TINY_VAE = MSVQConfig(codebook_size=16, codebook_dim=4, patch_nums=PATCH, ch=8,
                      ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=4)
TINY_VAR = VARConfig(depth=2, width=32, heads=2, vocab_size=16, codebook_dim=4,
                     patch_nums=PATCH, num_classes=5, label_drop=0.0, aln_gamma_init=1.0)


def randomised(module_fn, seed, scale=0.3):
    """(graphdef, params) with every weight random (zero-init gates would hide bugs)."""
    return split(nnx.eval_shape(module_fn))[0], random_params(module_fn, seed, scale)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_official_sizes_and_phi_tables():
    counts = {d: sum(x.size for x in jax.tree.leaves(split(nnx.eval_shape(
        lambda d=d: VAR(var_config(d), rngs=nnx.Rngs(0))))[1])) for d in (16, 20, 24, 30, 36)}
    assert {d: round(c / 1e6, 1) for d, c in counts.items()} == {
        16: 310.3, 20: 600.9, 24: 1033.4, 30: 2010.0, 36: 2353.9}
    vae = split(nnx.eval_shape(lambda: MultiScaleVQVAE(VAR_VAE, rngs=nnx.Rngs(0))))[1]
    assert round(sum(x.size for x in jax.tree.leaves(vae)) / 1e6, 1) == 108.9
    assert VAR_VAE.phi_index() == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert MSVQConfig(patch_nums=tuple(range(1, 14))).phi_index() == (
        0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)
    assert MSVQConfig(patch_nums=(1, 2, 3, 4)).phi_index() == (0, 1, 2, 3)


def test_residual_quantiser_reconstructs_the_sum_of_its_scales():
    vae = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    out = residual_quantiser_arrays(*vae)
    assert [c.shape for c in out["codes"]] == [(3, p * p) for p in PATCH]
    np.testing.assert_allclose(out["sum_of_scales"], out["f_hat"], atol=1e-5)
    np.testing.assert_allclose(out["ar_path"], out["f_hat"], atol=1e-5)
    np.testing.assert_allclose(out["decoded_codes"], out["decoded_f_hat"], atol=1e-5)
    assert out["errors"][-1] < out["errors"][0]  # scales explain the residual


@functools.partial(jax.jit, static_argnums=0)
def residual_quantiser_arrays(graphdef, params):
    vae = bind(graphdef, params)
    images = jax.random.uniform(jax.random.key(2), (3, 16, 16, 3), minval=-1, maxval=1)
    f = vae.features(images)
    f_hat, codes, _ = vae.quantize(f)
    ar_path, partial, errors = jnp.zeros_like(f), jnp.zeros_like(f), []
    for k, c in enumerate(codes):  # the AR path: next_input per scale
        ar_path, _ = vae.quantize.next_input(k, ar_path, vae.quantize.embedding(c), 4)
        partial = partial + vae.quantize.upsampled(k, vae.quantize.embedding(c), 4)
        errors.append(jnp.mean((f - partial) ** 2))
    return dict(codes=codes, f_hat=f_hat, sum_of_scales=vae.quantize.f_hat(codes, 4),
                ar_path=ar_path, errors=jnp.stack(errors), decoded_codes=vae.decode(codes),
                decoded_f_hat=vae.decode_f_hat(f_hat))


@jax.jit
def teacher_and_cached(model, vae, labels, codes):
    model, vae = bind(*model), bind(*vae)
    inputs = vae.quantize.teacher_inputs(codes, PATCH[-1])
    full = model(labels, inputs)
    cond, block_cond = model.conditioning(labels)
    cache, x, f_hat, cached = model.init_cache(len(labels)), model.embed(cond, None, 0), \
        jnp.zeros((len(labels), 4, 4, 4)), []
    for k, (begin, end) in enumerate(scale_bounds(PATCH)):
        logits, cache = model.decode_scale(x, cond, block_cond, cache, begin)
        cached.append(logits)
        f_hat, nxt = vae.quantize.next_input(k, f_hat, vae.quantize.embedding(codes[k]), 4)
        if nxt is not None:
            x = model.embed(None, nxt, end)
    return full, jnp.concatenate(cached, axis=1), inputs


@pytest.mark.parametrize("shared_aln,scan", [(False, False), (True, False), (False, True)])
def test_teacher_forcing_equals_cached_per_scale_decoding(shared_aln, scan):
    """Also with `scan_layers`: the cached decode scans the blocks over the filled part of the
    caches, once per scale (against the unrolled teacher-forced pass of the same weights)."""
    cfg = VARConfig(**{**TINY_VAR.__dict__, "shared_aln": shared_aln})
    model = randomised(lambda: VAR(cfg, rngs=nnx.Rngs(0)), 3)
    vae = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    labels = jnp.array([0, 3, 5])  # 5 = null class
    codes = [jax.random.randint(jax.random.key(k), (3, p * p), 0, 16) for k, p in
             enumerate(PATCH)]
    full, _, _ = teacher_and_cached(model, vae, labels, codes)
    if scan:
        scanned = dataclasses.replace(cfg, scan_layers=True)
        model = randomised(lambda: VAR(scanned, rngs=nnx.Rngs(0)), 3)
        program = str(jax.make_jaxpr(cached_logits)(model, vae, labels, codes))
        assert program.count("scan[") == 1 + len(PATCH)  # teacher forcing + each scale
    np.testing.assert_allclose(cached_logits(model, vae, labels, codes), full, atol=2e-4,
                               rtol=1e-4)


def cached_logits(model, vae, labels, codes):
    return teacher_and_cached(model, vae, labels, codes)[1]


def test_block_causal_over_scales():
    model = bind(*randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3))
    labels = jnp.array([1, 2])
    inputs = jax.random.normal(jax.random.key(0), (2, 29, 4))
    bounds = scale_bounds(PATCH)
    base = model(labels, inputs)
    for _, end in bounds[:-1]:
        changed = inputs.at[:, end - 1:].add(1.0)  # inputs of later scales (position end..)
        out = model(labels, changed)
        np.testing.assert_allclose(out[:, :end], base[:, :end], atol=1e-5)
        assert not np.allclose(out[:, end:], base[:, end:], atol=1e-3)


def per_scale(flat):
    return jnp.split(flat, np.cumsum([p * p for p in PATCH])[:-1], axis=1)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_sampler_shapes_and_stats():
    model = randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3)
    vae = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    run = jax.jit(var_sampling.sample, static_argnames="cfg")
    labels = jnp.array([0, 1, 2, 3])
    for sc in (var_sampling.VARSampleConfig(cfg=1.0, top_k=0, top_p=1.0),
               var_sampling.VARSampleConfig(cfg=3.0, top_k=4, top_p=0.9, smooth=True)):
        out = run(*model, *vae, jax.random.key(0), labels, sc)
        assert out.images.shape == (4, 16, 16, 3) and float(jnp.abs(out.images).max()) <= 1
        assert out.aux["codes"].shape == (4, sum(p * p for p in PATCH))
        assert int(out.stats["target_passes"]) == len(PATCH)


@pytest.mark.parametrize("cfg,schedule", [
    pytest.param(1.0, "linear", marks=pytest.mark.slow), (4.0, "linear"),
    pytest.param(4.0, "constant", marks=pytest.mark.slow)])
def test_greedy_codes_follow_the_guidance_schedule(cfg, schedule):
    """With top_k = 1 each scale's codes are argmax(u + w_k (c - u)) of the teacher-forced
    cond/null logits of those very codes, w_k = 1 + (cfg - 1) k / (K - 1) ("linear", VAR's
    official ramp) or cfg ("constant")."""
    model = randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3, scale=1.0)
    vae = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    labels = jnp.array([0, 1, 2, 3])
    sc = var_sampling.VARSampleConfig(cfg=cfg, cfg_schedule=schedule, top_k=1, top_p=1.0)
    out = jax.jit(var_sampling.sample, static_argnames="cfg")(
        *model, *vae, jax.random.key(1), labels, sc)
    codes = out.aux["codes"]
    assert int(out.stats["target_passes"]) == len(PATCH)  # counted in the sampler
    inputs = jax.jit(lambda v: bind(*v).quantize.teacher_inputs(per_scale(codes), 4))(vae)
    forward = jax.jit(lambda m, y: bind(*m)(y, inputs))
    null = jnp.full_like(labels, TINY_VAR.num_classes)
    cond, null = forward(model, labels), forward(model, null)
    K = len(PATCH)
    w = np.concatenate([np.full(p * p, 1 + (cfg - 1) * k / (K - 1) if schedule == "linear"
                                else cfg) for k, p in enumerate(PATCH)])
    expected = jnp.argmax(null + w[None, :, None] * (cond - null), -1)
    np.testing.assert_array_equal(expected, codes)
    if cfg != 1.0:  # the schedule matters: unguided argmax differs somewhere
        assert not np.array_equal(jnp.argmax(cond, -1), codes)


@pytest.mark.slow  # > 30 s on 2 cores: make test-all
def test_smoothing_mixes_code_vectors_with_gumbel_noise(monkeypatch):
    """`smooth` (the official more_smooth) leaves the sampled codes of the first scale alone
    but builds f_hat from softmax((logits (1 + r) + g) / tau) @ codebook: with a codebook of
    identical vectors the mixture is that vector, so the images equal plain sampling's."""
    model = randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3)
    graphdef, params = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    run = jax.jit(var_sampling.sample, static_argnames="cfg")
    labels = jnp.array([0, 1, 2, 3])
    sample = lambda vp, smooth: run(*model, graphdef, vp, jax.random.key(2), labels,
                                    var_sampling.VARSampleConfig(cfg=2.0, top_k=0, top_p=1.0,
                                                                 smooth=smooth))
    plain, smooth = sample(params, False), sample(params, True)
    first = PATCH[0] ** 2
    np.testing.assert_array_equal(plain.aux["codes"][:, :first], smooth.aux["codes"][:, :first])
    assert float(jnp.abs(plain.images - smooth.images).max()) > 1e-3
    flat = jax.tree.map(lambda x: x, params)
    table = flat["quantize"]["embedding"]["embedding"]
    flat["quantize"]["embedding"]["embedding"] = jnp.broadcast_to(table[:1], table.shape)
    np.testing.assert_allclose(sample(flat, False).images, sample(flat, True).images,
                               atol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(cfg=-1.0), "cfg"), (dict(top_k=17), "top_k"), (dict(top_k=0, top_p=0.0), "top_p")])
def test_bad_sample_config(bad, match):
    model = split(nnx.eval_shape(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0))))
    vae = split(nnx.eval_shape(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0))))
    with pytest.raises(ConfigError, match=match):
        jax.jit(var_sampling.sample, static_argnames="cfg")(
            *model, *vae, jax.random.key(0), jnp.zeros((1,), jnp.int32),
            var_sampling.VARSampleConfig(**bad))


def test_stochastic_depth_only_with_a_key():
    cfg = VARConfig(**{**TINY_VAR.__dict__, "drop_path": 0.5})
    graphdef, params = randomised(lambda: VAR(cfg, rngs=nnx.Rngs(0)), 3)
    model = bind(graphdef, params)
    labels, inputs = jnp.array([1, 2, 3, 4]), jax.random.normal(jax.random.key(0), (4, 29, 4))
    plain = model(labels, inputs)
    dropped = model(labels, inputs, key=jax.random.key(1))
    assert not np.allclose(plain, dropped, atol=1e-4)  # some blocks skipped for some rows
    no_drop = bind(randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3)[0], params)
    np.testing.assert_allclose(no_drop(labels, inputs, key=jax.random.key(1)), plain, atol=1e-5)
