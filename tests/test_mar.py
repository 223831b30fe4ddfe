"""MAR: the masked trunk equals the official token dropping, the diffusion maths, the static-
shape sampler against a direct transcription of the official loop, official key layout."""

import argparse
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import official_shapes
from flax import nnx

from arjax.convert.mar import MAR_FORMAT, load_mar, mar_params_from_torch, mar_to_torch
from arjax.convert.torch_io import CheckpointMismatch
from arjax.diffusion import Diffusion, space_timesteps
from arjax.models import bind, param_count, split
from arjax.models.mar import MAR, MARConfig, diffusion, mar_config
from arjax.sampling.mar import MARSampleConfig, mask_schedule, sample_latents, segments


@functools.lru_cache
def tiny(seed=0, noise=0.2, **overrides):
    cfg = MARConfig(**{**dict(width=32, depth=2, heads=2, head_width=32, head_depth=2, side=4,
                              token_dim=3, buffer_size=4, num_classes=3, dropout=0.0),
                       **overrides})
    module_fn = lambda: MAR(cfg, rngs=nnx.Rngs(seed))

    def init():  # one compilation (an eager init compiles every op: ~15 s)
        leaves, tree = jax.tree.flatten(split(module_fn())[1])
        # randomise everything (the zero-initialised AdaLN and output layers too)
        keys = jax.random.split(jax.random.key(seed + 7), len(leaves))
        return jax.tree.unflatten(tree, [x + noise * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys)])
    return cfg, split(nnx.eval_shape(module_fn))[0], jax.jit(init)()


@pytest.mark.parametrize("size,count", [
    pytest.param("L", 478.3e6, marks=pytest.mark.slow),
    pytest.param("H", 942.4e6, marks=pytest.mark.slow)])
def test_official_parameter_counts(size, count):
    shapes = official_shapes(lambda: MAR(mar_config(size), rngs=nnx.Rngs(0)),
                             MAR_FORMAT.name_of)
    assert abs(sum(math.prod(s) for s in shapes.values()) - count) < 0.06e6


def test_official_keys_and_shapes_of_mar_b():
    shapes = official_shapes(lambda: MAR(mar_config("B"), rngs=nnx.Rngs(0)), MAR_FORMAT.name_of)
    assert len(shapes) == 364
    assert abs(sum(math.prod(s) for s in shapes.values()) - 207.9e6) < 0.06e6
    expected = {  # the spec's MAR-B table (model_families.md 4.6)
        "class_emb.weight": (1000, 768), "fake_latent": (1, 768), "mask_token": (1, 1, 768),
        "encoder_pos_embed_learned": (1, 320, 768), "decoder_pos_embed_learned": (1, 320, 768),
        "diffusion_pos_embed_learned": (1, 256, 768), "z_proj.weight": (768, 16),
        "z_proj_ln.weight": (768,), "encoder_norm.bias": (768,), "decoder_embed.weight":
        (768, 768), "encoder_blocks.11.attn.qkv.weight": (2304, 768),
        "decoder_blocks.11.attn.qkv.bias": (2304,), "decoder_blocks.0.attn.proj.weight":
        (768, 768), "encoder_blocks.0.mlp.fc1.weight": (3072, 768),
        "encoder_blocks.0.mlp.fc2.weight": (768, 3072), "encoder_blocks.0.norm2.bias": (768,),
        "diffloss.net.time_embed.mlp.0.weight": (1024, 256),
        "diffloss.net.time_embed.mlp.2.weight": (1024, 1024),
        "diffloss.net.cond_embed.weight": (1024, 768), "diffloss.net.input_proj.weight":
        (1024, 16), "diffloss.net.res_blocks.5.in_ln.weight": (1024,),
        "diffloss.net.res_blocks.0.mlp.0.weight": (1024, 1024),
        "diffloss.net.res_blocks.0.mlp.2.weight": (1024, 1024),
        "diffloss.net.res_blocks.0.adaLN_modulation.1.weight": (3072, 1024),
        "diffloss.net.final_layer.linear.weight": (32, 1024),
        "diffloss.net.final_layer.adaLN_modulation.1.weight": (2048, 1024)}
    assert {k: shapes.get(k) for k in expected} == expected


