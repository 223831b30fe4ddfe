"""FlowAR: KL-VAE + scale-wise AR transformer with a flow-matching head, trained and sampled.

Run:   python -m experiments.flowar_imagenet --config digits --workdir runs/flowar_digits
       python -m experiments.flowar_imagenet --config imagenet256_S --workdir /ckpt/flowar_s \
           --set data.data_dir=/data/tfds --set data.manual_dir=/data/imagenet
Sample the official weights:  --config imagenet256_S --set flowar_ckpt=/w/FlowAR-S.pth \
           --set tokenizer_ckpt=/w/kl16.ckpt
DiSA (fewer flow steps at later scales):  --set sample.disa_min_steps=15
Test-time search over scales (TTS-VAR's search on FlowAR):  --set search.enabled=true
(ImageNet needs `--set search.reward=package.module:function`)

Stages: (1) train the KL-VAE (MAR's recipe was not released: L2 + a small KL term) unless
`tokenizer_ckpt` is given, (2) encode every image once to its posterior moments (cached in the
work dir; a fresh posterior sample is drawn in every training step, as the official code
does), (3) train FlowAR (flow-matching loss over all scales), (4) sample a PNG grid with one
row per class and, on digits, score samples with the digits evaluator (class accuracy,
FID-digits). Every stage resumes from its last checkpoint; a finished work dir only samples
again, into a new samples/<tag>/. model.token_dim comes from tokenizer.embed_dim.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.convert.flowar import load_flowar, load_kl
from arjax.data import open_source
from arjax.data.imagenet import steps_for_epochs
from arjax.experiment.base import DIGITS_DATA, ExperimentConfig, imagenet_setup
from arjax.experiment.cli import cli, run_experiment
from arjax.experiment.outputs import digits_scorer
from arjax.experiment.pipeline import (
    PlannedStage,
    StageConfig,
    cached_codes,
    check_sampling,
    check_stages,
    fingerprint,
    stage_weights,
)
from arjax.images import to_float
from arjax.models import bind, param_count, split
from arjax.models.flowar import FlowAR, FlowARConfig, flowar_config
from arjax.optim import OptimConfig
from arjax.sampling import flowar as flowar_sampling
from arjax.sampling import search
from arjax.sampling.flowar import FlowSampleConfig
from arjax.sampling.generator import make_generator
from arjax.sampling.search import SearchConfig
from arjax.tokenizers.kl import KL_16, KLVAE, KLConfig, sample_posterior


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    DERIVED = {"model.token_dim": "tokenizer.embed_dim"}

    tokenizer: KLConfig = KL_16
    tokenizer_train: StageConfig = StageConfig()
    tokenizer_ckpt: str | None = None  # official kl16.ckpt: skips training it
    model: FlowARConfig = flowar_config("S")
    flowar_train: StageConfig = StageConfig()
    flowar_ckpt: str | None = None  # official FlowAR-{S,L,H}.pth: skips FlowAR training
    sample: FlowSampleConfig = FlowSampleConfig()
    # test-time search over the 5 scales; ImageNet needs a reward function
    search: SearchConfig = SearchConfig(batch_schedule=(8, 6, 4, 2, 1), cluster_scales=(1,),
                                        resample_scales=(2, 3), features="inception_features")


DIGITS = Config(
    data=DIGITS_DATA,
    tokenizer=KLConfig(embed_dim=4, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                       norm_groups=8, scale=0.0, kl_weight=1e-4),
    tokenizer_train=StageConfig(steps=300, batch_size=64, log_every=50, ckpt_every=150,
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0)),
    model=FlowARConfig(width=128, depth=2, heads=4, head_width=128, head_depth=2,
                       scales=(1, 2, 4, 8), num_classes=10, dropout=0.0),
    flowar_train=StageConfig(steps=600, batch_size=64, log_every=100, ckpt_every=300,
                             eval_every=300, optim=OptimConfig(
                                 lr=1e-3, warmup_steps=60, schedule="cosine",
                                 total_steps=600, weight_decay=0.02, grad_clip=3.0)),
    sample=FlowSampleConfig(num_steps=25, cfg=2.0, guidance=0.9),
    eval_samples_per_class=40,
    search=SearchConfig(batch_schedule=(4, 3, 2, 1), cluster_scales=(1,), resample_scales=(2,),
                        reward="digits_reward", features="digits_features"),
)


def imagenet(size: str) -> Config:
    """Official recipe (global batch 2048, lr = 5e-5 * 2048 / 256 = 4e-4, AdamW(0.9, 0.95),
    wd 0.02, grad clip 3, 100 warmup epochs + cosine, 400 epochs, EMA 0.9999 from a copy of
    the weights, no warm-up, sampled with the EMA) and sampling protocol
    (S: 25 steps cfg 4.3; L: 25 steps cfg 2.4; H: 50 steps cfg 2.4 guidance 0.7). Data:
    resize 288 (bilinear) + random 256 crop + flip, as 10 stored (crop, flip) pairs per image
    (`flowar_crops`; the official code encodes online)."""
    batch = 2048
    sample = {"S": FlowSampleConfig(num_steps=25, cfg=4.3, guidance=0.9),
              "L": FlowSampleConfig(num_steps=25, cfg=2.4, guidance=0.9),
              "H": FlowSampleConfig(num_steps=50, cfg=2.4, guidance=0.7)}[size]
    return Config(
        **imagenet_setup("flowar_crops"),
        tokenizer_train=StageConfig(steps=100_000, batch_size=256, ckpt_every=5000),
        model=flowar_config(size),
        flowar_train=StageConfig(
            steps=steps_for_epochs(400, batch), batch_size=batch, log_every=100,
            ckpt_every=5000, ema_decay=0.9999,
            optim=OptimConfig(lr=4e-4, b2=0.95, weight_decay=0.02, grad_clip=3.0,
                              warmup_steps=steps_for_epochs(100, batch), schedule="cosine",
                              total_steps=steps_for_epochs(400, batch))),
        sample=sample,
    )


PRESETS = {"digits": DIGITS, **{f"imagenet256_{s}": imagenet(s) for s in "SLH"}}


def validate(cfg: Config, mesh) -> None:
    """Every check that can fail, on the host, before anything is compiled."""
    cfg.model.validate()
    cfg.tokenizer.validate()
    cfg.sample.validate()
    latent = cfg.data.image_size // cfg.tokenizer.downsample
    cfglib.check(cfg.model.side == latent,
                 f"the last scale must be the latent side: {cfg.data.image_size}px / "
                 f"{cfg.tokenizer.downsample} = {latent}, got model.scales[-1]="
                 f"{cfg.model.side}")
    check_stages(cfg, mesh, "tokenizer", "flowar")
    if cfg.search.enabled:
        cfg.search.validate(len(cfg.model.scales))
    check_sampling(cfg, cfg.model.num_classes, mesh)


def tokenizer_loss(kl_weight: float):
    def loss(model: KLVAE, batch, key):
        images = to_float(batch["image"])
        recon, aux = model(images, key)
        mse = jnp.mean((recon - images) ** 2)
        return mse + kl_weight * aux["kl"], {"mse": mse, "kl": aux["kl"]}
    return loss


def make_flowar_loss(latent_scale: float):
    """A fresh posterior sample of every image in every step, times the latent scale."""
    def loss(model: FlowAR, batch, key):
        k_post, k_model = jax.random.split(key)
        latents = sample_posterior(batch["codes"], k_post) * latent_scale
        return model.loss(batch["label"], latents, k_model)
    return loss


def estimate_scale(moments: np.ndarray) -> float:
    """1 / std of the posterior means (LDM's scale_factor rule), for tokenizers trained here
    (from the first 10,000 rows of the cache: all of digits)."""
    return float(1.0 / np.std(np.split(moments, 2, axis=-1)[0]))


def make_sampler(graphdef, vae_graphdef, vae_params, mesh, sample_cfg: FlowSampleConfig,
                 latent_scale: float, search_cfg: SearchConfig | None = None):
    """params -> Generated: trunk, flow ODEs and VAE decoder in one jit; with an enabled
    `search_cfg`, the test-time search over scales (a compiled step per scale and count)."""
    if search_cfg is not None and search_cfg.enabled:
        return search.make_generator(lambda p: flowar_sampling.Candidates(
            graphdef, p, vae_graphdef, vae_params, sample_cfg, latent_scale), search_cfg, mesh)
    return make_generator(lambda p, vp, key, labels: flowar_sampling.sample(
        graphdef, p, vae_graphdef, vp, key, labels, sample_cfg, latent_scale), mesh, vae_params)


def plan_stage(cfg: Config) -> PlannedStage:
    """The FlowAR stage for `arjax.plan`: batches of cached posterior moments and labels."""
    side, moments = cfg.model.side, 2 * cfg.tokenizer.embed_dim
    return PlannedStage(
        "flowar", lambda: FlowAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)),
        make_flowar_loss(cfg.tokenizer.scale or 1.0), cfg.flowar_train,
        {"codes": jax.ShapeDtypeStruct((side, side, moments), jnp.float32),
         "label": jax.ShapeDtypeStruct((), jnp.int32)}, cfg.model)


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    """Trains (or resumes, or loads) every stage; returns what `report` needs."""
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    train_source = open_source(cfg.data, "train")
    summary: dict = {}

    vae_graphdef, vae_params = stage_weights(
        cfg, "tokenizer", lambda: KLVAE(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed)),
        tokenizer_loss(cfg.tokenizer.kl_weight), lambda: train_source, mesh, workdir, progress,
        lambda path: load_kl(path, cfg.tokenizer), summary)

    latent_scale = cfg.tokenizer.scale
    moments = None
    if not cfg.flowar_ckpt or not latent_scale:
        encode = jax.jit(lambda p, x: bind(vae_graphdef, p).moments(to_float(x)))
        producer = fingerprint(vae_params, tokenizer=cfg.tokenizer, data=cfg.data.content(),
                               split="train")
        moments = cached_codes(lambda images: encode(vae_params, images), train_source,
                               workdir, "train", producer, cfg.encode_batch, mesh,
                               progress=progress)
        latent_scale = latent_scale or estimate_scale(
            moments[np.arange(min(moments.num_examples, 10_000))]["codes"])
    summary["tokenizer/latent_scale"] = latent_scale

    model_fn = lambda: FlowAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1))
    graphdef = split(nnx.eval_shape(model_fn))[0]
    generate = make_sampler(graphdef, vae_graphdef, vae_params, mesh, cfg.sample, latent_scale,
                            cfg.search)
    score = None
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        score = digits_scorer(generate, cfg.model.num_classes, cfg.eval_samples_per_class,
                              cfg.seed, train_source.images)

    _, params = stage_weights(cfg, "flowar", model_fn, make_flowar_loss(latent_scale),
                              lambda: moments, mesh, workdir, progress,
                              lambda path: load_flowar(path, cfg.model), summary, score)
    summary["flowar/params"] = param_count(params)
    return dict(generate=generate, params=params, summary=summary, score=score,
                step=cfg.flowar_train.steps)


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    """The whole pipeline: `build`, then a report in `<workdir>/samples/<tag>/`."""
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "flowar")


if __name__ == "__main__":
    main(sys.argv[1:])
