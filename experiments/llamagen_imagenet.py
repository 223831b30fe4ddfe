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
row per class. Every stage resumes from its last checkpoint.

Speculative / parallel decoding (see arjax/sampling/speculative.py), e.g. on digits:
    --set speculative.draft_len=4                                  SD with the draft GPT
    --set speculative.draft_len=4 --set speculative.num_drafts=3   SpecTr
    --set speculative.draft_len=8 --set speculative.drafter=jacobi SJD
    ... --set speculative.drafter=jacobi --set speculative.accept=group     GSD
    ... --set speculative.accept=relaxed --set speculative.delta=0.1       LANTERN
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.data import DataConfig, open_source
from arjax.images import to_float, to_uint8
from arjax.models import bind, param_count, split
from arjax.models.raster_ar import RasterAR, RasterARConfig, gpt_config
from arjax.optim import OptimConfig
from arjax.sampling import speculative
from arjax.sampling.acceptance import nearest_codes
from arjax.sampling.common import SampleConfig
from arjax.sampling.raster import sample
from arjax.sampling.speculative import SpeculativeConfig
from arjax.stages import (
    StageConfig,
    check_sampling,
    cli,
    digits_scorer,
    extract_codes,
    final_samples,
    train_stage,
)
from arjax.tokenizers.vq import VQ_16, VQConfig, VQTokenizer


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    tokenizer: VQConfig = VQ_16
    tokenizer_train: StageConfig = StageConfig()
    tokenizer_ckpt: str | None = None  # official VQ .pt: skips tokenizer training
    model: RasterARConfig = gpt_config("B")
    gpt_train: StageConfig = StageConfig()
    gpt_ckpt: str | None = None  # official c2i GPT .pt: skips GPT training
    draft_model: RasterARConfig | None = None  # small GPT for speculative sampling
    draft_train: StageConfig = StageConfig(steps=0)
    speculative: SpeculativeConfig = SpeculativeConfig(draft_len=0)  # draft_len 0 = plain
    sample: SampleConfig = SampleConfig(cfg_scale=2.0)
    samples_per_class: int = 8  # for the PNG grid
    eval_samples_per_class: int = 0  # digits: samples scored by the digits evaluator
    sample_classes: tuple[int, ...] = tuple(range(10))
    encode_batch: int = 256
    mesh: tuple[tuple[str, int], ...] = (("data", -1), ("fsdp", 1))
    seed: int = 0


DIGITS = Config(
    data=DataConfig(name="digits", image_size=32),
    tokenizer=VQConfig(codebook_size=64, codebook_dim=8, ch=16, ch_mult=(1, 2, 2),
                       num_res_blocks=1, z_channels=32, norm_groups=8),
    tokenizer_train=StageConfig(steps=400, batch_size=64, log_every=50, ckpt_every=200,
                                optim=OptimConfig(lr=2e-3, weight_decay=0.0, grad_clip=0.0)),
    model=RasterARConfig(vocab_size=64, grid=8, num_classes=10, dim=128, depth=4, heads=4,
                         multiple_of=32, dropout=0.0, label_drop=0.1),
    gpt_train=StageConfig(steps=1500, batch_size=64, log_every=100, ckpt_every=500,
                          eval_every=500, optim=OptimConfig(lr=1e-3, warmup_steps=50)),
    draft_model=RasterARConfig(vocab_size=64, grid=8, num_classes=10, dim=64, depth=2,
                               heads=2, multiple_of=32, dropout=0.0, label_drop=0.1),
    draft_train=StageConfig(steps=600, batch_size=64, log_every=100, ckpt_every=600,
                            optim=OptimConfig(lr=1e-3, warmup_steps=50)),
    sample=SampleConfig(cfg_scale=2.0),
    samples_per_class=8,
    eval_samples_per_class=40,
)


def imagenet(size: str) -> Config:
    """LlamaGen c2i at 256 px: VQ-16 (official weights) + GPT-`size`, official recipe."""
    return Config(
        data=DataConfig(name="imagenet2012", image_size=256),
        tokenizer=VQ_16,
        tokenizer_train=StageConfig(steps=0),
        model=gpt_config(size),
        gpt_train=StageConfig(steps=300 * 1_281_167 // 256, batch_size=256, log_every=100,
                              ckpt_every=5000, optim=OptimConfig(lr=1e-4, weight_decay=0.05)),
        # FID protocol of the repo: cfg 2.0 for B/L, 1.75 for XL/XXL, 1.65 for 3B.
        sample=SampleConfig(cfg_scale={"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75}.get(
            size, 1.65)),
        sample_classes=(207, 360, 387, 974, 88, 979, 417, 279),
    )