def reference_trunk(model, tokens, known, cond):
    """The official forward_mae_encoder/decoder: the unknown tokens are *dropped* (every row
    keeps the same number) before the encoder and scattered back as mask tokens."""
    cfg, b = model.cfg, tokens.shape[0]
    x = jnp.concatenate([jnp.broadcast_to(cond[:, None], (b, cfg.buffer_size, cfg.width)),
                         model.z_proj(tokens)], axis=1)
    x = model.z_proj_ln(x + model.encoder_pos_embed_learned[...])
    keep = np.concatenate([np.ones((b, cfg.buffer_size), bool), np.asarray(known)], axis=1)
    kept = jnp.stack([x[i][keep[i]] for i in range(b)])
    for block in model.encoder_blocks:
        kept = block(kept, None)
    kept = model.decoder_embed(model.encoder_norm(kept))
    full = jnp.broadcast_to(model.mask_token[...], (b, keep.shape[1], cfg.width))
    full = jnp.stack([full[i].at[np.nonzero(keep[i])[0]].set(kept[i]) for i in range(b)])
    x = full + model.decoder_pos_embed_learned[...]
    for block in model.decoder_blocks:
        x = block(x, None)
    return model.decoder_norm(x)[:, cfg.buffer_size:] + model.diffusion_pos_embed_learned[...]


@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
def test_masked_trunk_equals_dropping_the_unknown_tokens():
    cfg, graphdef, params = tiny()
    model = bind(graphdef, params)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.normal(size=(3, 16, 3)), jnp.float32)
    known = np.zeros((3, 16), bool)
    for row in known:  # 6 known tokens per row, different places
        row[rng.permutation(16)[:6]] = True
    cond = model.conditioning(jnp.array([0, 2, 1]), jnp.array([False, False, True]))
    trunk = jax.jit(lambda p, x: bind(graphdef, p)(x, jnp.asarray(known), cond))
    z = trunk(params, tokens)
    expected = jax.jit(lambda p: reference_trunk(bind(graphdef, p), tokens, known, cond))
    np.testing.assert_allclose(z, expected(params), atol=2e-5)
    # the values at unknown places never matter
    other = jnp.where(jnp.asarray(known)[..., None], tokens, 100.0)
    np.testing.assert_allclose(trunk(params, other), z, atol=1e-5)
    # the encoder on the known tokens and two unknown ones (masked as keys)
    capped = jax.jit(lambda p: bind(graphdef, p)(tokens, jnp.asarray(known), cond, cap=8))
    np.testing.assert_allclose(capped(params), z, atol=2e-5)


def test_respacing_keeps_the_cumulative_schedule():
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    kept = space_timesteps(1000, 100)
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    full, spaced = Diffusion.make(), Diffusion.make("cosine", 1000, 100)
    alpha_bar = np.cumprod(1 - np.asarray(full.betas))
    np.testing.assert_allclose(np.cumprod(1 - np.asarray(spaced.betas)), alpha_bar[kept],
                               rtol=1e-10)
    assert spaced.timesteps == tuple(kept)
    # IDDPM's cosine: alpha_bar(t) = f(t) / f(0), f = cos^2((t + 0.008) / 1.008 pi / 2)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    np.testing.assert_allclose(alpha_bar[499], f(0.5) / f(0), rtol=1e-9)


def test_linear_schedule_is_ddpms():
    """Upstream's "linear": 1e-4 to 0.02 over 1000 steps (scaled by 1000 / steps), so the
    process ends at alpha_bar ~ 4e-5, where the cosine one ends at ~2e-9."""
    betas = np.asarray(Diffusion.make("linear").betas)
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(Diffusion.make("linear", 100).betas),
                               np.linspace(1e-3, 0.2, 100), rtol=1e-12)
    assert 3e-5 < np.prod(1 - betas) < 5e-5
    assert np.prod(1 - np.asarray(Diffusion.make().betas)) < 1e-8
    with pytest.raises(ValueError, match="noise_schedule='sqrt' must be one of"):
        MARConfig(noise_schedule="sqrt").validate()


@pytest.mark.parametrize("schedule,steps", [pytest.param("cosine", 100, marks=pytest.mark.slow),
                                            ("cosine", 25), ("linear", 25)])
