"""DD2 (conditional score distillation): the SiD generator loss drives a one-step generator
to the teacher's law on a toy, the score networks see only earlier scales, the teacher's
teacher-forced processed logits are what its sampler draws from, and the alternating step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_params
from flax import nnx

from arjax.distill.flow import denoise, velocity
from arjax.distill.score import (
    ScoreVAR,
    Teacher,
    make_csd_step,
    one_step,
    score_from_teacher,
    sid_loss,
    teacher_logits,
)
from arjax.models import bind, split
from arjax.models.var import VAR, VARConfig
from arjax.sampling import var as var_sampling
from arjax.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from arjax.train import init_state

PATCH = (1, 2, 3)
VAE_CFG = MSVQConfig(codebook_size=6, codebook_dim=4, patch_nums=PATCH, ch=8, ch_mult=(1, 2),
                     num_res_blocks=1, norm_groups=4)
VAR_CFG = VARConfig(depth=2, width=32, heads=2, vocab_size=6, codebook_dim=4, patch_nums=PATCH,
                    num_classes=3, label_drop=0.0, aln_gamma_init=1.0)
LABELS = jnp.array([0, 2])


def _random(module_fn, seed, scale=0.5):
    return split(nnx.eval_shape(module_fn))[0], random_params(module_fn, seed, scale)


def _vae():
    return _random(lambda: MultiScaleVQVAE(VAE_CFG, rngs=nnx.Rngs(0)), 1, 0.8)


def _score(seed=3):
    return _random(lambda: ScoreVAR(VAR_CFG, 32, 2, rngs=nnx.Rngs(0)), seed)


# --- the toy of the spec's plan: one position, V = 3 codes in C = 2 ----------------------

CODES = jnp.array([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]])
P = jnp.array([0.6, 0.3, 0.1])


def _mlp_init(key, width=64):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (18, width)) / np.sqrt(18), "b1": jnp.zeros(width),
            "w2": jax.random.normal(k2, (width, width)) / np.sqrt(width),
            "b2": jnp.zeros(width), "w3": jnp.zeros((width, 2)), "b3": jnp.zeros(2)}


def _v(params, x, t):
    freqs = jnp.arange(1, 9.0)
    h = jnp.concatenate([x, jnp.cos(freqs * t), jnp.sin(freqs * t)], -1)
    h = jax.nn.silu(h @ params["w1"] + params["b1"])
    h = jax.nn.silu(h @ params["w2"] + params["b2"])
    return h @ params["w3"] + params["b3"]


def _generate(params, eps):
    return eps - _v(params, eps, jnp.ones(eps.shape[:-1] + (1,)))


def _noised(key, q):
    k_t, k_xi = jax.random.split(key)
    t = jax.random.uniform(k_t, q.shape[:-1] + (1,), minval=0.02, maxval=1.0)
    xi = jax.random.normal(k_xi, q.shape)
    return (1 - t) * q + t * xi, t, xi


def _law_tv(q) -> float:
    """Total variation between the snapped law of samples q [N, 2] and P."""
    hist = jnp.bincount(jnp.argmin(((q[:, None] - CODES) ** 2).sum(-1), -1), length=3) / len(q)
    return float(0.5 * jnp.abs(hist - P).sum())


def _tv(params) -> float:
    return _law_tv(_generate(params, jax.random.normal(jax.random.key(7), (4000, 2))))


def _euler(params, steps=10) -> jax.Array:
    """The AR-diffusion model's own sampler: Euler on its velocity from t = 1 to 0."""
    x, times = jax.random.normal(jax.random.key(3), (4000, 2)), jnp.linspace(1.0, 0.0, steps + 1)
    for a, b in zip(times[:-1], times[1:]):
        x = x + (b - a) * _v(params, x, jnp.full((4000, 1), a))
    return x