PRESETS = {"digits": DIGITS, **{f"imagenet256_{s}": imagenet(s)
                                for s in ("B", "L", "XL", "XXL", "3B")}}


def validate(cfg: Config, mesh) -> None:
    """Every check that can fail, on the host, before anything is compiled."""
    check = cfglib.check
    cfg.model.validate()
    cfg.tokenizer.validate()
    cfg.sample.validate(cfg.model.vocab_size)
    check(cfg.model.vocab_size == cfg.tokenizer.codebook_size,
          f"model.vocab_size={cfg.model.vocab_size} must equal tokenizer.codebook_size="
          f"{cfg.tokenizer.codebook_size}")
    latent = cfg.data.image_size // cfg.tokenizer.downsample
    check(cfg.model.grid == latent,
          f"model.grid={cfg.model.grid} but the tokenizer gives {latent}x{latent} codes for "
          f"{cfg.data.image_size}px images; set model.grid={latent}")
    for name, stage in (("tokenizer_train", cfg.tokenizer_train), ("gpt_train", cfg.gpt_train)):
        check(stage.steps >= 0, f"{name}.steps must be >= 0")
        if stage.steps:
            sharding.check_batch(stage.batch_size, mesh, f"{name}.batch_size")
    check(cfg.tokenizer_ckpt is not None or cfg.tokenizer_train.steps > 0,
          "no tokenizer: set tokenizer_ckpt=/path/vq_ds16_c2i.pt or tokenizer_train.steps > 0")
    spec = cfg.speculative
    check(spec.draft_len >= 0,
          f"speculative.draft_len must be >= 0 (0 = plain sampling), got {spec.draft_len}")
    if spec.draft_len:
        spec.validate()
    if uses_draft_model(cfg):
        draft = cfg.draft_model
        check(draft is not None and cfg.draft_train.steps > 0,
              "speculative.drafter='model' needs draft_model and draft_train.steps > 0")
        draft.validate()
        check((draft.vocab_size, draft.grid, draft.num_classes)
              == (cfg.model.vocab_size, cfg.model.grid, cfg.model.num_classes),
              "draft_model must share vocab_size, grid and num_classes with model")
    check(cfg.gpt_ckpt is not None or cfg.gpt_train.steps > 0,
          "no GPT: set gpt_ckpt=/path/c2i_B_256.pt or gpt_train.steps > 0")
    for path in (cfg.tokenizer_ckpt, cfg.gpt_ckpt):
        check(path is None or os.path.exists(path), f"checkpoint file {path!r} does not exist")
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


def encoder(vq_graphdef, vq_params):
    """uint8 images -> codes [B, L] (jitted)."""
    encode = jax.jit(lambda p, x: bind(vq_graphdef, p).encode(to_float(x)))
    return lambda images: encode(vq_params, images)


def uses_draft_model(cfg: Config) -> bool:
    return cfg.speculative.draft_len > 0 and cfg.speculative.drafter == "model"


def make_generator(graphdef, vq_graphdef, vq_params, mesh, sample_cfg: SampleConfig,
                   spec: SpeculativeConfig | None = None, draft=None):
    """labels -> (images uint8, tokens, stats): the jitted sampler (labels and tokens sharded
    over the batch, params as they are) followed by the tokenizer's decoder. With `spec`
    (draft_len > 0) it decodes speculatively, with `draft` = (graphdef, params) as the draft
    model and the tokenizer's code vectors for the relaxed/grouped rules."""
    batch = sharding.batch_sharding(mesh)
    speculate = spec is not None and spec.draft_len > 0
    if speculate:
        codes = bind(vq_graphdef, vq_params).quantize.codebook()
        neighbours = (jax.jit(nearest_codes, static_argnums=1)(codes, spec.neighbours)
                      if spec.accept == "relaxed" else None)  # once, not per call
        fn = lambda p, k, y: speculative.sample(graphdef, p, k, y, sample_cfg, spec, draft,
                                                codes, neighbours)
    else:
        fn = lambda p, k, y: sample(graphdef, p, k, y, sample_cfg)
    sampler = jax.jit(fn, out_shardings=(batch, sharding.replicated(mesh)))
    decode = jax.jit(lambda p, c: bind(vq_graphdef, p).decode(c))

    def generate(params, labels: np.ndarray, key):
        t0 = time.perf_counter()
        tokens, stats = sampler(params, key, sharding.to_global(labels, mesh))
        jax.block_until_ready(tokens)
        seconds = time.perf_counter() - t0
        images = to_uint8(np.asarray(decode(vq_params, tokens)))
        info = {"seconds": seconds, "forward_passes": int(stats.forward_passes)}
        if speculate:
            rounds = np.maximum(np.asarray(stats.rounds), 1)
            info["mean_accepted_per_round"] = float(np.mean(np.asarray(stats.accepted) / rounds))
            info["first_draft_acceptance"] = float(np.mean(np.asarray(stats.first_accepted)
                                                           / rounds))
            info["draft_passes"] = int(stats.draft_passes)
            info["mean_rounds"] = float(np.mean(np.asarray(stats.rounds)))
        return images, np.asarray(tokens), info

    return generate