def test_chain_with_the_exact_denoiser_samples_the_data_distribution(schedule, steps):
    """Data N(mu, s^2) per channel: the true reverse kernels are Gaussian with a closed-form
    mean (from E[eps | x_t]) and variance (posterior variance + coef1^2 Var[x0 | x_t], which
    the learned-range v can express), so the chain must give back mean mu and std s."""
    mu, s = jnp.array([0.5, -1.0]), jnp.array([0.3, 1.5])
    process = Diffusion.make(schedule, 1000, steps)
    tables = {k: np.zeros(1000) for k in ("ab", "coef1", "log_post", "log_beta")}
    betas = np.asarray(process.betas)
    ab = np.cumprod(1 - betas)
    for i, t in enumerate(process.timesteps):  # by the original index the net sees
        tables["ab"][t], tables["coef1"][t] = ab[i], process.tables["post_coef1"][i]
        tables["log_post"][t] = process.tables["post_log_var"][i]
        tables["log_beta"][t] = np.log(betas[i])
    tables = {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}

    def net(x, t):
        a, at = tables["ab"][t][:, None], lambda k: tables[k][t][:, None]
        eps = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s**2 + 1 - a)
        var = jnp.exp(at("log_post")) + at("coef1") ** 2 * s**2 * (1 - a) / (a * s**2 + 1 - a)
        frac = (jnp.log(var) - at("log_post")) / (at("log_beta") - at("log_post"))
        return jnp.concatenate([eps, 2 * frac - 1], -1)

    n = 40000
    noise = jax.random.normal(jax.random.key(0), (steps + 1, n, 2))
    x = jax.jit(lambda nz: process.sample(net, nz[0], nz[1:]))(noise)
    np.testing.assert_allclose(x.mean(0), mu, atol=0.02)
    np.testing.assert_allclose(x.std(0), s, rtol=0.015)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chain_with_prepared_step_inputs_equals_the_plain_chain(chunk):
    """The sampler's hoisting: a net whose t-only inputs come from `prepare`, `chunk` steps at
    a time, runs the same chain as the net given t."""
    process = Diffusion.make("cosine", 1000, 10)
    w = jax.random.normal(jax.random.key(1), (2, 4))
    feature = lambda t: jnp.sin(t.astype(jnp.float32)[..., None] / 100.0 + jnp.arange(4.0))
    net = lambda x, t: jnp.tanh(x @ w + feature(t))
    x, noise = jax.random.normal(jax.random.key(2), (3, 2)), jax.random.normal(
        jax.random.key(3), (10, 3, 2))
    plain = process.chain(net, x, noise, 0.9, True)
    prepared = process.chain(lambda x, f: jnp.tanh(x @ w + f), x, noise, 0.9, True,
                             prepare=lambda t: feature(t)[:, None], chunk=chunk)
    for a, b in zip(plain, prepared):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_hoisted_modulations_give_the_same_denoiser():
    cfg, graphdef, params = tiny()
    head = bind(graphdef, params).diffloss
    x = jax.random.normal(jax.random.key(0), (5, cfg.token_dim))
    c = head.condition(jax.random.normal(jax.random.key(1), (5, cfg.width)))
    t = jnp.array([999, 500, 3])
    mods = head.modulations(t, c)
    for k in range(3):
        np.testing.assert_allclose(
            head.denoise_modulated(x, [m[k] for m in mods]),
            head.denoise(x, jnp.full((5,), t[k]), c), rtol=1e-5, atol=1e-5)


def test_diffusion_loss_vanishes_for_the_true_noise_and_posterior_variance():
    """eps equal to the drawn noise and v = -1 (log variance = the posterior's) make the
    model's Gaussian the true posterior q(x_{t-1} | x_t, x0): MSE and KL both 0 (t > 0);
    an eps off by 0.5 costs at least its squared error 0.25."""
    process = diffusion()
    x0 = jax.random.normal(jax.random.key(1), (256, 3))
    key = jax.random.key(2)
    k_t, k_eps = jax.random.split(key)
    i = np.asarray(jax.random.randint(k_t, (256,), 0, 1000))
    true_eps = jax.random.normal(k_eps, x0.shape)
    net = lambda shift: lambda x, t: jnp.concatenate([true_eps + shift, -jnp.ones_like(x)], -1)
    exact, off = process.loss(net(0.0), x0, key), process.loss(net(0.5), x0, key)
    np.testing.assert_allclose(np.asarray(exact)[i > 0], 0, atol=2e-3)
    assert np.all(np.asarray(off)[i > 0] >= 0.25 - 1e-5)


