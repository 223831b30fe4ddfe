"""What a run at scale needs: EMA, restore without init, weights placed on the mesh once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_gpt, tiny_gpt_config
from flax import nnx

from arjax import sharding
from arjax.convert import llamagen
from arjax.data import Batches
from arjax.data.sources import ArraySource
from arjax.models import split
from arjax.models.raster_ar import RasterAR
from arjax.optim import OptimConfig, make_optimizer
from arjax.sampling import raster
from arjax.sampling.common import SampleConfig
from arjax.train import ema_decay_at, fit, init_state, make_train_step


def toy_step(decay, warmup=False):
    """A linear model's train step (lr 0.1 SGD on a quadratic), its EMA and the params."""
    module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params = split(module)
    tx = optax.sgd(0.1)
    loss = lambda model, batch, key: (jnp.mean((model(batch) - 1.0) ** 2), {})
    step = jax.jit(make_train_step(graphdef, loss, tx, decay, warmup))
    return step, init_state(params, tx, 0, ema=True)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_the_closed_form(warmup):
    """e_n = prod(d_1..d_n) p_0 + sum_k (1 - d_k) prod(d_{k+1}..d_n) p_k, the d_k of each
    step (constant, or the warm-up rule)."""
    decay = 0.9
    step, state = toy_step(decay, warmup)
    batch = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    history = [state.params]
    for _ in range(6):
        state, _ = step(state, batch)
        history.append(state.params)
    ds = [float(ema_decay_at(jnp.int32(k), decay, warmup)) for k in range(6)]
    expected = jax.tree.map(lambda p: np.prod(ds) * np.asarray(p, np.float64), history[0])
    for k in range(1, 7):
        weight = (1 - ds[k - 1]) * np.prod(ds[k:])
        expected = jax.tree.map(lambda e, p: e + weight * np.asarray(p, np.float64),
                                expected, history[k])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state.ema, expected)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema))
    if warmup:
        assert ds[0] == pytest.approx(0.1) and ds[-1] == pytest.approx(6 / 15)


class Codes(ArraySource):
    def __getitem__(self, idx):
        return {"codes": self.images[idx], "label": self.labels[idx]}


CODES = Codes(np.random.default_rng(0).integers(0, 16, (64, 9)),
              np.random.default_rng(1).integers(0, 4, 64), 4)


def gpt_loss(model, batch, key):
    logits = model(batch["codes"], batch["label"], key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean(), {}


def fit_gpt(mesh, steps, workdir=None, init_calls=None):
    module_fn = lambda: RasterAR(tiny_gpt_config(), rngs=nnx.Rngs(0))
    graphdef = split(nnx.eval_shape(module_fn))[0]
    tx = make_optimizer(OptimConfig(lr=3e-3))

    def init_fn():
        if init_calls is not None:  # runs only when the init is executed, not traced
            jax.debug.callback(lambda: init_calls.append(1))
        return init_state(split(module_fn())[1], tx, 0, ema=True)

    return fit(name="gpt", init_fn=init_fn, train_step=make_train_step(graphdef, gpt_loss, tx,
                                                                        0.5),
               make_batches=lambda s: Batches(CODES, 8, 3, mesh, s), steps=steps, mesh=mesh,
               workdir=workdir, log_every=1, ckpt_every=2, progress=False)[0]


def test_resume_restores_ema_exactly_without_a_random_init(tmp_path, devices):
    mesh = sharding.make_mesh((("data", 2),), devices[:2])
    straight = fit_gpt(mesh, 4)
    fit_gpt(mesh, 2, str(tmp_path))
    calls = []
    resumed = fit_gpt(mesh, 4, str(tmp_path), init_calls=calls)
    jax.effects_barrier()
    assert calls == []  # the state came from the checkpoint alone
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(resumed.ema),
                                                         jax.tree.leaves(resumed.params)))
    fresh = []
    fit_gpt(mesh, 1, init_calls=fresh)
    jax.effects_barrier()
    assert fresh == [1]


def test_converted_weights_are_sharded_once_and_sample_the_same_tokens(devices):
    """Official GPT weights placed by the FSDP rules: no device holds a whole matrix, the
    sampler takes them without any host-to-device copy, and draws the tokens it draws from
    replicated weights."""
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)), devices)
    cfg = tiny_gpt_config(dim=64, heads=4)
    graphdef, params = tiny_gpt(dim=64, heads=4)
    converted = llamagen.gpt_params_from_torch(llamagen.to_torch(params), cfg)
    rules = ((r".*", sharding.fsdp(min_size_mb=0.0)),)
    sharded = sharding.place(converted, mesh, rules)
    replicated = sharding.place(converted, mesh, sharding.rules_named("replicated"))
    for leaf in jax.tree.leaves(sharded):
        if leaf.ndim == 2:
            assert all(s.data.size * 4 == leaf.size for s in leaf.addressable_shards)
    fn = jax.jit(lambda p, key, labels: raster.sample(graphdef, p, key, labels,
                                                      SampleConfig(cfg=2.0, top_k=8)))
    labels = sharding.to_global(np.arange(8) % 4, mesh)
    key = jax.random.key(1)
    with jax.transfer_guard_host_to_device("disallow"):
        a, b = fn(sharded, key, labels), fn(replicated, key, labels)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_unknown_rule_set_is_a_config_error():
    with pytest.raises(ValueError, match="param_sharding='tp' is not a rule set"):
        sharding.rules_named("tp")
