"""MAR: KL-VAE + masked autoregression over continuous tokens with a diffusion head.

Run:   python -m experiments.mar_imagenet --config digits --workdir runs/mar_digits
       python -m experiments.mar_imagenet --config imagenet256_B --workdir /ckpt/mar_b \
           --set data.data_dir=/data/tfds --set data.manual_dir=/data/imagenet
Sample the official weights:  --config imagenet256_B --set tokenizer_ckpt=/w/kl16.ckpt \
           --set mar_ckpt=/w/mar_base/checkpoint-last.pth
Fewer generation steps (the official speed knob):  --set sample.num_iter=64
Continuous speculative decoding with a small draft MAR (trained here, or `draft_ckpt`):
       --set speculative.enabled=true [--set speculative.rule=official]

Stages: (1) the KL-VAE (trained unless `tokenizer_ckpt` is given) and its cached posterior
moments (`arjax.experiment.latents`: a fresh posterior sample in every step), (2) MAR trained
with the diffusion loss on masked tokens (EMA 0.9999 on ImageNet, as the official recipe),
(3) with `speculative.enabled`, the draft MAR (`draft_model`) trained the same way and sampling
by CSpD, (4) a PNG grid with one row per class and, on digits, the digits scores (class accuracy,
FID-digits); FID-protocol samples with `fid_samples_per_class` (ImageNet presets: 50). Every
stage resumes from its last checkpoint. model.token_dim comes from tokenizer.embed_dim.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.convert.mar import load_mar
from arjax.data.imagenet import steps_for_epochs
from arjax.experiment.base import DIGITS_DATA, imagenet_setup
from arjax.experiment.cli import cli, run_experiment
from arjax.experiment.latents import (
    DIGITS_KL,
    KLExperimentConfig,
    build_generator,
    plan_generator,
    posterior_loss,
)
from arjax.experiment.outputs import digits_scorer
from arjax.experiment.pipeline import (
    StageConfig,
    check_sampling,
    check_stages,
    stage_weights,
)
from arjax.models import param_count
from arjax.models.mar import MAR, MARConfig, mar_config
from arjax.optim import OptimConfig
from arjax.sampling import mar as mar_sampling
from arjax.sampling import mar_speculative
from arjax.sampling.generator import make_generator
from arjax.sampling.mar import MARSampleConfig
from arjax.sampling.mar_speculative import CSpDConfig


@dataclasses.dataclass(frozen=True)
class Config(KLExperimentConfig):
    DERIVED = {**KLExperimentConfig.DERIVED, "draft_model.token_dim": "tokenizer.embed_dim"}

    model: MARConfig = mar_config("B")
    mar_train: StageConfig = StageConfig()
    mar_ckpt: str | None = None  # official checkpoint-last.pth (its model_ema): no training
    sample: MARSampleConfig = MARSampleConfig()
    # CSpD: the draft MAR (the paper: MAR-B drafting for MAR-L/H)
    speculative: CSpDConfig = CSpDConfig()
    draft_model: MARConfig = mar_config("B")
    draft_train: StageConfig = StageConfig()
    draft_ckpt: str | None = None


DIGITS = Config(
    data=DIGITS_DATA,
    **DIGITS_KL,
    # DDPM's linear noise schedule, not MAR's cosine: the cosine process ends at alpha_bar
    # 2e-9, where the first sampling step multiplies the head's eps error by ~2e4, and a
    # 600-step head's error blows the chains up (latent RMS ~1.5e3, FID-digits 253); linear
    # ends at 4e-5 (docs/benchmarks.md, "The digits MAR's noise schedule").
    model=MARConfig(width=128, depth=2, heads=4, head_width=128, head_depth=3, side=8,
                    buffer_size=8, num_classes=10, dropout=0.0, noise_schedule="linear"),
    mar_train=StageConfig(steps=600, batch_size=64, log_every=100, ckpt_every=300,
                          eval_every=300, optim=OptimConfig(
                              lr=1e-3, warmup_steps=60, schedule="cosine", total_steps=600,
                              weight_decay=0.02, grad_clip=3.0, no_decay=("diffloss",))),
    sample=MARSampleConfig(num_iter=16, cfg=2.0, diffusion_steps=50),
    eval_samples_per_class=40,
    speculative=CSpDConfig(num_draft=4, ratio=0.15),
    draft_model=MARConfig(width=64, depth=1, heads=2, head_width=64, head_depth=2, side=8,
                          buffer_size=8, num_classes=10, dropout=0.0, noise_schedule="linear"),
    draft_train=StageConfig(steps=600, batch_size=64, log_every=100, ckpt_every=300,
                            optim=OptimConfig(
                                lr=1e-3, warmup_steps=60, schedule="cosine", total_steps=600,
                                weight_decay=0.02, grad_clip=3.0, no_decay=("diffloss",))),
)


def imagenet(size: str) -> Config:
    """Official recipe (global batch 2048, lr = blr 1e-4 * 2048 / 256 = 8e-4, AdamW(0.9, 0.95),
    wd 0.02 except biases, norms and the diffusion MLP, grad clip 3, 100 warm-up epochs then
    constant, 400 epochs, EMA 0.9999 from a copy of the weights, sampled with the EMA) and FID
    protocol (256 steps, 100 diffusion steps, linear CFG B 2.9 / L 3.0 / H 3.2, tau 1.0, 50
    images per class). Data: ADM centre crop + flip, as the two stored views per image."""
    batch = 2048
    train = StageConfig(  # MAR's recipe, for the model and the draft alike
        steps=steps_for_epochs(400, batch), batch_size=batch, log_every=100, ckpt_every=5000,
        ema_decay=0.9999, optim=OptimConfig(
            lr=8e-4, b2=0.95, weight_decay=0.02, grad_clip=3.0,
            warmup_steps=steps_for_epochs(100, batch), no_decay=("diffloss",)))
    return Config(
        **imagenet_setup("center_flip"),
        tokenizer_train=StageConfig(steps=100_000, batch_size=256, ckpt_every=5000),
        model=mar_config(size),
        mar_train=train,
        sample=MARSampleConfig(num_iter=256, cfg={"B": 2.9, "L": 3.0, "H": 3.2}[size],
                               diffusion_steps=100),
        fid_samples_per_class=50,
        # CSpD's demo: MAR-B drafts, 4 steps a window, the target alone for the first 5 %
        speculative=CSpDConfig(num_draft=4, ratio=0.05),
        draft_train=train,
    )


PRESETS = {"digits": DIGITS, **{f"imagenet256_{s}": imagenet(s) for s in "BLH"}}


def validate(cfg: Config, mesh) -> None:
    """Every check that can fail, on the host, before anything is compiled."""
    cfg.model.validate()
    cfg.tokenizer.validate()
    cfg.sample.validate(cfg.model.seq_len)
    latent = cfg.data.image_size // cfg.tokenizer.downsample
    cfglib.check(cfg.model.side == latent,
                 f"model.side must be the latent side: {cfg.data.image_size}px / "
                 f"{cfg.tokenizer.downsample} = {latent}, got model.side={cfg.model.side}")
    check_stages(cfg, mesh, "tokenizer", "mar")
    if cfg.speculative.enabled:
        cfg.speculative.validate()
        cfg.draft_model.validate()
        cfglib.check(cfg.draft_model.side == cfg.model.side
                     and cfg.draft_model.num_classes == cfg.model.num_classes,
                     "draft_model must have the model's side and num_classes (one canvas)")
        check_stages(cfg, mesh, "draft")
    check_sampling(cfg, cfg.model.num_classes, mesh)


def make_sampler(graphdef, vae_graphdef, vae_params, mesh, sample_cfg: MARSampleConfig,
                 latent_scale: float):
    """params -> Generated: the masked steps, the diffusion chains and the VAE decoder in one
    jit."""
    return make_generator(lambda p, vp, key, labels: mar_sampling.sample(
        graphdef, p, vae_graphdef, vp, key, labels, sample_cfg, latent_scale), mesh, vae_params)


def plan_stage(cfg: Config):
    """The MAR stage for `arjax.plan`."""
    return plan_generator(cfg, "mar", lambda: MAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)))


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    """Trains (or resumes, or loads) every stage; returns what `report` needs."""
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)

    def sampler(graphdef, vae_graphdef, vae_params, latent_scale):
        return make_sampler(graphdef, vae_graphdef, vae_params, mesh, cfg.sample, latent_scale)
    out = build_generator(cfg, "mar", lambda: MAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)),
                          load_mar, sampler, mesh, workdir, progress)
    if not cfg.speculative.enabled:
        return out
    draft_fn = lambda: MAR(cfg.draft_model, rngs=nnx.Rngs(cfg.seed + 2))
    draft = stage_weights(cfg, "draft", draft_fn, posterior_loss(out["latent_scale"]),
                          lambda: out["moments"], mesh, workdir, progress,
                          lambda path: load_mar(path, cfg.draft_model), out["summary"])
    out["summary"]["draft/params"] = param_count(draft[1])
    out["draft"] = draft
    out["generate"] = make_generator(
        lambda p, f, key, labels: mar_speculative.sample(
            (out["graphdef"], p), (draft[0], f["draft"]), out["vae"][0], f["vae"], key, labels,
            cfg.sample, cfg.speculative, out["latent_scale"]),
        mesh, {"vae": out["vae"][1], "draft": draft[1]})
    if out["score"] is not None:
        out["score"] = digits_scorer(out["generate"], cfg.model.num_classes,
                                     cfg.eval_samples_per_class, cfg.seed,
                                     out["train_source"].images)
    return out


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    """The whole pipeline: `build`, then a report in `<workdir>/samples/<tag>/`."""
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "mar")


if __name__ == "__main__":
    main(sys.argv[1:])