def test_mask_schedule_is_the_official_cosine():
    m, first = mask_schedule(256, 64)
    assert m[0] == 256 and m[-1] == 1 and np.all(np.diff(m) < 0)
    assert m[1] == math.floor(256 * np.cos(math.pi / 2 / 64)) and first[-1] == 0
    counts = m[:-1] - first
    assert counts.sum() == 256  # every token predicted exactly once
    m, first = mask_schedule(16, 16)  # one token a step
    assert list(m[:-1] - first) == [1] * 16


@pytest.mark.parametrize("length,num_iter,count,chain_cost", [
    (256, 10, 3, 40.0), (256, 10, 4, 0.5), (64, 9, 2, 5.0), (16, 6, 6, 1.0)])
def test_segments_cover_the_steps_with_the_least_padded_work(length, num_iter, count,
                                                              chain_cost):
    m, first = mask_schedule(length, num_iter)
    known, new = length - m[:-1], m[:-1] - first

    def work(runs):
        return sum((b - a) * (cap + chain_cost * width) for a, b, cap, width in runs)

    runs = segments(m, first, count, chain_cost)
    assert [r[0] for r in runs] == [0] + [r[1] for r in runs[:-1]] and runs[-1][1] == num_iter
    for a, b, cap, width in runs:  # every step's known and predicted tokens fit its run
        assert cap >= max(1, known[a:b].max()) and width >= new[a:b].max()
    # brute force over every choice of boundaries
    best = min(work([(a, b, max(1, int(known[b - 1])), int(new[a:b].max()))
                     for a, b in zip((0, *cuts), (*cuts, num_iter))])
               for cuts in itertools.combinations(range(1, num_iter), min(count, num_iter) - 1))
    assert work(runs) == best


def test_sampler_runs_give_the_same_latents():
    cfg, graphdef, params = tiny()
    rng = np.random.default_rng(3)
    noise = (rng.normal(size=(2, 16, 3)).astype(np.float32),
             rng.normal(size=(2, 16, 4, 3)).astype(np.float32))
    ranks = jnp.asarray(np.stack([rng.permutation(16) for _ in range(2)]))
    outs = [jax.jit(lambda p, n=n: sample_latents(
        graphdef, p, jax.random.key(0), jnp.array([0, 2]),
        MARSampleConfig(num_iter=7, cfg=2.0, diffusion_steps=4, segments=n), noise, ranks)[0]
    )(params) for n in (1, 3)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-6 * np.abs(outs[0]).max())


def reference_sample(model, labels, cfg, ranks, init, inter):
    """sample_tokens transcribed with dynamic shapes (eager): masks by order, xor of the
    masks, the nonzero positions' chains with the given noise (CSpD's per-position noise)."""
    mcfg = model.cfg
    b, length, guided = labels.shape[0], mcfg.seq_len, cfg.cfg != 1
    order = np.argsort(np.asarray(ranks), axis=-1)
    tokens = np.zeros((b, length, mcfg.token_dim), np.float32)
    mask = np.ones((b, length), bool)
    cond = model.conditioning(labels)
    if guided:
        cond = jnp.concatenate([cond, model.conditioning(labels, jnp.ones_like(labels, bool))])
    process = diffusion("cosine", cfg.diffusion_steps)
    trunk = jax.jit(lambda x, known: model(x, known, cond))
    for step in range(cfg.num_iter):
        double = lambda a: np.concatenate([a, a]) if guided else a
        z = np.asarray(trunk(jnp.asarray(double(tokens)), jnp.asarray(double(~mask))))
        mask_len = np.floor(length * np.cos(math.pi / 2.0 * (step + 1) / cfg.num_iter))
        mask_len = int(max(1, min(mask[0].sum() - 1, mask_len)))
        mask_next = np.zeros_like(mask)
        for r in range(b):
            mask_next[r, order[r, :mask_len]] = True
        to_pred = mask if step == cfg.num_iter - 1 else mask ^ mask_next
        mask = mask_next
        rows, pos = np.nonzero(to_pred)
        w = (1 + (cfg.cfg - 1) * (length - mask_len) / length if cfg.cfg_schedule == "linear"
             else cfg.cfg)
        zc = z[rows, pos]
        if guided:
            zc = np.concatenate([zc, z[rows + b, pos]])
        x = jnp.asarray(init[rows, pos])
        for j, i in enumerate(range(process.steps - 1, -1, -1)):
            t = jnp.full((len(rows) * (2 if guided else 1),), process.timesteps[i])
            out = model.diffloss(jnp.asarray(double(np.asarray(x))), t, jnp.asarray(zc))
            if guided:
                (ec, vc), (eu, _) = (jnp.split(h, 2, -1) for h in jnp.split(out, 2))
                out = jnp.concatenate([eu + w * (ec - eu), vc], -1)
            mean, log_var = process.mean_log_var(out, x, jnp.full((len(rows),), i))
            x = mean + (i != 0) * jnp.exp(0.5 * log_var) * inter[rows, pos, j] * cfg.temperature
        tokens[rows, pos] = np.asarray(x)
    return tokens.reshape(b, mcfg.side, mcfg.side, -1)


