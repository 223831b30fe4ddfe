"""LlamaGen: VQ tokenizer + class-conditional raster AR GPT, trained and sampled.

Run:   python -m experiments.llamagen_imagenet --config digits --workdir runs/llamagen_digits
       python -m experiments.llamagen_imagenet --config imagenet256_B --workdir /ckpt/gpt_b \
           --set data.data_dir=/data/tfds --set data.manual_dir=/data/imagenet \
           --set tokenizer_ckpt=/weights/vq_ds16_c2i.pt
Sample an official model:  --config imagenet256_B --set gpt_ckpt=/weights/c2i_B_256.pt \
           --set tokenizer_ckpt=/weights/vq_ds16_c2i.pt --set gpt_train.steps=0

Stages: (1) train the VQ tokenizer (or load the official one), (2) extract codes once (cached
in the work dir, as LlamaGen's extract_codes_c2i), (3) when sampling speculatively with a draft
model, train the small draft GPT, (4) train the GPT (or load it), (5) sample a PNG grid with one
row per class and, on digits, score samples with the digits evaluator. Every stage resumes from
its last checkpoint; a finished work dir only samples again, into a new samples/<tag>/.
model.vocab_size comes from tokenizer.codebook_size (and the draft model's from the model's).

Speculative / parallel decoding (see arjax/sampling/speculative.py), e.g. on digits:
    --set speculative.draft_len=4                                  SD with the draft GPT
    --set speculative.draft_len=4 --set speculative.num_drafts=3   SpecTr
    --set speculative.draft_len=8 --set speculative.drafter=jacobi SJD
    ... --set speculative.drafter=jacobi --set speculative.accept=group     GSD
    ... --set speculative.accept=relaxed --set speculative.delta=0.1       LANTERN
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.convert.llamagen import load_gpt, load_vq
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
from arjax.models.raster_ar import RasterAR, RasterARConfig, gpt_config
from arjax.optim import OptimConfig
from arjax.sampling import raster, speculative
from arjax.sampling.acceptance import nearest_codes
from arjax.sampling.common import SampleConfig
from arjax.sampling.generator import make_generator
from arjax.sampling.speculative import SpeculativeConfig
from arjax.tokenizers.vq import VQ_16, VQConfig, VQTokenizer


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    DERIVED = {"model.vocab_size": "tokenizer.codebook_size",
               "draft_model.vocab_size": "model.vocab_size", "draft_model.grid": "model.grid",
               "draft_model.num_classes": "model.num_classes"}

    tokenizer: VQConfig = VQ_16
    tokenizer_train: StageConfig = StageConfig()
    tokenizer_ckpt: str | None = None  # official VQ .pt: skips tokenizer training
    model: RasterARConfig = gpt_config("B")
    gpt_train: StageConfig = StageConfig()
    gpt_ckpt: str | None = None  # official c2i GPT .pt: skips GPT training
    draft_model: RasterARConfig | None = None  # small GPT for speculative sampling
    draft_train: StageConfig = StageConfig(steps=0)
    draft_ckpt: str | None = None  # an official c2i GPT .pt as the draft: skips its training
    speculative: SpeculativeConfig = SpeculativeConfig(draft_len=0)  # draft_len 0 = plain
    sample: SampleConfig = SampleConfig(cfg=2.0)


DIGITS = Config(
    data=DIGITS_DATA,
    tokenizer=VQConfig(codebook_size=64, codebook_dim=8, ch=16, ch_mult=(1, 2, 2),
                       num_res_blocks=1, z_channels=32, norm_groups=8),
    tokenizer_train=StageConfig(steps=400, batch_size=64, log_every=50, ckpt_every=200,
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0)),
    model=RasterARConfig(grid=8, num_classes=10, dim=128, depth=4, heads=4, multiple_of=32,
                         dropout=0.0, label_drop=0.1),
    gpt_train=StageConfig(steps=1500, batch_size=64, log_every=100, ckpt_every=500,
                          eval_every=500, optim=OptimConfig(lr=1e-3, warmup_steps=50)),
    draft_model=RasterARConfig(dim=64, depth=2, heads=2, multiple_of=32, dropout=0.0,
                               label_drop=0.1),
    draft_train=StageConfig(steps=600, batch_size=64, log_every=100, ckpt_every=600,
                            optim=OptimConfig(lr=1e-3, warmup_steps=50)),
    sample=SampleConfig(cfg=2.0),
    eval_samples_per_class=40,
)


def imagenet(size: str) -> Config:
    """LlamaGen c2i at 256 px: VQ-16 (official weights) + GPT-`size`, official recipe
    (300 epochs at batch 256, AdamW(0.9, 0.95), constant lr 1e-4 without warm-up, wd 0.05,
    grad clip 1, no EMA: `--ema` is off in the README commands) and FID guidance (cfg 2.0
    for B/L, 1.75 for XL/XXL, 1.65 for 3B). Data: codes of the ADM centre crop and its
    mirror, one drawn per sample (extract_codes_c2i; `--set data.views=ten_crop` for the
    README's ten-crop recipe)."""
    return Config(
        **imagenet_setup("center_flip"),
        tokenizer=VQ_16,
        tokenizer_train=StageConfig(steps=0),
        model=gpt_config(size),
        gpt_train=StageConfig(steps=steps_for_epochs(300, 256), batch_size=256, log_every=100,
                              ckpt_every=5000, optim=OptimConfig(lr=1e-4, weight_decay=0.05)),
        sample=SampleConfig(cfg={"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75}.get(size, 1.65)),
    )


PRESETS = {"digits": DIGITS, **{f"imagenet256_{s}": imagenet(s)
                                for s in ("B", "L", "XL", "XXL", "3B")}}


def validate(cfg: Config, mesh) -> None:
    """Every check that can fail, on the host, before anything is compiled."""
    check = cfglib.check
    cfg.model.validate()
    cfg.tokenizer.validate()
    cfg.sample.validate(cfg.model.vocab_size)
    latent = cfg.data.image_size // cfg.tokenizer.downsample
    check(cfg.model.grid == latent,
          f"model.grid={cfg.model.grid} but the tokenizer gives {latent}x{latent} codes for "
          f"{cfg.data.image_size}px images; set model.grid={latent}")
    check_stages(cfg, mesh, "tokenizer", "gpt")
    spec = cfg.speculative
    check(spec.draft_len >= 0,
          f"speculative.draft_len must be >= 0 (0 = plain sampling), got {spec.draft_len}")
    if spec.draft_len:
        spec.validate()
    if uses_draft_model(cfg):
        check(cfg.draft_model is not None,
              "speculative.drafter='model' needs a draft_model config")
        cfg.draft_model.validate()
        check_stages(cfg, mesh, "draft")
    check_sampling(cfg, cfg.model.num_classes, mesh)


def tokenizer_loss(model: VQTokenizer, batch, key):
    images = to_float(batch["image"])
    recon, aux = model(images)
    mse = jnp.mean((recon - images) ** 2)
    loss = mse + aux["codebook"] + aux["commit"] + aux["entropy"]
    return loss, {"mse": mse, "codebook": aux["codebook"], "commit": aux["commit"]}


def gpt_loss(model: RasterAR, batch, key):
    logits = model(batch["codes"], batch["label"], key=key)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["codes"]).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["codes"])
    return ce, {"accuracy": acc}


def uses_draft_model(cfg: Config) -> bool:
    return cfg.speculative.draft_len > 0 and cfg.speculative.drafter == "model"


def make_sampler(graphdef, vq_graphdef, vq_params, mesh, cfg: Config, draft=None):
    """params -> Generated: plain or (with `speculative.draft_len` > 0) speculative decoding,
    with `draft` = (graphdef, params) of the draft GPT; tokens and decoder in one jit."""
    spec, scfg = cfg.speculative, cfg.sample
    fixed = {"vq": vq_params, "draft": draft[1] if draft else None}
    if spec.draft_len:
        codes = bind(vq_graphdef, vq_params).quantize.codebook()
        neighbours = (jax.jit(nearest_codes, static_argnums=1)(codes, spec.neighbours)
                      if spec.accept == "relaxed" else None)  # once, not per call
        fixed["neighbours"] = neighbours

        def fn(p, f, key, labels):
            d = (draft[0], f["draft"]) if draft else None
            return speculative.sample_images(graphdef, p, vq_graphdef, f["vq"], key, labels,
                                             scfg, spec, d, f["neighbours"])
    else:
        def fn(p, f, key, labels):
            return raster.sample_images(graphdef, p, vq_graphdef, f["vq"], key, labels, scfg)
    return make_generator(fn, mesh, fixed)


def eval_loss(graphdef, params, source, batch: int) -> float:
    """Mean teacher-forced cross-entropy on a held-out split."""
    fn = jax.jit(lambda p, c, y: optax.softmax_cross_entropy_with_integer_labels(
        bind(graphdef, p)(c, y), c).mean())
    losses = [float(fn(params, *(lambda r: (r["codes"], r["label"]))(
        source[np.arange(s, min(s + batch, source.num_examples))])))
        for s in range(0, source.num_examples, batch)]
    return float(np.mean(losses))


def plan_stage(cfg: Config) -> PlannedStage:
    """The GPT stage for `arjax.plan`: batches of raster codes and labels."""
    return PlannedStage(
        "gpt", lambda: RasterAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1)), gpt_loss,
        cfg.gpt_train, {"codes": jax.ShapeDtypeStruct((cfg.model.seq_len,), jnp.int32),
                        "label": jax.ShapeDtypeStruct((), jnp.int32)}, cfg.model)


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    """Trains (or resumes, or loads) every stage; returns what `report` needs."""
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    train_source = open_source(cfg.data, "train")
    summary: dict = {}

    vq_graphdef, vq_params = stage_weights(
        cfg, "tokenizer", lambda: VQTokenizer(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed)),
        tokenizer_loss, lambda: train_source, mesh, workdir, progress,
        lambda path: load_vq(path, cfg.tokenizer), summary)

    encode_fn = jax.jit(lambda p, x: bind(vq_graphdef, p).encode(to_float(x)))
    encode = lambda images: encode_fn(vq_params, images)

    def codes(split_: str):
        producer = fingerprint(vq_params, tokenizer=cfg.tokenizer, data=cfg.data.content(),
                               split=split_)
        return cached_codes(encode, open_source(cfg.data, split_), workdir, split_, producer,
                            cfg.encode_batch, mesh, codes_dtype(cfg.tokenizer.codebook_size),
                            progress)

    needs_codes = not cfg.gpt_ckpt or (uses_draft_model(cfg) and not cfg.draft_ckpt)
    train_codes = codes("train") if needs_codes else None
    draft = None
    if uses_draft_model(cfg):
        draft = stage_weights(
            cfg, "draft", lambda: RasterAR(cfg.draft_model, rngs=nnx.Rngs(cfg.seed + 2)),
            gpt_loss, lambda: train_codes, mesh, workdir, progress,
            lambda path: load_gpt(path, cfg.draft_model), summary)
    gpt_fn = lambda: RasterAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1))
    graphdef = split(nnx.eval_shape(gpt_fn))[0]
    generate = make_sampler(graphdef, vq_graphdef, vq_params, mesh, cfg, draft)
    score = None
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        score = digits_scorer(generate, cfg.model.num_classes, cfg.eval_samples_per_class,
                              cfg.seed, train_source.images)

    _, params = stage_weights(cfg, "gpt", gpt_fn, gpt_loss, lambda: train_codes, mesh,
                              workdir, progress, lambda path: load_gpt(path, cfg.model),
                              summary, score)
    if "gpt/steps_per_s" in summary:
        summary["gpt/train_tokens_per_s"] = (summary["gpt/steps_per_s"]
                                             * cfg.gpt_train.batch_size * cfg.model.seq_len)
    summary["gpt/params"] = param_count(params)
    if cfg.data.name == "digits":
        summary["gpt/test_loss"] = eval_loss(graphdef, params, codes("test"), 256)
    return dict(generate=generate, params=params, summary=summary, score=score,
                step=cfg.gpt_train.steps, model=(graphdef, params),
                tokenizer=(vq_graphdef, vq_params), draft=draft)


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    """The whole pipeline: `build`, then a report in `<workdir>/samples/<tag>/`."""
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "llamagen")


if __name__ == "__main__":
    main(sys.argv[1:])
