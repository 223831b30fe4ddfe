"""What a run at scale needs: EMA, restore without init, weights placed on the mesh once."""

import dataclasses
import math
import re

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
from arjax.models import bind, split
from arjax.models.flowar import FlowAR, FlowARConfig
from arjax.models.flowar import teacher_inputs as flowar_teacher_inputs
from arjax.models.mar import MAR, MARConfig
from arjax.models.raster_ar import RasterAR
from arjax.models.var import VAR, VARConfig
from arjax.optim import OptimConfig, make_optimizer
from arjax.sampling import raster
from arjax.sampling.common import SampleConfig
from arjax.tokenizers.kl import KLVAE, KLConfig
from arjax.tokenizers.msvq import MSVQConfig, MultiScaleVQVAE
from arjax.tokenizers.vq import VQConfig, VQTokenizer
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
        expected = jax.tree.map(lambda e, p, w=weight: e + w * np.asarray(p, np.float64),
                                expected, history[k])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 state.ema, expected)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema))
    if warmup:
        assert ds[0] == pytest.approx(0.1) and ds[-1] == pytest.approx(6 / 15)


class Codes(ArraySource):
    def get(self, idx, views):
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


@pytest.mark.slow  # ~60 s on 2 cores: make test-all
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
    sharded = sharding.place(converted, mesh, sharding.rules_named("fsdp_all"))
    replicated = sharding.place(converted, mesh, sharding.rules_named("replicated"))
    for leaf in jax.tree.leaves(sharded):
        if leaf.ndim == 2:
            assert all(s.data.size * 4 == leaf.size for s in leaf.addressable_shards)
    fn = jax.jit(lambda p, key, labels: raster.sample(graphdef, p, key, labels,
                                                      SampleConfig(cfg=2.0, top_k=8)))
    labels = sharding.to_global(np.arange(8) % 4, mesh)
    key = jax.random.key(1)
    with jax.transfer_guard_host_to_device("disallow"):
        with jax.set_mesh(mesh):  # as make_generator traces: rows pinned in every block
            a = fn(sharded, key, labels)
            text = fn.lower(sharded, key, labels).as_text()
        b = fn(replicated, key, labels)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    # the cached decode's residual stream, per layer, in the prefill and in the token loop
    pinned = re.findall(r'sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}', text)
    assert len(pinned) >= 2 * (cfg.depth + 1), len(pinned)


def test_unknown_rule_set_is_a_config_error():
    with pytest.raises(ValueError, match="param_sharding='tp' is not a rule set"):
        sharding.rules_named("tp")


# --- mixed precision and rematerialisation, for every family ------------------------------

def gpt_family(**policy):
    cfg = tiny_gpt_config(dim=64, heads=4, **policy)
    model = RasterAR(cfg, rngs=nnx.Rngs(0))
    kernel = model.output.kernel
    kernel[...] = 0.02 * jax.random.normal(jax.random.key(0), kernel.shape, kernel.dtype)
    rng = np.random.default_rng(0)
    batch = {"codes": jnp.asarray(rng.integers(0, 16, (8, 9))),
             "label": jnp.asarray(rng.integers(0, 4, 8))}
    return model, batch, gpt_loss


def var_family(**policy):
    cfg = VARConfig(depth=2, width=64, heads=4, vocab_size=16, codebook_dim=4,
                    patch_nums=(1, 2, 3), num_classes=4, **{"drop_path": 0.0, **policy})
    model = VAR(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.normal(size=(8, 13, 4)), jnp.float32),
             "codes": jnp.asarray(rng.integers(0, 16, (8, 14))),
             "label": jnp.asarray(rng.integers(0, 4, 8))}

    def loss(model, batch, key):
        logits = model(batch["label"], batch["inputs"], key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean(), {}
    return model, batch, loss


def flowar_family(**policy):
    cfg = FlowARConfig(width=64, depth=2, heads=2, head_width=64, head_depth=2, cross=True,
                       scales=(1, 2, 4), token_dim=4, num_classes=4, dropout=0.0,
                       label_drop=0.0, **policy)
    model = FlowAR(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.normal(size=(8, 4, 4, 4)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 4, 8))}

    def loss(model, batch, key):
        return model.loss(batch["label"], batch["latents"], jax.random.key(0))[0], {}
    return model, batch, loss