def eval_loss(graphdef, params, source, batch: int) -> float:
    """Mean teacher-forced cross-entropy on a held-out split."""
    fn = jax.jit(lambda p, c, y: optax.softmax_cross_entropy_with_integer_labels(
        bind(graphdef, p)(c, y), c).mean())
    losses = [float(fn(params, *(lambda r: (r["codes"], r["label"]))(
        source[np.arange(s, min(s + batch, source.num_examples))])))
        for s in range(0, source.num_examples, batch)]
    return float(np.mean(losses))


def run(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    """The whole pipeline; returns a summary dict (also written to workdir/summary.json)."""
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    train_source = open_source(cfg.data, "train")
    summary: dict = {}

    vq_fn = lambda: VQTokenizer(cfg.tokenizer, rngs=nnx.Rngs(cfg.seed))
    if cfg.tokenizer_ckpt:
        from arjax.convert.llamagen import load_vq

        vq_graphdef, vq_params = split(nnx.eval_shape(vq_fn))[0], load_vq(
            cfg.tokenizer_ckpt, cfg.tokenizer)
    else:
        vq_graphdef, vq_params, hist = train_stage("tokenizer", vq_fn, tokenizer_loss,
                                                   cfg.tokenizer_train, train_source, cfg.seed,
                                                   mesh, workdir, progress)
        summary["tokenizer/final_mse"] = hist[-1]["train/mse"] if hist else None

    cache = (lambda split_: f"{workdir}/codes_{split_}.npz") if workdir else (lambda _: None)
    encode = encoder(vq_graphdef, vq_params)
    codes = extract_codes(encode, train_source, cfg.encode_batch, cache("train"))

    draft = None
    if uses_draft_model(cfg):
        draft_fn = lambda: RasterAR(cfg.draft_model, rngs=nnx.Rngs(cfg.seed + 2))
        draft_graphdef, draft_params, _ = train_stage("draft", draft_fn, gpt_loss,
                                                      cfg.draft_train, codes, cfg.seed, mesh,
                                                      workdir, progress)
        draft = (draft_graphdef, draft_params)
    gpt_fn = lambda: RasterAR(cfg.model, rngs=nnx.Rngs(cfg.seed + 1))
    graphdef = split(nnx.eval_shape(gpt_fn))[0]
    generate = make_generator(graphdef, vq_graphdef, vq_params, mesh, cfg.sample,
                              cfg.speculative, draft)
    score = None
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        score = digits_scorer(generate, cfg.model.num_classes, cfg.eval_samples_per_class,
                              cfg.seed, train_source.images)

    if cfg.gpt_ckpt:
        from arjax.convert.llamagen import load_gpt

        params = load_gpt(cfg.gpt_ckpt, cfg.model)
    else:
        _, params, hist = train_stage(
            "gpt", gpt_fn, gpt_loss, cfg.gpt_train, codes, cfg.seed, mesh, workdir, progress,
            evaluate=(lambda state: score(state.params)) if score else None)
        train_logs = [h for h in hist if "train/loss" in h]
        if train_logs:
            summary.update({"gpt/final_loss": train_logs[-1]["train/loss"],
                            "gpt/steps_per_s": train_logs[-1]["time/steps_per_s"],
                            "gpt/train_tokens_per_s": train_logs[-1]["time/steps_per_s"]
                            * cfg.gpt_train.batch_size * cfg.model.seq_len})
    summary["gpt/params"] = param_count(params)
    if score:
        summary.update({f"eval/{k}": v for k, v in score(params).items()})
    if cfg.data.name == "digits":
        test = extract_codes(encode, open_source(cfg.data, "test"), cfg.encode_batch,
                             cache("test"))
        summary["gpt/test_loss"] = eval_loss(graphdef, params, test, 256)

    return final_samples(generate, params, cfg.sample_classes, cfg.samples_per_class, cfg.seed,
                         workdir, cfg.gpt_train.steps, summary, cfg, "tokens")


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "llamagen")


if __name__ == "__main__":
    main(sys.argv[1:])
