"""CoDe (collaborative decoding) for VAR: the refiner's one-pass block-causal prefill equals
per-scale decoding, drafter == refiner reproduces plain VAR sampling token for token, per-scale
top-k / temperature in both orders, and bad setups fail before compiling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_var import PATCH, TINY_VAE, TINY_VAR, randomised

from arjax.config import ConfigError
from arjax.models import bind
from arjax.models.var import VAR, VARConfig
from arjax.nn.scales import scale_bounds
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import MultiScaleVQVAE

BOUNDS = scale_bounds(PATCH)
SMALL = VARConfig(**{**TINY_VAR.__dict__, "width": 16, "depth": 1})


@functools.cache  # built once per test process
def models():
    large = randomised(lambda: VAR(TINY_VAR, rngs=nnx.Rngs(0)), 3)
    small = randomised(lambda: VAR(SMALL, rngs=nnx.Rngs(0)), 4)
    vae = randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1)
    return large, small, vae


@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
@pytest.mark.parametrize("n", [2])  # scales 0-2 in one pass (n = 3 is in the test below)
def test_prefill_equals_per_scale_decoding(n):
    model = bind(*models()[1])
    labels = jnp.array([0, 4, 5])
    cond, block_cond = model.conditioning(labels)
    inputs = jax.random.normal(jax.random.key(0), (3, BOUNDS[n][0] - 1, 4))
    x = jnp.concatenate([model.embed(cond, None, 0), model.embed(None, inputs, 1)], axis=1)
    step_cache = model.init_cache(3)
    for begin, end in BOUNDS[:n + 1]:
        step_logits, step_cache = model.decode_scale(x[:, begin:end], cond, block_cond,
                                                     step_cache, begin)
    logits, cache = model.decode_scale(x[:, :BOUNDS[n][1]], cond, block_cond,
                                       model.init_cache(3), 0)
    np.testing.assert_allclose(logits[:, BOUNDS[n][0]:], step_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(step_cache)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


SAMPLE = var_sampling.VARSampleConfig(cfg=3.0, top_k=6, top_p=0.9,
                                      temperature=(1.1, 1.1, 0.9, 1.0),
                                      temperature_after_filter=True)


@pytest.mark.slow  # two samplers compiled per case: 20-50 s each on 2 cores
@pytest.mark.parametrize("n", [1, 3])
def test_drafter_equal_to_refiner_is_plain_var_sampling(n):
    large, _, vae = models()
    labels = jnp.array([0, 1, 2, 3, 4, 0, 1, 2])
    plain = jax.jit(var_sampling.sample, static_argnames="cfg")(
        *large, *vae, jax.random.key(7), labels, SAMPLE)
    code = jax.jit(var_sampling.sample_collaborative, static_argnames=("cfg", "draft_steps"))(
        large, large, *vae, jax.random.key(7), labels, SAMPLE, n)
    np.testing.assert_array_equal(code.aux["codes"], plain.aux["codes"])
    assert (int(code.stats["drafter_passes"]), int(code.stats["refiner_passes"])) == (
        n, len(PATCH) - n)
    assert int(code.stats["target_passes"]) == len(PATCH)


def test_per_scale_top_k_and_coDe_temperature_order():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    before = var_sampling.VARSampleConfig(top_k=0, top_p=0.7, temperature=(2.0,))
    after = var_sampling.VARSampleConfig(top_k=0, top_p=0.7, temperature=(2.0,),
                                         temperature_after_filter=True)
    # Heated first, the nucleus widens to 3 tokens; filtered first it keeps 2, then heats.
    assert int(jnp.isfinite(before.filter(logits, 0)).sum()) == 3
    kept = after.filter(logits, 0)
    assert int(jnp.isfinite(kept).sum()) == 2
    np.testing.assert_allclose(kept[0, :2], logits[0, :2] / 2.0)
    per_scale = var_sampling.VARSampleConfig(top_k=4, top_p=1.0, top_k_per_scale=(1, 3))
    assert int(jnp.isfinite(per_scale.filter(logits, 0)).sum()) == 1
    assert int(jnp.isfinite(per_scale.filter(logits, 1)).sum()) == 3


@pytest.mark.parametrize("change,n,match", [
    ({}, 0, "draft_steps=0 must be in"), ({}, 4, "draft_steps=4 must be in"),
    ({"vocab_size": 32}, 2, "share patch_nums, vocab_size"),
    ({"sample": {"top_k": 0, "temperature": (1.0, 1.0)}}, 2, "give one per scale"),
])
def test_bad_collaborative_setups_fail_before_compiling(change, n, match):
    large, _, vae = models()
    cfg = {k: v for k, v in change.items() if k != "sample"}
    other = randomised(lambda: VAR(VARConfig(**{**SMALL.__dict__, **cfg}),
                                   rngs=nnx.Rngs(0)), 4)
    sample = var_sampling.VARSampleConfig(**change.get("sample", {}))
    with pytest.raises(ConfigError, match=match):
        jax.jit(var_sampling.sample_collaborative, static_argnames=("cfg", "draft_steps"))(
            large, other, *vae, jax.random.key(0), jnp.zeros((2,), jnp.int32), sample, n)


@pytest.mark.slow  # eager forwards of two VARs: ~20 s
def test_refiner_distillation_loss():
    """KL(teacher || student) at temperature T on the refiner's scales: zero when the teacher
    is the student itself (same inputs, the same dropped labels), positive otherwise."""
    from experiments.var_imagenet import make_var_loss

    cfg = VARConfig(**{**TINY_VAR.__dict__, "label_drop": 0.5})
    student = randomised(lambda: VAR(cfg, rngs=nnx.Rngs(0)), 3)
    other = randomised(lambda: VAR(cfg, rngs=nnx.Rngs(0)), 5)
    vae = bind(*randomised(lambda: MultiScaleVQVAE(TINY_VAE, rngs=nnx.Rngs(0)), 1))
    quantizer = nnx.split(vae.quantize)
    batch = {"codes": jax.random.randint(jax.random.key(1), (6, BOUNDS[-1][1]), 0, 16),
             "label": jnp.arange(6) % 5}
    loss = make_var_loss(quantizer, 2, student[0], ce_weight=0.0, temperature=2.0)
    model = bind(*student)
    for seed in range(3):  # label drops differ per key: the teacher must see the same ones
        value, aux = loss(model, batch, jax.random.key(seed), student[1])
        assert abs(float(value)) < 1e-5 and float(aux["ce"]) > 0
    value, aux = loss(model, batch, jax.random.key(0), other[1])
    assert float(value) > 1e-3 and float(value) == float(aux["kd"])
    mixed = make_var_loss(quantizer, 2, student[0], ce_weight=0.25, temperature=2.0)
    value, aux = mixed(model, batch, jax.random.key(0), other[1])
    np.testing.assert_allclose(float(value), 0.25 * aux["ce"] + 0.75 * aux["kd"], rtol=1e-6)
    drafter = make_var_loss(quantizer, last_scale=2)  # CE of scales 0 and 1 only
    value, aux = drafter(model, batch, jax.random.key(0))
    changed = {**batch, "codes": batch["codes"].at[:, BOUNDS[2][0]:].set(0)}
    np.testing.assert_allclose(float(drafter(model, changed, jax.random.key(0))[0]),
                               float(value), rtol=1e-6)  # later scales do not count