def mar_family(**policy):
    cfg = MARConfig(width=64, depth=1, heads=2, head_width=64, head_depth=2, side=4,
                    token_dim=4, buffer_size=4, num_classes=4, dropout=0.0, label_drop=0.0,
                    **policy)
    model = MAR(cfg, rngs=nnx.Rngs(0))
    head = model.diffloss  # its AdaLN and output layers start at zero: nothing would show
    for i, layer in enumerate([*(b.adaLN_modulation for b in head.res_blocks),
                               head.final_layer.adaLN_modulation, head.final_layer.linear]):
        layer.kernel[...] = (0.05 * jax.random.normal(jax.random.key(i), layer.kernel.shape)
                             ).astype(layer.kernel.dtype)
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.normal(size=(8, 4, 4, 4)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 4, 8))}

    def loss(model, batch, key):
        return model.loss(batch["label"], batch["latents"], jax.random.key(0))[0], {}
    return model, batch, loss


def tokenizer_family(make):
    def family(dtype="float32", param_dtype="float32"):
        model = make(dtype, param_dtype)
        images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)),
                             jnp.float32)
        return model, {"image": images}, None
    return family


def tok_out(model, batch):
    """The continuous paths: encoder features and decoder images (a quantiser's code choice
    is discontinuous, so codes are fixed random ones)."""
    images = batch["image"]
    if isinstance(model, KLVAE):
        moments = model.moments(images)
        return jnp.concatenate([moments.reshape(-1),
                                model.decode_raw(moments[..., :4]).reshape(-1)])
    codes = jax.random.randint(jax.random.key(0), (2, 64), 0, 16)
    if isinstance(model, VQTokenizer):
        features, decoded = model.quant_conv(model.encoder(images)), model.decode(codes)
    else:
        features = model.features(images)
        decoded = model.decode([codes[:, :n * n] for n in model.cfg.patch_nums])
    return jnp.concatenate([features.astype(jnp.float32).reshape(-1), decoded.reshape(-1)])


TOKENIZERS = {
    "vq": tokenizer_family(lambda d, p: VQTokenizer(VQConfig(
        codebook_size=16, codebook_dim=4, ch=16, ch_mult=(1, 2), num_res_blocks=1,
        z_channels=16, norm_groups=8, dtype=d, param_dtype=p), rngs=nnx.Rngs(0))),
    "msvq": tokenizer_family(lambda d, p: MultiScaleVQVAE(MSVQConfig(
        codebook_size=16, codebook_dim=4, patch_nums=(1, 2, 4, 8), ch=16, ch_mult=(1, 2),
        num_res_blocks=1, norm_groups=8, dtype=d, param_dtype=p), rngs=nnx.Rngs(0))),
    "kl": tokenizer_family(lambda d, p: KLVAE(KLConfig(
        embed_dim=4, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, dtype=d,
        param_dtype=p), rngs=nnx.Rngs(0))),
}
GENERATORS = {"gpt": gpt_family, "var": var_family, "flowar": flowar_family, "mar": mar_family}
FAMILIES = {**GENERATORS, **TOKENIZERS}


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def outputs(name, model, batch):
    if name == "gpt":
        return model(batch["codes"], batch["label"])
    if name == "var":
        return model(batch["label"], batch["inputs"])
    if name == "flowar":
        _, inputs = flowar_teacher_inputs(batch["latents"], model.cfg.scales)
        z = model(batch["label"], inputs)
        t = jnp.full((8,), 0.3)
        velocity = model.flownet(batch["latents"].reshape(8, 16, 4), t, z[:, 5:],
                                 jnp.asarray(model.head_ropes[-1]))
        return jnp.concatenate([z.reshape(-1), velocity.reshape(-1)])
    if name == "mar":
        tokens = batch["latents"].reshape(8, 16, 4)
        known = jnp.arange(16)[None] < jnp.arange(8)[:, None] * 2
        z = model(tokens, known, model.conditioning(batch["label"]))
        out = model.diffloss(tokens.reshape(-1, 4), jnp.full((128,), 300), z.reshape(128, -1))
        return jnp.concatenate([z.reshape(-1), out.reshape(-1)])
    return tok_out(model, batch)