@pytest.mark.parametrize("num_iter,cfg_w,schedule", [
    (4, 2.5, "linear"), pytest.param(3, 3.0, "constant", marks=pytest.mark.slow)])
@pytest.mark.slow  # over ~30 s on 2 cores: make test-all
def test_sampler_equals_the_official_loop(num_iter, cfg_w, schedule):
    cfg, graphdef, params = tiny()
    model = bind(graphdef, params)
    sample_cfg = MARSampleConfig(num_iter=num_iter, cfg=cfg_w, cfg_schedule=schedule,
                                 temperature=0.9, diffusion_steps=5)
    labels = jnp.array([0, 2])
    rng = np.random.default_rng(num_iter)
    ranks = jnp.asarray(np.stack([rng.permutation(16) for _ in range(2)]))
    init = rng.normal(size=(2, 16, 3)).astype(np.float32)
    inter = rng.normal(size=(2, 16, 5, 3)).astype(np.float32)
    out, stats = jax.jit(lambda p: sample_latents(
        graphdef, p, jax.random.key(0), labels, sample_cfg, (init, inter), ranks))(params)
    expected = reference_sample(model, labels, sample_cfg, ranks, init, inter)
    # random heads put |values| near 1e5 (x0 = x_t / sqrt(alpha_bar) early in the chain):
    # float32 rounding is amplified alike on both sides
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())
    assert stats["target_passes"] == num_iter and stats["nfe"] == num_iter * 5
    np.testing.assert_allclose(stats["latent_rms"], np.sqrt(np.mean(np.square(expected))),
                               rtol=1e-3)


@pytest.mark.slow
def test_sampler_draws_from_the_key():
    cfg, graphdef, params = tiny()
    sample_cfg = MARSampleConfig(num_iter=4, cfg=2.0, diffusion_steps=3)
    run = jax.jit(lambda p, k: sample_latents(graphdef, p, k, jnp.array([0, 1]), sample_cfg)[0])
    a, b = run(params, jax.random.key(0)), run(params, jax.random.key(1))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, run(params, jax.random.key(0)))


def test_loss_only_counts_masked_tokens_and_trains():
    cfg, graphdef, params = tiny()  # label_drop 0.1, the default
    latents = jax.random.normal(jax.random.key(0), (4, 4, 4, 3))
    (loss, aux), grads = jax.jit(jax.value_and_grad(
        lambda p: bind(graphdef, p).loss(jnp.array([0, 1, 2, 0]), latents, jax.random.key(1)),
        has_aux=True))(params)
    assert np.isfinite(loss) and 0.7 <= aux["mask_ratio"] <= 1.0
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.abs(grads["diffloss"]["input_proj"]["kernel"]).sum() > 0


def test_converter_round_trip_and_training_checkpoint(tmp_path):
    cfg, graphdef, params = tiny()
    state = mar_to_torch(params)
    back = mar_params_from_torch(state, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
    assert param_count(back) == param_count(params)
    with pytest.raises(CheckpointMismatch, match="shape mismatch at 'z_proj.weight'"):
        mar_params_from_torch(state, MARConfig(**{**cfg.__dict__, "token_dim": 4}))
    torch = pytest.importorskip("torch")
    ema = {k: torch.from_numpy(v + 1.0) for k, v in state.items()}
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in state.items()}, "model_ema": ema,
                "optimizer": {}, "epoch": 3, "args": argparse.Namespace(model="mar_base")},
               path)
    loaded = load_mar(str(path), cfg)  # the EMA weights, as the official evaluation
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b) + 1.0, rtol=1e-6),
                 loaded, params)
