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

from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.convert.flowar import load_flowar
from arjax.data.imagenet import steps_for_epochs
from arjax.experiment.base import DIGITS_DATA, imagenet_setup
from arjax.experiment.cli import cli, run_experiment
from arjax.experiment.latents import (
    DIGITS_KL,
    KLExperimentConfig,
    build_generator,
    plan_generator,
)
from arjax.experiment.pipeline import (
    StageConfig,
    check_sampling,
    check_stages,
)
from arjax.models.flowar import FlowAR, FlowARConfig, flowar_config
from arjax.optim import OptimConfig
from arjax.sampling import flowar as flowar_sampling
from arjax.sampling import search
from arjax.sampling.flowar import FlowSampleConfig
from arjax.sampling.generator import make_generator
from arjax.sampling.search import SearchConfig


@dataclasses.dataclass(frozen=True)
class Config(KLExperimentConfig):
    model: FlowARConfig = flowar_config("S")
    flowar_train: StageConfig = StageConfig()
    flowar_ckpt: str | None = None  # official FlowAR-{S,L,H}.pth: skips FlowAR training
    sample: FlowSampleConfig = FlowSampleConfig()
    # test-time search over the 5 scales; ImageNet needs a reward function
    search: SearchConfig = SearchConfig(batch_schedule=(8, 6, 4, 2, 1), cluster_scales=(1,),
                                        resample_scales=(2, 3), features="inception_features")


DIGITS = Config(
    data=DIGITS_DATA,
    **DIGITS_KL,
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


def make_sampler(graphdef, vae_graphdef, vae_params, mesh, sample_cfg: FlowSampleConfig,
                 latent_scale: float, search_cfg: SearchConfig | None = None):
    """params -> Generated: trunk, flow ODEs and VAE decoder in one jit; with an enabled
    `search_cfg`, the test-time search over scales (a compiled step per scale and count)."""
    if search_cfg is not None and search_cfg.enabled:
        return search.make_generator(lambda p: flowar_sampling.Candidates(
            graphdef, p, vae_graphdef, vae_params, sample_cfg, latent_scale), search_cfg, mesh)
    return make_generator(lambda p, vp, key, labels: flowar_sampling.sample(
        graphdef, p, vae_graphdef, vp, key, labels, sample_cfg, latent_scale), mesh, vae_params)


def plan_stage(cfg: Config):
    """The FlowAR stage for `arjax.plan`."""
    return plan_generator(cfg, "flowar", lambda: FlowAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)))


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    """Trains (or resumes, or loads) every stage; returns what `report` needs."""
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)

    def sampler(graphdef, vae_graphdef, vae_params, latent_scale):
        return make_sampler(graphdef, vae_graphdef, vae_params, mesh, cfg.sample, latent_scale,
                            cfg.search)
    return build_generator(cfg, "flowar", lambda: FlowAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)),
                           load_flowar, sampler, mesh, workdir, progress)


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    """The whole pipeline: `build`, then a report in `<workdir>/samples/<tag>/`."""
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "flowar")


if __name__ == "__main__":
    main(sys.argv[1:])