SLOW = pytest.mark.slow  # > 25 s on 2 cores (compilation): make test-all


@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW) if n in ("kl", "flowar", "msvq",
                                                                      "var", "vq", "mar") else n
                                  for n in sorted(FAMILIES)])
def test_bfloat16_forward_is_close_to_float32(name):
    """Same float32 weights, compute in bfloat16: outputs within 2 % (relative l2) of the
    float32 forward, and float32 where the numerics need it (logits, velocities, images)."""
    model32, batch, _ = FAMILIES[name]()
    model16 = FAMILIES[name](dtype="bfloat16")[0]
    graphdef16, _ = split(model16)
    _, params = split(model32)
    out32 = outputs(name, model32, batch)
    out16 = outputs(name, bind(graphdef16, params), batch)
    assert out16.dtype == jnp.float32
    assert relative_error(out16, out32) < 2e-2, relative_error(out16, out32)
    assert relative_error(out16, out32) > 0  # bfloat16 was really used


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_param_dtype_sets_storage(name):
    abstract = nnx.eval_shape(lambda: FAMILIES[name](dtype="bfloat16",
                                                     param_dtype="bfloat16")[0])
    dtypes = {x.dtype for x in jax.tree.leaves(split(abstract)[1])}
    assert jnp.dtype("bfloat16") in dtypes


@pytest.mark.parametrize("name,policy", [
    ("gpt", "full"), pytest.param("var", "full", marks=SLOW),
    pytest.param("flowar", "full", marks=SLOW), pytest.param("mar", "full", marks=SLOW),
    *[pytest.param(n, "dots", marks=SLOW) for n in sorted(GENERATORS) if n != "mar"]])
def test_remat_leaves_gradients_unchanged(name, policy):
    """Equal up to float32 rounding (the recomputed forward may fuse differently)."""
    grads = []
    for remat in ("none", policy):
        model, batch, loss = GENERATORS[name](remat=remat)
        graphdef, params = split(model)
        objective = lambda p, g=graphdef, f=loss, b=batch: f(bind(g, p), b,
                                                             jax.random.key(1))[0]
        grads.append(jax.jit(jax.grad(objective))(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


@pytest.mark.parametrize("name", ["gpt", *[pytest.param(n, marks=SLOW)
                                          for n in ("var", "flowar", "mar")]])
def test_scanned_layers_equal_the_loop(name):
    """`scan_layers` traces one block per stack (a `scan` in the program) and computes the
    same loss and gradients as the unrolled blocks, with remat and VAR's stochastic depth
    (per-block rates, the first 0) on."""
    extra = {"drop_path": 0.3} if name == "var" else {}
    results, programs = [], []
    for scan in (False, True):
        model, batch, loss = GENERATORS[name](remat="full", scan_layers=scan, **extra)
        graphdef, params = split(model)
        objective = lambda p, g=graphdef, f=loss, b=batch: f(bind(g, p), b,
                                                             jax.random.key(1))[0]
        programs.append(str(jax.make_jaxpr(objective)(params)))
        results.append(jax.jit(jax.value_and_grad(objective))(params))
    assert "scan[" not in programs[0] and "scan[" in programs[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)


def test_scanned_layers_under_a_mesh(devices):
    """Scanned blocks under FSDP: the batch stays split inside the scan and the gradients
    equal the unrolled ones without a mesh."""
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)), devices)
    grads, texts = [], []
    for scan in (False, True):
        model, batch, loss = gpt_family(scan_layers=scan)
        graphdef, params = split(model)
        objective = lambda p, g=graphdef, b=batch: gpt_loss(bind(g, p), b, jax.random.key(1))[0]
        if scan:
            with jax.set_mesh(mesh):
                placed = sharding.place(params, mesh, sharding.rules_named("fsdp_all"))
                texts.append(jax.jit(jax.grad(objective)).lower(placed).as_text())
                grads.append(jax.jit(jax.grad(objective))(placed))
        else:
            grads.append(jax.jit(jax.grad(objective))(params))
    assert re.search(r'sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}', texts[0])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


