"""VAR: multi-scale residual VQ-VAE + next-scale transformer, trained and sampled.

Run:   python -m experiments.var_imagenet --config digits --workdir runs/var_digits
       python -m experiments.var_imagenet --config imagenet256_d16 --workdir /ckpt/var_d16 \
           --set data.data_dir=/data/tfds --set data.manual_dir=/data/imagenet
Sample the official weights:  --config imagenet256_d16 --set var_ckpt=/w/var_d16.pth \
           --set tokenizer_ckpt=/w/vae_ch160v4096z32.pth

Stages: (1) train the multi-scale VQ-VAE (VAR's tokenizer recipe was never released: here L2
reconstruction + the residual quantiser's loss), (2) extract every image's codes over all
scales once (cached in the work dir), (3) train the VAR transformer with teacher forcing over
all scales (its input is rebuilt from the codes by the frozen quantiser inside the step),
(4) sample a PNG grid with one row per class and, on digits, score samples with the digits
evaluator. Every stage resumes from its last checkpoint; a finished work dir only samples
again, into a new samples/<tag>/. Guidance: `sample.cfg` is the weight at the last scale
(official cfg=1.5 is 2.5 here). model.vocab_size, codebook_dim and patch_nums come from the
tokenizer.

CoDe (collaborative decoding): `--set draft_steps=N` with a `refiner` config (or
`--config imagenet256_codeN`) samples scales 0..N-1 with the model and the rest with the
small refiner: loaded from `refiner_ckpt`, or trained after the model as its own stage on
its scales only, distilled from the model's logits (KL at temperature
`refiner_kd_temperature`, mixed with cross-entropy by `refiner_ce_weight`; CoDe released no
training script, this follows the paper). The digits preset has a 2-block refiner:
`--set draft_steps=4`.

TTS-VAR (test-time search): `--set search.enabled=true` samples the report and the scores by
`arjax.sampling.search` (the digits preset searches 4 candidates per image with the digits
classifier's reward; ImageNet needs `--set search.reward=package.module:function`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.convert.var import load_vae, load_var
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
    codes_dtype,
    fingerprint,
    stage_weights,
)
from arjax.images import to_float
from arjax.models import bind, param_count, split
from arjax.models.var import VAR, VARConfig, var_config
from arjax.optim import OptimConfig
from arjax.sampling import search
from arjax.sampling import var as var_sampling
from arjax.sampling.generator import make_generator
from arjax.sampling.search import SearchConfig
from arjax.sampling.var import VARSampleConfig
from arjax.tokenizers.msvq import VAR_VAE, MSVQConfig, MultiScaleVQVAE


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    DERIVED = {"model.vocab_size": "tokenizer.codebook_size",
               "model.codebook_dim": "tokenizer.codebook_dim",
               "model.patch_nums": "tokenizer.patch_nums",
               "refiner.vocab_size": "tokenizer.codebook_size",
               "refiner.codebook_dim": "tokenizer.codebook_dim",
               "refiner.patch_nums": "tokenizer.patch_nums",
               "refiner.num_classes": "model.num_classes"}

    tokenizer: MSVQConfig = VAR_VAE
    tokenizer_train: StageConfig = StageConfig()
    tokenizer_ckpt: str | None = None  # official vae_ch160v4096z32.pth: skips training it
    model: VARConfig = var_config(16)
    var_train: StageConfig = StageConfig()
    var_ckpt: str | None = None  # official var_d{16,20,24,30}.pth: skips VAR training
    sample: VARSampleConfig = VARSampleConfig()
    # CoDe: `model` drafts scales 0..draft_steps-1, the small `refiner` does the rest
    draft_steps: int = 0  # 0 = plain VAR sampling
    refiner: VARConfig | None = None
    refiner_train: StageConfig = StageConfig(steps=0)  # on the refiner's own scales only
    refiner_ckpt: str | None = None  # official var_d16.pth or CoDe's refiner_{6..9}.pth
    refiner_ce_weight: float = 0.0  # a: a CE + (1 - a) T^2 KL(teacher_T || refiner_T)
    refiner_kd_temperature: float = 1.0  # T; the teacher is the trained `model`
    drafter_own_scales: bool = False  # CoDe's drafter fine-tune: CE on scales 0..N-1 only
    # TTS-VAR: samples (report, scores) by test-time search; ImageNet needs a reward function
    search: SearchConfig = SearchConfig(features="inception_features")


DIGITS = Config(
    data=DIGITS_DATA,
    tokenizer=MSVQConfig(codebook_size=64, codebook_dim=8, patch_nums=(1, 2, 3, 4, 6, 8), ch=16,
                         ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    tokenizer_train=StageConfig(steps=400, batch_size=64, log_every=50, ckpt_every=200,
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0)),
    model=VARConfig(depth=4, width=96, heads=4, num_classes=10, aln_gamma_init=0.5),
    var_train=StageConfig(steps=600, batch_size=64, log_every=100, ckpt_every=200,
                          eval_every=300, optim=OptimConfig(lr=1e-3, warmup_steps=50,
                                                            b2=0.95, grad_clip=2.0)),
    sample=VARSampleConfig(cfg=2.5, top_k=0, top_p=1.0),
    eval_samples_per_class=40,
    search=SearchConfig(batch_schedule=(4, 4, 3, 2, 2, 1), cluster_scales=(2,),
                        resample_scales=(3, 4), reward="digits_reward",
                        features="digits_features"),
    refiner=VARConfig(depth=2, width=48, heads=2, aln_gamma_init=0.5),
    refiner_train=StageConfig(steps=400, batch_size=64, log_every=100, ckpt_every=200,
                              optim=OptimConfig(lr=1e-3, warmup_steps=50, b2=0.95,
                                                grad_clip=2.0)),
)


def imagenet(depth: int) -> Config:
    """Official recipe (README commands + utils/arg_util.py defaults): global batch 768
    (d30: 1024), lr = tblr * bs / 256 with tblr 1e-4 (d24/d30: 8e-5), 200-350 epochs, AdamW
    (0.9, 0.95), grad clip 2, the `lin0` schedule (warm-up ep/50 epochs from 0.005 x lr, hold
    5 %, linear to wpe x lr: wpe 0.1 for d16/d20, 0.01 for d24/d30), weight decay 0.05
    (d30: cosine to 0.08, `--twde=0.08`), no EMA; and the FID sampling protocol (official
    cfg 1.5 = weight 2.5 at the last scale, top-k 900, top-p 0.96). Data: Lanczos resize to
    1.125 x 256 + random 256 crop, no flip, as 10 stored crops per image (`var_crops`; the
    official code encodes a fresh crop online). The tokenizer is trained here."""
    batch = 1024 if depth >= 30 else 768
    epochs = {16: 200, 20: 250, 24: 350, 30: 350}[depth]
    lr = (1e-4 if depth <= 20 else 8e-5) * batch / 256
    steps = steps_for_epochs(epochs, batch)
    return Config(
        **imagenet_setup("var_crops"),
        tokenizer_train=StageConfig(steps=100_000, batch_size=256, ckpt_every=5000),
        model=var_config(depth),
        var_train=StageConfig(
            steps=steps, batch_size=batch, log_every=100, ckpt_every=5000,
            optim=OptimConfig(lr=lr, weight_decay=0.05, b2=0.95, grad_clip=2.0,
                              schedule="lin0", total_steps=steps,
                              warmup_steps=steps_for_epochs(epochs / 50, batch),
                              warmup_start=0.005, end_ratio=0.1 if depth <= 20 else 0.01,
                              weight_decay_end=0.08 if depth == 30 else -1.0)),
        sample=VARSampleConfig(cfg=2.5, top_k=900, top_p=0.96),
    )


def imagenet_code(draft_steps: int) -> Config:
    """CoDe (arXiv 2411.17787) on ImageNet 256: VAR-d30 drafts scales 0..N-1, VAR-d16 refines
    the rest, with CoDe's FID protocol (official cfg 1.5 = 2.5 here, top-k 600 at every
    scale, top-p 0.96, temperatures [1.1] x 7 + [1.0] x 3 applied after the filter, 50 images
    per class). Load `var_ckpt` / `refiner_ckpt` with CoDe's `drafter_N.pth` /
    `refiner_N.pth` (plain VAR state_dicts), or var_d30.pth / var_d16.pth for training-free
    CoDe."""
    base = imagenet(30)
    return dataclasses.replace(
        base, draft_steps=draft_steps, refiner=var_config(16),
        refiner_train=dataclasses.replace(imagenet(16).var_train),
        fid_samples_per_class=50,
        sample=VARSampleConfig(cfg=2.5, top_k=600, top_p=0.96,
                               temperature=(1.1,) * 7 + (1.0,) * 3,
                               temperature_after_filter=True))


PRESETS = {"digits": DIGITS, **{f"imagenet256_d{d}": imagenet(d) for d in (16, 20, 24, 30)},
           **{f"imagenet256_code{n}": imagenet_code(n) for n in (6, 7, 8, 9)}}


def validate(cfg: Config, mesh) -> None:
    """Every check that can fail, on the host, before anything is compiled."""
    cfg.model.validate()
    cfg.tokenizer.validate()
    cfg.sample.validate(cfg.model.vocab_size)
    latent = cfg.data.image_size // cfg.tokenizer.downsample
    cfglib.check(cfg.tokenizer.patch_nums[-1] == latent,
                 f"the last scale must be the latent side: {cfg.data.image_size}px / "
                 f"{cfg.tokenizer.downsample} = {latent}, got tokenizer.patch_nums[-1]="
                 f"{cfg.tokenizer.patch_nums[-1]}")
    check_stages(cfg, mesh, "tokenizer", "var")
    scales = len(cfg.tokenizer.patch_nums)
    cfg.sample.validate(cfg.model.vocab_size, scales)
    cfglib.check(0 <= cfg.draft_steps < scales,
                 f"draft_steps={cfg.draft_steps} must be in [0, {scales - 1}] (0 = plain VAR; "
                 "N = CoDe: the model drafts N scales, the refiner the rest)")
    if cfg.search.enabled:
        cfg.search.validate(scales)
        cfglib.check(not cfg.draft_steps, "search.enabled (TTS-VAR) runs one VAR: set "
                     "draft_steps=0")
    if cfg.draft_steps:
        cfglib.check(cfg.refiner is not None, "draft_steps > 0 (CoDe) needs a refiner config")
        cfg.refiner.validate()
        check_stages(cfg, mesh, "refiner")
        cfglib.check(0 <= cfg.refiner_ce_weight <= 1 and cfg.refiner_kd_temperature > 0,
                     "refiner_ce_weight must be in [0, 1] and refiner_kd_temperature > 0")
    check_sampling(cfg, cfg.model.num_classes, mesh)


def tokenizer_loss(model: MultiScaleVQVAE, batch, key):
    images = to_float(batch["image"])
    recon, aux = model(images)
    mse = jnp.mean((recon - images) ** 2)
    return mse + aux["quant"], {"mse": mse, "quant": aux["quant"]}


def split_scales(codes: jax.Array, patch_nums) -> list[jax.Array]:
    """Flat codes [B, L] -> per-scale [B, pn^2]."""
    return jnp.split(codes, np.cumsum([p * p for p in patch_nums])[:-1], axis=1)


def make_var_loss(quantizer, first_scale: int = 0, teacher_graphdef=None,
                  ce_weight: float = 1.0, temperature: float = 1.0,
                  last_scale: int | None = None):
    """Teacher forcing over all scales; the inputs are rebuilt from the codes by the frozen
    quantiser (codebook + Phi, a few hundred K parameters baked into the step). With
    `first_scale` / `last_scale` the loss counts only scales first_scale..last_scale - 1
    (CoDe's refiner and drafter, each specialised on the scales it samples). With a teacher
    (CoDe's refiner distilled from the large model, whose weights come as the step's `frozen`
    argument) the loss is
    ce_weight CE + (1 - ce_weight) T^2 KL(softmax(teacher / T) || softmax(student / T)), the
    teacher seeing the same inputs and the same dropped labels, without dropout."""
    q_graphdef, q_params = quantizer

    def loss(model: VAR, batch, key, teacher=None):
        patch = model.cfg.patch_nums
        codes = batch["codes"]
        inputs = jax.lax.stop_gradient(bind(q_graphdef, q_params).teacher_inputs(
            split_scales(codes, patch), patch[-1]))
        logits = model(batch["label"], inputs, key=key)
        begin = sum(p * p for p in patch[:first_scale])
        end = sum(p * p for p in patch[:last_scale])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes)[:, begin:end]
        last = patch[(last_scale or len(patch)) - 1] ** 2
        aux = {"accuracy": jnp.mean(jnp.argmax(logits, -1)[:, begin:end]
                                    == codes[:, begin:end]),
               "last_scale_ce": ce[:, -last:].mean()}
        if teacher is None:
            return ce.mean(), aux
        labels = batch["label"]
        if model.cfg.label_drop > 0:  # the very draw the student's call made
            drop = jax.random.bernoulli(key, model.cfg.label_drop, labels.shape)
            labels = jnp.where(drop, model.cfg.num_classes, labels)
        t_logits = jax.lax.stop_gradient(bind(teacher_graphdef, teacher)(labels, inputs))
        t_logp = jax.nn.log_softmax(t_logits[:, begin:end].astype(jnp.float32) / temperature)
        s_logp = jax.nn.log_softmax(logits[:, begin:end] / temperature)
        kd = jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1)) * temperature ** 2
        aux.update(ce=ce.mean(), kd=kd)
        return ce_weight * ce.mean() + (1 - ce_weight) * kd, aux
    return loss


def make_sampler(graphdef, vae_graphdef, vae_params, mesh, sample_cfg: VARSampleConfig,
                 draft_steps: int = 0, refiner=None, search_cfg: SearchConfig | None = None):
    """params -> Generated: the whole sampler incl. the decoder in one jit; with
    `draft_steps` > 0, CoDe with `refiner` = (graphdef, params) finishing the scales; with an
    enabled `search_cfg`, TTS-VAR (a compiled step per scale and candidate count)."""
    if search_cfg is not None and search_cfg.enabled:
        return search.make_generator(lambda p: var_sampling.Candidates(
            graphdef, p, vae_graphdef, vae_params, sample_cfg), search_cfg, mesh)
    if not draft_steps:
        return make_generator(lambda p, vp, key, labels: var_sampling.sample(
            graphdef, p, vae_graphdef, vp, key, labels, sample_cfg), mesh, vae_params)
    return make_generator(lambda p, f, key, labels: var_sampling.sample_collaborative(
        (graphdef, p), (refiner[0], f["refiner"]), vae_graphdef, f["vae"], key, labels,
        sample_cfg, draft_steps), mesh, {"vae": vae_params, "refiner": refiner[1]})


def plan_stage(cfg: Config) -> PlannedStage:
    """The VAR stage for `arjax.plan`: batches of flat multi-scale codes and labels (the
    quantiser that rebuilds the inputs is built for real: a few hundred K parameters)."""
    from arjax.tokenizers.msvq import MultiScaleQuantizer

    quantizer = split(MultiScaleQuantizer(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed)))
    return PlannedStage(
        "var", lambda: VAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)), make_var_loss(quantizer),
        cfg.var_train, {"codes": jax.ShapeDtypeStruct((cfg.model.seq_len,), jnp.int32),
                        "label": jax.ShapeDtypeStruct((), jnp.int32)}, cfg.model)


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    """Trains (or resumes, or loads) every stage; returns what `report` needs."""
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    train_source = open_source(cfg.data, "train")
    summary: dict = {}

    vae_graphdef, vae_params = stage_weights(
        cfg, "tokenizer", lambda: MultiScaleVQVAE(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed)),
        tokenizer_loss, lambda: train_source, mesh, workdir, progress,
        lambda path: load_vae(path, cfg.tokenizer), summary)

    @functools.cache
    def codes():
        encode = jax.jit(lambda p, x: jnp.concatenate(
            bind(vae_graphdef, p).encode(to_float(x)), axis=1))
        producer = fingerprint(vae_params, tokenizer=cfg.tokenizer, data=cfg.data.content(),
                               split="train")
        return cached_codes(lambda images: encode(vae_params, images), train_source, workdir,
                            "train", producer, cfg.encode_batch, mesh,
                            codes_dtype(cfg.tokenizer.codebook_size), progress)

    quantizer = split(bind(vae_graphdef, vae_params).quantize)
    model_fn = lambda: VAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1))
    graphdef = split(nnx.eval_shape(model_fn))[0]
    generate = make_sampler(graphdef, vae_graphdef, vae_params, mesh, cfg.sample,
                            search_cfg=cfg.search)
    digits = cfg.data.name == "digits" and cfg.eval_samples_per_class
    scorer = lambda gen: digits_scorer(gen, cfg.model.num_classes, cfg.eval_samples_per_class,
                                       cfg.seed, train_source.images) if digits else None
    score = scorer(generate)
    own = cfg.draft_steps if cfg.draft_steps and cfg.drafter_own_scales else None
    _, params = stage_weights(cfg, "var", model_fn, make_var_loss(quantizer, last_scale=own),
                              codes, mesh, workdir, progress,
                              lambda path: load_var(path, cfg.model), summary, score)
    if cfg.draft_steps:  # CoDe: the refiner learns the last scales from the trained model
        distill = cfg.refiner_ce_weight < 1
        refiner = stage_weights(
            cfg, "refiner", lambda: VAR(cfg.refiner, rngs=nnx.Rngs(cfg.seed + 2)),
            make_var_loss(quantizer, cfg.draft_steps, graphdef if distill else None,
                          cfg.refiner_ce_weight, cfg.refiner_kd_temperature),
            codes, mesh, workdir, progress, lambda path: load_var(path, cfg.refiner), summary,
            frozen=params if distill else None)
        summary["refiner/params"] = param_count(refiner[1])
        generate = make_sampler(graphdef, vae_graphdef, vae_params, mesh, cfg.sample,
                                cfg.draft_steps, refiner)
        score = scorer(generate)
    summary["var/params"] = param_count(params)
    return dict(generate=generate, params=params, summary=summary, score=score,
                step=cfg.var_train.steps, model=(graphdef, params),
                vae=(vae_graphdef, vae_params), tokenizer=(vae_graphdef, vae_params))


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    """The whole pipeline: `build`, then a report in `<workdir>/samples/<tag>/`."""
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "var")


if __name__ == "__main__":
    main(sys.argv[1:])
