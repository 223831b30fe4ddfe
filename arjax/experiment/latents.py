"""The KL-VAE stage shared by the continuous-token families (FlowAR, MAR): train the tokenizer
(or load `tokenizer_ckpt`), cache every image's posterior moments once, and draw a fresh
posterior sample x latent scale in every generator training step, as the official code does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax.convert.flowar import load_kl
from arjax.data import open_source
from arjax.experiment.base import ExperimentConfig
from arjax.experiment.outputs import digits_scorer
from arjax.experiment.pipeline import (
    PlannedStage,
    StageConfig,
    cached_codes,
    fingerprint,
    stage_weights,
)
from arjax.images import to_float
from arjax.models import bind, param_count, split
from arjax.optim import OptimConfig
from arjax.tokenizers.kl import KL_16, KLVAE, KLConfig, sample_posterior


@dataclasses.dataclass(frozen=True)
class KLExperimentConfig(ExperimentConfig):
    """The tokenizer fields of a continuous-token experiment; `model.token_dim` follows the
    tokenizer's latent channels."""
    DERIVED = {"model.token_dim": "tokenizer.embed_dim"}

    tokenizer: KLConfig = KL_16
    tokenizer_train: StageConfig = StageConfig()
    tokenizer_ckpt: str | None = None  # official kl16.ckpt: skips training it


# digits presets: a 4-channel KL-VAE at stride 4 (32 px -> 8 x 8 latents), trained 300 steps
DIGITS_KL = dict(
    tokenizer=KLConfig(embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                       norm_groups=8, scale=0.0, kl_weight=1e-4),
    tokenizer_train=StageConfig(steps=300, batch_size=64, log_every=50, ckpt_every=150,
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0)))


def tokenizer_loss(kl_weight: float):
    """L2 reconstruction + a small KL term (MAR's KL-16 recipe was not released)."""
    def loss(model: KLVAE, batch, key):
        images = to_float(batch["image"])
        recon, aux = model(images, key)
        mse = jnp.mean((recon - images) ** 2)
        return mse + kl_weight * aux["kl"], {"mse": mse, "kl": aux["kl"]}
    return loss


def posterior_loss(latent_scale: float):
    """model.loss(labels, latents, key) on a fresh posterior sample of each cached image."""
    def loss(model, batch, key):
        k_post, k_model = jax.random.split(key)
        latents = sample_posterior(batch["codes"], k_post) * latent_scale
        return model.loss(batch["label"], latents, k_model)
    return loss


def estimate_scale(moments: np.ndarray) -> float:
    """1 / std of the posterior means (LDM's scale_factor rule), for tokenizers trained here
    (from the first 10,000 rows of the cache: all of digits)."""
    return float(1.0 / np.std(np.split(moments, 2, axis=-1)[0]))


def plan_generator(cfg, name: str, module_fn) -> PlannedStage:
    """The generator stage `name` for `arjax.plan`: batches of cached posterior moments and
    labels, the posterior loss."""
    side = cfg.data.image_size // cfg.tokenizer.downsample
    moments = jax.ShapeDtypeStruct((side, side, 2 * cfg.tokenizer.embed_dim), jnp.float32)
    return PlannedStage(name, module_fn, posterior_loss(cfg.tokenizer.scale or 1.0),
                        getattr(cfg, f"{name}_train"),
                        {"codes": moments, "label": jax.ShapeDtypeStruct((), jnp.int32)},
                        cfg.model)


def kl_latents(cfg, train_source, mesh, workdir, progress: bool, summary: dict,
               need_moments: bool):
    """-> (vae graphdef, vae params, latent scale, the moments cache or None). The moments are
    extracted when the generator trains (`need_moments`) or the latent scale must be
    estimated (a tokenizer trained here has `tokenizer.scale` 0)."""
    vae_graphdef, vae_params = stage_weights(
        cfg, "tokenizer", lambda: KLVAE(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed)),
        tokenizer_loss(cfg.tokenizer.kl_weight), lambda: train_source, mesh, workdir, progress,
        lambda path: load_kl(path, cfg.tokenizer), summary)
    latent_scale, moments = cfg.tokenizer.scale, None
    if need_moments or not latent_scale:
        encode = jax.jit(lambda p, x: bind(vae_graphdef, p).moments(to_float(x)))
        producer = fingerprint(vae_params, tokenizer=cfg.tokenizer, data=cfg.data.content(),
                               split="train")
        moments = cached_codes(lambda images: encode(vae_params, images), train_source,
                               workdir, "train", producer, cfg.encode_batch, mesh,
                               progress=progress)
        latent_scale = latent_scale or estimate_scale(
            moments[np.arange(min(moments.num_examples, 10_000))]["codes"])
    summary["tokenizer/latent_scale"] = latent_scale
    return vae_graphdef, vae_params, latent_scale, moments


def build_generator(cfg, name: str, module_fn, load, make_sampler, mesh, workdir,
                    progress: bool) -> dict:
    """The whole `build` of a continuous-token experiment: the KL stage, then the generator
    stage `name` (`cfg.<name>_train` / `cfg.<name>_ckpt` read by `load(path, cfg.model)`),
    trained with `posterior_loss` and scored on digits with
    `make_sampler(graphdef, vae_graphdef, vae_params, latent_scale) -> generate`."""
    train_source = open_source(cfg.data, "train")
    summary: dict = {}
    vae_graphdef, vae_params, latent_scale, moments = kl_latents(
        cfg, train_source, mesh, workdir, progress, summary,
        need_moments=not getattr(cfg, f"{name}_ckpt"))
    graphdef = split(nnx.eval_shape(module_fn))[0]
    generate = make_sampler(graphdef, vae_graphdef, vae_params, latent_scale)
    score = None
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        score = digits_scorer(generate, cfg.model.num_classes, cfg.eval_samples_per_class,
                              cfg.seed, train_source.images)
    _, params = stage_weights(cfg, name, module_fn, posterior_loss(latent_scale),
                              lambda: moments, mesh, workdir, progress,
                              lambda path: load(path, cfg.model), summary, score)
    summary[f"{name}/params"] = param_count(params)
    return dict(generate=generate, params=params, summary=summary, score=score,
                step=getattr(cfg, f"{name}_train").steps, graphdef=graphdef,
                vae=(vae_graphdef, vae_params), latent_scale=latent_scale, moments=moments,
                train_source=train_source)
