"""DD1 students: what each position may see, the noise/data marker, the teacher's weights in
the student, the few-step samplers' bookkeeping, and a student that fits its pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import random_params
from flax import nnx

from arjax.config import ConfigError
from arjax.distill.objective import dd1_loss
from arjax.distill.sampling import few_step
from arjax.distill.students import (
    DDVAR,
    DDRaster,
    dd_var_mask,
    raster_from_teacher,
    var_from_teacher,
)
from arjax.models import bind, param_count, split
from arjax.models.raster_ar import RasterAR, RasterARConfig
from arjax.models.var import VAR, VARConfig
from arjax.nn.layers import nearest_code
from arjax.nn.scales import scale_levels

GPT = RasterARConfig(vocab_size=5, grid=3, num_classes=3, dim=32, depth=2, heads=2,
                     multiple_of=16, dropout=0.0, label_drop=0.0)
VAR_CFG = VARConfig(depth=2, width=32, heads=2, vocab_size=6, codebook_dim=4,
                    patch_nums=(1, 2, 3), num_classes=3, label_drop=0.0, aln_gamma_init=1.0)
C = 4


def _random(module_fn, seed=0, scale=0.3):
    return split(nnx.eval_shape(module_fn))[0], random_params(module_fn, seed, scale)


def _outputs(model, x, k):
    cont, logits = jax.jit(lambda p, x, k: bind(model[0], p)(x, jnp.array([1, 2]), k))(
        model[1], x, k)
    return np.asarray(cont), np.asarray(logits)


def test_raster_student_sees_earlier_positions_and_itself():
    model = _random(lambda: DDRaster(GPT, C, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 9, C))
    k = jnp.array([0, 4])
    base = _outputs(model, x, k)
    assert base[0].shape == (2, 9, C) and base[1].shape == (2, 9, 5)
    for j in (0, 4, 8):
        moved = _outputs(model, x.at[:, j].add(1.0), k)
        for a, b in zip(moved, base):
            np.testing.assert_allclose(a[:, :j], b[:, :j], atol=1e-5)
            assert not np.allclose(a[:, j], b[:, j], atol=1e-4)  # position j reads x_j
    # the marker: k data tokens; raising k to 5 re-marks token 4 only
    moved = _outputs(model, x, jnp.array([0, 5]))
    for a, b in zip(moved, base):
        np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
        assert not np.allclose(a[1, 4:], b[1, 4:], atol=1e-4)
        np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_raster_student_takes_the_teachers_weights():
    teacher = random_params(lambda: RasterAR(GPT, rngs=nnx.Rngs(1)), 1)
    student = random_params(lambda: DDRaster(GPT, C, rngs=nnx.Rngs(2)), 2)
    merged = raster_from_teacher(student, teacher)
    for name in ("cls_embedding", "layers", "norm", "output"):
        jax.tree.map(np.testing.assert_array_equal, merged[name], teacher[name])
    d, v = GPT.dim, GPT.vocab_size
    # the token table (V x D) goes; the input projection, the marker and the head come
    assert param_count(merged) - param_count(teacher) == (
        -v * d + (C * d + d) + 2 * d + (2 * d + d * C + C))


def test_var_student_mask_sees_earlier_scales_and_itself():
    mask = dd_var_mask(VAR_CFG.patch_nums)
    levels = scale_levels((1, 1, 2, 3))
    for a in range(len(levels)):
        for b in range(len(levels)):
            assert mask[a, b] == (levels[a] > levels[b] or a == b)
    model = _random(lambda: DDVAR(VAR_CFG, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 14, C))
    k = jnp.array([0, 2])
    base = _outputs(model, x, k)
    scale = np.repeat([0, 1, 2], [1, 4, 9])
    for j in (0, 2, 7):  # one token of each scale
        moved = _outputs(model, x.at[:, j].add(1.0), k)
        untouched = (scale <= scale[j]) & (np.arange(14) != j)  # earlier and sibling tokens
        for a, b in zip(moved, base):
            np.testing.assert_allclose(a[:, untouched], b[:, untouched], atol=1e-5)
            assert not np.allclose(a[:, j], b[:, j], atol=1e-4)
            if scale[j] < 2:
                assert not np.allclose(a[:, scale > scale[j]], b[:, scale > scale[j]],
                                       atol=1e-4)
    # k counts data scales: k = 2 marks scales 0 and 1 (tokens 0..4) as data
    assert list(bind(*model).unit_starts) == [1, 2, 6, 15]


def test_var_student_takes_the_teachers_weights():
    teacher = random_params(lambda: VAR(VAR_CFG, rngs=nnx.Rngs(1)), 1)
    student = random_params(lambda: DDVAR(VAR_CFG, rngs=nnx.Rngs(2)), 2)
    merged = var_from_teacher(student, teacher)
    for name in ("word_embed", "class_emb", "pos_start", "blocks", "head_nm", "head"):
        jax.tree.map(np.testing.assert_array_equal, merged[name], teacher[name])
    lvl, lvl_t = merged["lvl_embed"]["embedding"], teacher["lvl_embed"]["embedding"]
    np.testing.assert_array_equal(lvl[0], lvl_t[0])
    np.testing.assert_array_equal(lvl[2:], lvl_t[1:])
    np.testing.assert_array_equal(lvl[1], student["lvl_embed"]["embedding"][1])
    pos, pos_t = merged["pos_1LC"], teacher["pos_1LC"]
    np.testing.assert_array_equal(pos[:, 0], pos_t[:, 0])
    np.testing.assert_array_equal(pos[:, 2:], pos_t[:, 1:])
    c, depth = VAR_CFG.dim, VAR_CFG.depth
    # per-block marker projections dominate: (depth + 1)(C^2 + C), as released
    assert param_count(merged) - param_count(teacher) == (
        (depth + 1) * (c * c + c) + 2 * c + c + c + (2 * c + c * C + C))


def test_few_step_bookkeeping():
    model = _random(lambda: DDRaster(GPT, C, rngs=nnx.Rngs(0)), scale=0.5)
    codebook = jax.random.normal(jax.random.key(2), (5, C))
    labels = jnp.array([1, 2])
    noise = jax.random.normal(jax.random.key(3), (2, 9, C))
    student = bind(*model)
    cont0, logits0 = student(noise, labels, jnp.zeros(2, jnp.int32))
    vec, tok, passes = few_step(*model, labels, noise, codebook, (0,), 0)
    np.testing.assert_allclose(vec, cont0, atol=1e-6)  # split 0: all continuous
    np.testing.assert_array_equal(tok, jnp.argmax(logits0, -1))
    assert int(passes) == 1
    vec, tok, passes = few_step(*model, labels, noise, codebook, (0, 3), 5)
    first = jnp.where((jnp.arange(9) < 5)[None, :, None], codebook[jnp.argmax(logits0, -1)],
                      cont0)
    x1 = jnp.where((jnp.arange(9) < 3)[None, :, None], first, noise)  # the same noise again
    cont1, logits1 = student(x1, labels, jnp.full(2, 3))
    greedy = jnp.where(jnp.arange(9) < 3, nearest_code(x1, codebook), jnp.argmax(logits1, -1))
    np.testing.assert_array_equal(tok, greedy)
    np.testing.assert_allclose(vec[:, :5], codebook[greedy][:, :5], atol=1e-6)
    np.testing.assert_allclose(vec[:, 5:], cont1[:, 5:], atol=1e-6)
    assert int(passes) == 2
    with pytest.raises(ConfigError, match="steps"):
        few_step(*model, labels, noise, codebook, (1,), 0)


@pytest.mark.parametrize("family", ["raster", pytest.param("var", marks=pytest.mark.slow)])
def test_student_fits_its_pairs_in_one_and_two_steps(family):
    """12.3.2 of the spec: a student overfits 32 pairs; 1 and 2 steps both return them."""
    if family == "raster":
        fn, t2, length = (lambda: DDRaster(GPT, C, rngs=nnx.Rngs(0))), 4, 9
    else:
        fn, t2, length = (lambda: DDVAR(VAR_CFG, rngs=nnx.Rngs(0))), 2, 14
    graphdef, params = split(fn())
    rng = np.random.default_rng(0)
    codebook = jnp.asarray(rng.normal(size=(5, C)), jnp.float32)
    batch = {"codes": jnp.asarray(rng.integers(0, 5, (32, length)), jnp.int32),
             "label": jnp.asarray(np.arange(32) % 3, jnp.int32),
             "index": jnp.arange(32, dtype=jnp.int32)}
    noise_key = jax.random.key(9)
    loss_fn = lambda p, key: dd1_loss(bind(graphdef, p), batch, key, codebook,
                                      noise_key=noise_key, timesteps=(0, t2), cont_weight=1.0)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, opt, key):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, aux

    opt = tx.init(params)
    for i in range(400):
        params, opt, aux = step(params, opt, jax.random.key(i))
    assert float(aux["accuracy"]) > 0.99 and float(aux["mse"]) < 0.05, aux
    from arjax.distill.flow import gaussian_noise
    noise = gaussian_noise(noise_key, batch["index"], length, C)
    split_at = len(bind(graphdef, params).unit_starts) - 1  # every unit from the logits head
    for steps in ((0,), (0, t2)):
        _, tokens, _ = few_step(graphdef, params, batch["label"], noise, codebook, steps,
                                split_at)
        assert np.mean(np.asarray(tokens) == np.asarray(batch["codes"])) > 0.99