BLOCKS = {"gpt": 2, "var": 2, "flowar": 2 + 2, "mar": 1 + 1 + 2}  # trunk (+ head) blocks
# (a head may run more than once per step: FlowAR's once per scale)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_blocks_keep_the_batch_split_under_a_mesh(name, devices):
    """FSDP gathers weights, not rows: with a mesh in context (as `fit` and `arjax.plan`
    trace) every block's input and output, and their cotangents, are constrained to the
    batch over ("data", "fsdp") (without it XLA:TPU kept GPT-XL's weights split and gathered
    8x the rows on every chip); nothing is constrained without a mesh."""
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)), devices)
    model, batch, loss = GENERATORS[name]()
    graphdef, params = split(model)
    objective = lambda p: loss(bind(graphdef, p), batch, jax.random.key(1))[0]
    lowered = lambda: jax.jit(jax.grad(objective)).lower(params).as_text()
    with jax.set_mesh(mesh):
        text = lowered()
    pinned = re.findall(r'sharding_constraint %\S+ <@mesh, \[\{"data", "fsdp"\}(?:, \{\})*\]>',
                        text)
    assert len(pinned) >= 4 * BLOCKS[name], len(pinned)  # in and out, forward and back
    assert "sharding_constraint" not in lowered()


@pytest.mark.parametrize("name", ["gpt", pytest.param("var", marks=SLOW),
                                  pytest.param("flowar", marks=SLOW)])
def test_bfloat16_training_lowers_the_loss(name):
    """AdamW in float32 on bfloat16 compute, with full remat: 30 steps on one batch."""
    model, batch, loss = GENERATORS[name](dtype="bfloat16", remat="full")
    graphdef, params = split(model)
    tx = make_optimizer(OptimConfig(lr=3e-3, weight_decay=0.0))
    step = jax.jit(make_train_step(graphdef, loss, tx, 0.9))
    state = init_state(params, tx, 0, ema=True)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train/loss"]))
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.ema)))


@pytest.mark.parametrize("bad,match", [({"dtype": "fp8"}, "model.dtype='fp8'"),
                                       ({"remat": "some"}, "model.remat='some'"),
                                       ({"scan_layers": "yes"}, "model.scan_layers='yes'")])
def test_bad_policy_is_a_config_error(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_gpt_config(**bad).validate()


# --- official schedules -------------------------------------------------------------------

def var_official_lr(it, wp_it, max_it, peak, wp0, wpe):
    """VAR utils/lr_control.py lr_wd_annealing, sche_type='lin0', stated directly."""
    if it < wp_it:
        ratio = wp0 + (1 - wp0) * it / wp_it
    else:
        passed = (it - wp_it) / (max_it - 1 - wp_it)
        ratio = 1 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95
    return peak * ratio


def var_official_wd(it, max_it, wd, wd_end):
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * math.cos(math.pi * it / (max_it - 1)))


