"""Distilled Decoding 2 (conditional score distillation, arXiv 2510.21003) for VAR teachers.

The teacher is read as a conditional score model in code space: given the prefix q_<i, its
processed distribution p(. | q_<i) (guidance, temperature, top-k / top-p: what its sampler
draws from) makes the noised token x = (1 - t) q_i + t xi a Gaussian mixture whose velocity
is closed form (`arjax.distill.flow`). DD2 trains a one-step generator whose every
conditional matches the teacher's (the paper's Proposition 1 makes the joints equal):

    generator  q_i = eps_i - v_G(eps_i, t = 1 | eps_<i)           one parallel pass
    guidance   v_psi(x, t | q_<i) fit to xi - q_i on generated q   (FCS, the paper's Eq. 5)
    generator  w <x0_real - x0_fake, x0_fake - q>, x0 = x - t v    (CSD with SiD's distance,
               alpha = 1; x0_real from the teacher's closed form, x0_fake from psi, frozen)
    init       both from one AR-diffusion model fit to the teacher's exact velocity on
               teacher samples (GTS, Eq. 6; without it the paper's VAR-d24 collapses)

Both networks are `ScoreVAR`: VAR's trunk, teacher-forced on the inputs built from earlier
scales (generated tokens for psi, noise for G: the arrangement the paper leaves open, and
the natural one), and MAR's diffusion MLP in place of the logits head. The paper's code is
not released; reconstructed here (see docs): the time law U(t_min, t_max), velocity-space
squared error for FCS and GTS, SiD's weight w = 1 / mean|q - x0_real| per sample.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from arjax.distill.flow import denoise, velocity
from arjax.models import bind
from arjax.models.mar import DiffusionMLP, MARConfig
from arjax.models.var import VAR, VARConfig, build_trunk
from arjax.nn.scales import scale_bounds
from arjax.sampling.var import VARSampleConfig
from arjax.train import TrainState, ema_decay_at, ema_update

sg = jax.lax.stop_gradient


class ScoreVAR(VAR):
    """VAR's trunk with a velocity head: position i's feature sees the class and the inputs
    of the scales before its own; MAR's diffusion MLP maps (x, t, feature) to a velocity."""

    def __init__(self, cfg: VARConfig, head_width: int = 256, head_depth: int = 3, *,
                 rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        build_trunk(self, cfg, cfg.seq_len, len(cfg.patch_nums), rngs, logits=False)
        self.mlp = DiffusionMLP(MARConfig(
            width=cfg.dim, head_width=head_width, head_depth=head_depth,
            token_dim=cfg.codebook_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            remat=cfg.remat), rngs=rngs)

    def velocity(self, features: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
        """features [B, L, D], noised tokens x [B, L, m, C] at times t [B, L, m, 1] -> the
        predicted velocity [B, L, m, C] (the MLP's first C outputs; t in (0, 1])."""
        b, length, m, c = x.shape
        cond = self.mlp.condition(features)
        cond = jnp.broadcast_to(cond[:, :, None], (b, length, m, cond.shape[-1]))
        out = self.mlp.denoise(x.reshape(-1, c), 1000 * t.reshape(-1),
                               cond.reshape(b * length * m, -1))
        return out[:, :c].reshape(x.shape)


def score_from_teacher(model: dict, teacher: dict) -> dict:
    """The teacher's trunk in a `ScoreVAR`'s weights (all but the logits head)."""
    return {**model, **{name: value for name, value in teacher.items() if name in model}}


def one_step(model: ScoreVAR, quantizer, labels: jax.Array, noise: jax.Array) -> jax.Array:
    """DD2's generator: noise [B, L, C] -> token vectors [B, L, C] in one pass (one Euler
    step of the velocity from t = 1, the trunk reading the noise of earlier scales)."""
    inputs = quantizer.vector_inputs(noise, model.cfg.patch_nums[-1])
    v = model.velocity(model.features(labels, inputs), noise[:, :, None],
                       jnp.ones(noise.shape[:2] + (1, 1)))
    return noise - v[:, :, 0]


def teacher_logits(teacher: VAR, quantizer, labels: jax.Array, vectors: jax.Array,
                   sample: VARSampleConfig) -> jax.Array:
    """The teacher's processed logits [B, L, V] at every position given the sequence
    `vectors` [B, L, C] (one teacher-forced pass, doubled for guidance): position i's are
    what `var.sample` draws token i from after that prefix."""
    cfg, batch = teacher.cfg, labels.shape[0]
    inputs = quantizer.vector_inputs(vectors, cfg.patch_nums[-1])
    if sample.cfg != 1:
        labels = jnp.concatenate([labels, jnp.full_like(labels, cfg.num_classes)])
        inputs = jnp.concatenate([inputs, inputs])
    logits = teacher(labels, inputs).astype(jnp.float32)
    bounds = scale_bounds(cfg.patch_nums)
    return jnp.concatenate([sample.processed(logits[:, a:b], k, len(bounds), batch)
                            for k, (a, b) in enumerate(bounds)], axis=1)


def noised(key: jax.Array, q: jax.Array, copies: int, t_range: tuple[float, float]):
    """`copies` noised versions of every token q [B, L, C]: (x [B, L, m, C], t [B, L, m, 1]
    ~ U(t_range), xi [B, L, m, C]), x = (1 - t) q + t xi."""
    k_t, k_xi = jax.random.split(key)
    t = jax.random.uniform(k_t, q.shape[:2] + (copies, 1), minval=t_range[0],
                           maxval=t_range[1])
    xi = jax.random.normal(k_xi, q.shape[:2] + (copies, q.shape[-1]))
    return (1 - t) * q[:, :, None] + t * xi, t, xi


class Teacher(NamedTuple):
    """The static half of a DD2 teacher; its weights travel as the step's `frozen` argument
    {"teacher": VAR params, "tokenizer": VQ-VAE params}."""
    graphdef: Any
    vae_graphdef: Any
    sample: VARSampleConfig

    def bind(self, frozen: dict):
        """(teacher VAR, quantizer, codebook [V, C])."""
        quantizer = bind(self.vae_graphdef, frozen["tokenizer"]).quantize
        return (bind(self.graphdef, frozen["teacher"]), quantizer,
                quantizer.embedding.embedding[...])


def _mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sum((pred - target) ** 2, axis=-1))


def gts_loss(model: ScoreVAR, batch: dict, key: jax.Array, frozen: dict, *, teacher: Teacher,
             copies: int, t_range: tuple[float, float], head_only: bool = False):
    """Stage 1 (GTS) on teacher samples {"codes" [B, L], "label" [B]}: the model's velocity
    against the teacher's exact conditional velocity; `head_only` keeps the trunk fixed."""
    net, quantizer, codebook = teacher.bind(frozen)
    q, labels = codebook[batch["codes"]], batch["label"]
    logits = sg(teacher_logits(net, quantizer, labels, q, teacher.sample))
    features = model.features(labels, quantizer.vector_inputs(q, model.cfg.patch_nums[-1]))
    if head_only:
        features = sg(features)
    x, t, _ = noised(key, q, copies, t_range)
    loss = _mse(model.velocity(features, x, t),
                velocity(x, t, logits[:, :, None], codebook))
    return loss, {"gts_mse": loss}


def fcs_loss(guide: ScoreVAR, quantizer, labels: jax.Array, q: jax.Array, key: jax.Array,
             copies: int, t_range: tuple[float, float]) -> jax.Array:
    """The guidance network's denoising loss on generated tokens q (no gradient to q):
    its velocity against xi - q, the conditional score of the generator's law."""
    q = sg(q)
    features = guide.features(labels, quantizer.vector_inputs(q, guide.cfg.patch_nums[-1]))
    x, t, xi = noised(key, q, copies, t_range)
    return _mse(guide.velocity(features, x, t), xi - q[:, :, None])


def csd_loss(generator: ScoreVAR, guide: ScoreVAR, net: VAR, quantizer, codebook: jax.Array,
             labels: jax.Array, noise: jax.Array, key: jax.Array,
             t_range: tuple[float, float], sample: VARSampleConfig):
    """The generator's loss: SiD's distance (alpha = 1) between the teacher's and the
    guidance network's denoisers at x = (1 - t) q + t xi, every position conditioned on the
    stop-gradient prefix. Differentiate w.r.t. the generator only (psi stays fixed); the
    gradient reaches q directly and through x."""
    q = one_step(generator, quantizer, labels, noise)
    prefix = sg(q)
    logits = sg(teacher_logits(net, quantizer, labels, prefix, sample))
    features = sg(guide.features(labels, quantizer.vector_inputs(
        prefix, guide.cfg.patch_nums[-1])))
    x, t, _ = noised(key, q, 1, t_range)
    real = denoise(x, t, logits[:, :, None], codebook)
    fake = x - t * guide.velocity(features, x, t)
    return sid_loss(q[:, :, None], real, fake), {"csd_gap": jnp.mean(jnp.abs(real - fake))}


def sid_loss(q: jax.Array, real: jax.Array, fake: jax.Array) -> jax.Array:
    """SiD's generator loss with alpha = 1 over samples [B, ..., C]: the mean of
    w_b <real - fake, fake - q> with w_b = 1 / mean|q - real| (no gradient), where real /
    fake are the teacher's / the guidance network's denoised x0 at the generator's noised q."""
    axes = tuple(range(1, q.ndim))
    weight = sg(1 / jnp.maximum(jnp.mean(jnp.abs(q - real), axis=axes), 1e-6))
    return jnp.mean(weight * jnp.mean(jnp.sum((real - fake) * (fake - q), -1), axis=axes[:-1]))


def make_csd_step(graphdef, teacher: Teacher, tx_gen, tx_guide, *, guide_updates: int,
                  copies: int, t_range: tuple[float, float], ema_decay: float,
                  ema_warmup: bool = True):
    """Stage 2's `train_step(state, batch, frozen)`: `guide_updates` FCS updates of psi on
    fresh generator samples, then one CSD update of the generator and its EMA.
    state.params = state.opt_state = {"gen", "guide"}; state.ema averages "gen"."""

    def train_step(state: TrainState, batch: dict, frozen: dict):
        net, quantizer, codebook = teacher.bind(frozen)
        key, labels = state.step_key(), batch["label"]
        shape = (labels.shape[0], net.cfg.seq_len, codebook.shape[-1])
        gen = state.params["gen"]
        # the generator is fixed during the guidance updates: their fresh samples in one pass
        k_eps, k_t = jax.random.split(jax.random.fold_in(key, guide_updates + 1))
        many = jnp.tile(labels, guide_updates)
        fresh = one_step(bind(graphdef, gen), quantizer, many,
                         jax.random.normal(k_eps, (guide_updates * shape[0],) + shape[1:]))

        def guide_update(carry, inputs):
            (params, opt), (q, k) = carry, inputs
            loss, grads = jax.value_and_grad(lambda p: fcs_loss(
                bind(graphdef, p), quantizer, labels, q, k, copies, t_range))(params)
            updates, opt = tx_guide.update(grads, opt, params)
            return (optax.apply_updates(params, updates), opt), loss

        (guide, opt_guide), fcs = jax.lax.scan(
            guide_update, (state.params["guide"], state.opt_state["guide"]),
            (fresh.reshape((guide_updates,) + shape), jax.random.split(k_t, guide_updates)))
        k_eps, k_t = jax.random.split(jax.random.fold_in(key, guide_updates))
        noise = jax.random.normal(k_eps, shape)
        (loss, aux), grads = jax.value_and_grad(lambda p: csd_loss(
            bind(graphdef, p), bind(graphdef, guide), net, quantizer, codebook, labels, noise,
            k_t, t_range, teacher.sample), has_aux=True)(gen)
        updates, opt_gen = tx_gen.update(grads, state.opt_state["gen"], gen)
        gen = optax.apply_updates(gen, updates)
        ema = ema_update(state.ema, gen, ema_decay_at(state.step, ema_decay, ema_warmup))
        metrics = {"train/loss": loss, "train/fcs": fcs[-1],
                   "train/l2_grads": optax.global_norm(grads),
                   **{f"train/{k}": v for k, v in aux.items()}}
        return state.replace(step=state.step + 1, params={"gen": gen, "guide": guide},
                             opt_state={"gen": opt_gen, "guide": opt_guide}, ema=ema), metrics

    return train_step