@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
def test_score_distillation_moves_a_one_step_generator_to_the_teachers_law():
    """GTS (the exact teacher velocity on teacher samples) gives a model whose own 10-step
    Euler sampler draws the teacher's law; as a one-step generator it is a point (the mean
    code, TV ~ 0.4); alternating FCS (guidance) and SiD (generator) updates bring
    its snapped law to p. The same loop with the generator loss negated stays at TV 0.4."""
    logp, batch, tx = jnp.log(P), 256, optax.adam(1e-3)

    @jax.jit
    def gts(params, opt, key):
        k_q, k_x = jax.random.split(key)
        q = CODES[jax.random.categorical(k_q, logp, shape=(batch,))]
        x, t, _ = _noised(k_x, q)
        grads = jax.grad(lambda p: jnp.mean(jnp.sum(
            (_v(p, x, t) - velocity(x, t, logp, CODES)) ** 2, -1)))(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    params = _mlp_init(jax.random.key(0))
    opt = tx.init(params)
    for i in range(1500):
        params, opt = gts(params, opt, jax.random.key(100 + i))
    tv_init = _tv(params)
    assert _law_tv(_euler(params)) < 0.04  # GTS learnt the teacher's velocity field
    tx_gen, tx_guide = optax.adam(3e-4, b1=0.0, b2=0.99), optax.adam(1e-3, b1=0.0, b2=0.99)

    def train(sign):
        @jax.jit
        def step(gen, opt_gen, guide, opt_guide, key):
            def guide_update(carry, i):
                guide, opt = carry
                k_eps, k_x = jax.random.split(jax.random.fold_in(key, i))
                q = _generate(gen, jax.random.normal(k_eps, (batch, 2)))
                x, t, xi = _noised(k_x, q)
                grads = jax.grad(lambda p: jnp.mean(jnp.sum((_v(p, x, t) - (xi - q)) ** 2,
                                                            -1)))(guide)
                updates, opt = tx_guide.update(grads, opt, guide)
                return (optax.apply_updates(guide, updates), opt), None

            (guide, opt_guide), _ = jax.lax.scan(guide_update, (guide, opt_guide),
                                                 jnp.arange(5))
            k_eps, k_x = jax.random.split(jax.random.fold_in(key, 5))
            eps = jax.random.normal(k_eps, (batch, 2))

            def loss(p):
                q = _generate(p, eps)
                x, t, _ = _noised(k_x, q)
                return sign * sid_loss(q, denoise(x, t, logp, CODES), x - t * _v(guide, x, t))

            updates, opt_gen = tx_gen.update(jax.grad(loss)(gen), opt_gen, gen)
            return optax.apply_updates(gen, updates), opt_gen, guide, opt_guide

        state = (params, tx_gen.init(params), params, tx_guide.init(params))
        for i in range(600):
            state = step(*state, jax.random.key(10_000 + i))
        return _tv(state[0])

    assert tv_init > 0.3
    assert train(1.0) < 0.06
    assert train(-1.0) > 0.3


# --- the VAR networks ---------------------------------------------------------------------

def test_score_var_features_see_only_earlier_scales_and_one_step_is_causal():
    graphdef, params = _score()
    vae = bind(*_vae()).quantize
    h = jax.random.normal(jax.random.key(0), (2, VAR_CFG.seq_len, 4))

    def features(h):
        model = bind(graphdef, params)
        return np.asarray(model.features(LABELS, vae.vector_inputs(h, PATCH[-1])))

    def generated(h):
        return np.asarray(one_step(bind(graphdef, params), vae, LABELS, h))

    base_f, base_q = features(h), generated(h)
    for a, b in [(0, 1), (1, 5), (5, 14)]:
        moved = h.at[:, a:b].add(1.0)
        f, q = features(moved), generated(moved)
        np.testing.assert_allclose(f[:, :b], base_f[:, :b], atol=1e-5)  # own scale and before
        np.testing.assert_allclose(q[:, :a], base_q[:, :a], atol=1e-5)
        assert np.abs(q[:, a:b] - base_q[:, a:b]).max() > 1e-3  # its own noise: the head
        if b < VAR_CFG.seq_len:
            assert np.abs(f[:, b:] - base_f[:, b:]).max() > 1e-4  # later scales see it


def test_score_var_takes_the_teachers_trunk():
    teacher = _random(lambda: VAR(VAR_CFG, rngs=nnx.Rngs(0)), 5)
    graphdef, params = _score()
    params = score_from_teacher(params, teacher[1])
    assert "head" not in params and "mlp" in params
    inputs = jax.random.normal(jax.random.key(1), (2, VAR_CFG.seq_len - 1, 4))
    np.testing.assert_allclose(bind(graphdef, params).features(LABELS, inputs),
                               bind(*teacher).features(LABELS, inputs), atol=1e-6)


@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
def test_teacher_logits_are_what_the_sampler_draws_from():
    """With top-k 1 the sampler's codes are the argmax of its processed logits: the
    teacher-forced logits on those codes (guidance ramp, per-scale filter) pick them back."""
    teacher = _random(lambda: VAR(VAR_CFG, rngs=nnx.Rngs(0)), 5, 0.8)
    vae = _vae()
    sample = var_sampling.VARSampleConfig(cfg=3.0, top_k=1, top_p=1.0)
    codes = var_sampling.sample(*teacher, *vae, jax.random.key(0), LABELS, sample).aux["codes"]
    quantizer = bind(*vae).quantize
    vectors = quantizer.embedding.embedding[...][codes]
    logits = teacher_logits(bind(*teacher), quantizer, LABELS, vectors, sample)
    np.testing.assert_array_equal(np.argmax(logits, -1), codes)
    assert np.isinf(np.asarray(logits)).sum() == codes.size * (VAR_CFG.vocab_size - 1)
    open_logits = teacher_logits(bind(*teacher), quantizer, LABELS, vectors,
                                 var_sampling.VARSampleConfig(cfg=3.0, top_k=0, top_p=1.0))
    assert np.isfinite(np.asarray(open_logits)).all()


@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
def test_csd_step_updates_both_networks_and_the_ema_deterministically():
    teacher = _random(lambda: VAR(VAR_CFG, rngs=nnx.Rngs(0)), 5)
    vae = _vae()
    graphdef, params = _score()
    spec = Teacher(teacher[0], vae[0], var_sampling.VARSampleConfig(cfg=2.0, top_k=0,
                                                                    top_p=1.0))
    tx = optax.adam(1e-3)
    step = jax.jit(make_csd_step(graphdef, spec, tx, tx, guide_updates=2, copies=2,
                                 t_range=(0.02, 1.0), ema_decay=0.9))
    both = {"gen": params, "guide": params}
    state = init_state(both, {"gen": tx, "guide": tx}, 0, ema="gen")
    assert set(state.opt_state) == {"gen", "guide"}
    jax.tree.map(np.testing.assert_array_equal, state.ema, params)
    frozen = {"teacher": teacher[1], "tokenizer": vae[1]}
    batch = {"label": LABELS}
    new, metrics = step(state, batch, frozen)
    again, _ = step(state, batch, frozen)
    leaves = lambda tree: jax.tree.leaves(tree)
    for a, b in zip(leaves(new.params), leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    moved = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in zip(leaves(a), leaves(b)))
    assert moved(new.params["gen"], params) > 0 and moved(new.params["guide"], params) > 0
    assert moved(new.ema, params) > 0 and int(new.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values())