def test_var_lin0_and_cosine_weight_decay_match_the_official_formulas():
    """Zero gradients leave AdamW's decoupled decay alone: update = -lr_t * wd_t * p, so the
    optimizer's own steps reveal lr_t * wd_t at every step."""
    total, warm = 200, 10
    cfg = OptimConfig(lr=3e-4, weight_decay=0.05, weight_decay_end=0.08, schedule="lin0",
                      total_steps=total, warmup_steps=warm, warmup_start=0.005,
                      end_ratio=0.01, grad_clip=2.0)
    tx = make_optimizer(cfg)
    params = {"w": jnp.ones((2, 2))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    zeros = jax.tree.map(jnp.zeros_like, params)
    got = []
    for _ in range(total):
        updates, state = update(zeros, state, params)
        got.append(-float(updates["w"][0, 0]))
    want = [var_official_lr(i, warm, total, 3e-4, 0.005, 0.01)
            * var_official_wd(i, total, 0.05, 0.08) for i in range(total)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_var_presets_state_their_schedule():
    from experiments.var_imagenet import PRESETS
    d16 = PRESETS["imagenet256_d16"].var_train.optim
    d30 = PRESETS["imagenet256_d30"].var_train.optim
    assert (d16.schedule, d16.end_ratio, d16.weight_decay_end) == ("lin0", 0.1, -1.0)
    assert (d30.schedule, d30.end_ratio, d30.weight_decay_end) == ("lin0", 0.01, 0.08)
    assert d16.total_steps == PRESETS["imagenet256_d16"].var_train.steps


@pytest.mark.slow  # two sampler compilations per family: make test-all
def test_bfloat16_samplers_follow_float32():
    """Same weights and noise: FlowAR's ODE latents within 5 % in bfloat16 (caches bf16, ODE
    state float32), VAR's greedy codes at least 90 % identical."""
    import test_flowar
    import test_var

    from arjax.sampling import var as var_sampling
    from arjax.sampling.flowar import FlowSampleConfig, sample_latents
    from arjax.tokenizers.msvq import MultiScaleVQVAE as VQVAE

    cfg, graphdef, params = test_flowar.tiny(True, seed=3, noise=0.05)
    bf16 = lambda module, c: split(nnx.eval_shape(lambda: module(
        dataclasses.replace(c, dtype="bfloat16"), rngs=nnx.Rngs(0))))[0]
    labels = jnp.array([0, 1, 2, 0])
    flow = lambda g: jax.jit(lambda p: sample_latents(g, p, jax.random.key(5), labels,
                                                      FlowSampleConfig(num_steps=6, cfg=2.0)))
    a, b = flow(graphdef)(params)[0], flow(bf16(FlowAR, cfg))(params)[0]
    assert b.dtype == jnp.float32 and 0 < relative_error(b, a) < 5e-2

    var_graphdef, var_params = test_var.randomised(
        lambda: VAR(test_var.TINY_VAR, rngs=nnx.Rngs(0)), 0)
    vae_graphdef, vae_params = test_var.randomised(
        lambda: VQVAE(test_var.TINY_VAE, rngs=nnx.Rngs(0)), 1)
    greedy = var_sampling.VARSampleConfig(cfg=2.0, top_k=1, top_p=1.0)
    codes = [np.asarray(jax.jit(lambda p, q, g=g: var_sampling.sample(
        g, p, vae_graphdef, q, jax.random.key(0), jnp.arange(4), greedy))(
            var_params, vae_params).aux["codes"])
        for g in (var_graphdef, bf16(VAR, test_var.TINY_VAR))]
    assert np.mean(codes[0] == codes[1]) >= 0.9


# --- memory planner -----------------------------------------------------------------------

def test_plan_counts_state_bytes_per_device_exactly(capsys):
    """8 CPU devices, FSDP over 4 with every tensor eligible: parameters and EMA are a
    quarter of the float32 model on each device, Adam twice that, all inside XLA's own
    argument bytes of the compiled step."""
    from arjax import plan
    from arjax.models import param_count
    from experiments import llamagen_imagenet as exp

    args = plan.parse_args(["--config", "llamagen_imagenet:digits", "--devices", "8",
                            "--mesh", "data=2,fsdp=4", "--json",
                            "--set", "gpt_train.ema_decay=0.999",
                            "--set", "param_sharding=fsdp_all"])
    cfg = exp.PRESETS["digits"]
    count = param_count(split(nnx.eval_shape(lambda: RasterAR(cfg.model, rngs=nnx.Rngs(0))))[1])
    result = plan.run(args)
    assert result["per_device_batch"] == cfg.gpt_train.batch_size // 8
    assert result["params"] == result["ema"] < count * 4 / 3  # sharded (odd sizes stay whole)
    assert result["params"] > count * 4 / 4 - 1
    assert 2 * result["params"] <= result["opt_state"] <= 2 * result["params"] + 64
    state = result["params"] + result["opt_state"] + result["ema"]
    assert result["compiled"]["argument"] >= state + result["batch"]
    assert '"config": "llamagen_imagenet:digits"' in capsys.readouterr().out


def test_plan_reports_a_step_the_compiler_refuses(monkeypatch, capsys):
    """XLA:TPU refuses a step whose temporaries exceed the HBM (RESOURCE_EXHAUSTED); the
    planner reports that figure, marked, instead of a traceback."""
    from jax._src import stages

    from arjax import plan

    message = ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Ran out of memory "
               "on HBM, the total memory required for HLO temporaries (17.67G) exceeds "
               "available HBM (15.75G).")

    def refuse(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError(message)

    monkeypatch.setattr(stages.Lowered, "compile", refuse)
    result = plan.run(plan.parse_args(["--config", "llamagen_imagenet:digits", "--devices",
                                       "8", "--mesh", "data=2,fsdp=4"]))
    assert result["over_hbm"] and result["temp"] == int(17.67 * 2**30)
    assert result["peak"] == result["temp"] + result["compiled"]["argument"]
    assert "XLA refused to compile the step" in capsys.readouterr().out
    assert plan.refused_temporaries("RESOURCE_EXHAUSTED: something else") is None


@pytest.mark.parametrize("argv,match", [
    (["--config", "llamagen_imagenet"], "expected <experiment>:<preset>"),
    (["--config", "nope:digits"], "no experiment named 'nope'"),
    (["--config", "var_imagenet:d99"], "no preset 'd99'"),
    (["--config", "var_imagenet:digits", "--target", "gpu"], "use cpu or tpu"),
    (["--config", "var_imagenet:digits", "--devices", "16"], "--devices 16 but JAX has 8"),
])
def test_plan_bad_input_is_one_line(argv, match, no_compilation):
    from arjax import plan

    argv = ["--devices", "8", *argv] if "--devices" not in argv else argv
    with pytest.raises(ValueError, match=match):
        plan.run(plan.parse_args(argv))


@pytest.mark.slow  # ~40 s on 2 cores (three short trainings): make test-all
def test_stages_sample_and_evaluate_with_the_ema_by_default(devices):
    from arjax.experiment.pipeline import StageConfig, train_stage

    mesh = sharding.make_mesh((("data", 1),), devices[:1])
    module_fn = lambda: RasterAR(tiny_gpt_config(), rngs=nnx.Rngs(0))
    seen = []

    def run(**stage):
        cfg = StageConfig(steps=3, batch_size=8, log_every=1, optim=OptimConfig(lr=1e-2),
                          **stage)
        evaluate = lambda weights: seen.append(weights) or {"n": 0.0}
        return train_stage("gpt", module_fn, gpt_loss, cfg, CODES, 0, mesh, None, False,
                           evaluate)[1]

    ema = run(ema_decay=0.5)
    raw = run(ema_decay=0.5, use_ema=False)
    plain = run()
    assert seen[0] is ema and seen[1] is raw
    jax.tree.map(np.testing.assert_array_equal, raw, plain)  # the EMA never feeds training
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema),
                                                         jax.tree.leaves(raw)))
