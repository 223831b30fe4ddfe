"""Distilled Decoding (DD1, arXiv 2412.17153): a LlamaGen or VAR teacher turned into a one- or
two-step generator.

Run:   python -m experiments.dd_imagenet --config digits_llamagen --workdir runs/dd_llamagen
       python -m experiments.dd_imagenet --config digits_var --workdir runs/dd_var
       python -m experiments.dd_imagenet --config imagenet256_var_d16 --workdir /ckpt/dd_d16 \
           --set var.var_ckpt=/weights/var_d16.pth --set var.tokenizer_ckpt=/weights/vae.pth
Two steps / teacher-involved sampling of a trained work dir (a new samples/<tag>/):
       ... --set sample.steps=[0,20]                       student at k = 0, then at k = 20
       ... --set sample.steps=[0,20] --set sample.teacher_start=8   (teacher-involved)

Stages: (1) the teacher is its own experiment (`experiments.llamagen_imagenet` or
`experiments.var_imagenet`, its whole config under `llamagen` or `var`) trained, resumed or
loaded in `<workdir>/teacher`; (2) pairs: the teacher's flow map (`arjax.distill.flow`) from
N(0, I) noise under the teacher's own sampling config (guidance, top-k / top-p), cached as
token ids (`<workdir>/codes/pairs-<fingerprint>`, sharded and resumable; the noise is
regenerated from each example's index); (3) the student (`arjax.distill.students`, initialised
from the teacher) trained on the pairs, with EMA; (4) samples with `sample.steps` student
passes (PNG grid, digits scores, summary). Every stage resumes; no real image is used after
the teacher.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from arjax import config as cfglib
from arjax import sharding
from arjax.convert.dd import load_dd_raster, load_dd_var
from arjax.data import open_source
from arjax.distill.flow import time_grid
from arjax.distill.objective import IdSource, PairSource, dd1_loss, pair_encoder
from arjax.distill.sampling import check_steps, few_step, teacher_involved
from arjax.distill.students import DDVAR, DDRaster, raster_from_teacher, var_from_teacher
from arjax.experiment.base import DIGITS_DATA, ExperimentConfig
from arjax.experiment.cli import cli, run_experiment
from arjax.experiment.outputs import digits_scorer
from arjax.experiment.pipeline import (
    StageConfig,
    cached_codes,
    check_sampling,
    check_stages,
    codes_dtype,
    fingerprint,
    stage_weights,
)
from arjax.models import bind, param_count, split
from arjax.nn.scales import scale_bounds
from arjax.optim import OptimConfig
from arjax.sampling import raster
from arjax.sampling import var as var_sampling
from arjax.sampling.generator import Samples, make_generator
from experiments import llamagen_imagenet, var_imagenet


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """The token flow's time grid and solver (pair generation only)."""
    uniform: int = 32  # equal steps from t = 1 to t_mid
    geometric: int = 96  # equal-ratio steps from t_mid to t_min
    t_mid: float = 0.1
    t_min: float = 1e-4
    solver: str = "heun"

    def grid(self):
        return time_grid(self.uniform, self.geometric, self.t_mid, self.t_min)


@dataclasses.dataclass(frozen=True)
class DDSampleConfig:
    steps: tuple[int, ...] = (0,)  # trajectory points the student starts from: (0,) one step
    split: int = 0  # units before it take the logits head's code, after it the continuous head
    teacher_start: int = -1  # >= 0: the teacher re-samples units teacher_start..steps[1]-1


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    llamagen: llamagen_imagenet.Config | None = None  # the teacher: exactly one of these two
    var: var_imagenet.Config | None = None
    flow: FlowConfig = FlowConfig()
    pairs: int = 1_281_167  # pair data set size (DD1's is not public; ImageNet-sized here)
    pair_batch: int = 256  # examples per pair-generation call
    timesteps: tuple[int, ...] = (0,)  # trajectory points trained on: DD1's {0, t2}
    cont_weight: float = 1.0  # continuous-head squared error next to the logits head's CE
    student_train: StageConfig = StageConfig()
    student_ckpt: str | None = None  # a released DD student (.pt / .pth): skips training
    sample: DDSampleConfig = DDSampleConfig()

    @property
    def family(self) -> str:
        return "llamagen" if self.llamagen is not None else "var"

    @property
    def teacher(self):
        return self.llamagen if self.llamagen is not None else self.var


def units(cfg: Config) -> int:
    """Trajectory units: the teacher's tokens (LlamaGen) or scales (VAR)."""
    model = cfg.teacher.model
    return model.seq_len if cfg.family == "llamagen" else len(model.patch_nums)


def validate(cfg: Config, mesh) -> None:
    check = cfglib.check
    check((cfg.llamagen is None) != (cfg.var is None),
          "set exactly one teacher: the `llamagen` or the `var` section")
    check(cfg.data == cfg.teacher.data,
          f"data must be the teacher's ({cfg.family}.data); got {cfg.data} and "
          f"{cfg.teacher.data}")
    teacher_module(cfg).validate(cfg.teacher, mesh)
    n = units(cfg)
    check(len(cfg.timesteps) >= 1 and all(0 <= k < n for k in cfg.timesteps),
          f"timesteps must be trajectory points in [0, {n}), got {cfg.timesteps}")
    check(cfg.pairs >= cfg.student_train.batch_size and cfg.pair_batch >= 1,
          f"pairs={cfg.pairs} must hold at least one batch of student_train.batch_size="
          f"{cfg.student_train.batch_size}; pair_batch must be >= 1")
    check(cfg.flow.solver in ("heun", "euler"), "flow.solver must be 'heun' or 'euler'")
    cfg.flow.grid()
    sc = cfg.sample
    if cfg.family == "llamagen":
        check(cfg.teacher.sample.temperature > 0, "the flow map needs sample.temperature > 0")
    else:
        check(not cfg.teacher.sample.smooth, "the flow map draws hard codes: var.sample.smooth")
    if sc.teacher_start >= 0:
        check(len(sc.steps) == 2 and 0 <= sc.teacher_start < sc.steps[1],
              f"sample.teacher_start={sc.teacher_start} needs sample.steps=[0, t2] with "
              f"teacher_start < t2, got {sc.steps}")
    check_steps(n, sc.steps, sc.split, "sample.")
    check(cfg.cont_weight >= 0, f"cont_weight must be >= 0, got {cfg.cont_weight}")
    check_stages(cfg, mesh, "student")
    sharding.check_batch(cfg.pair_batch, mesh, "pair_batch")
    check_sampling(cfg, cfg.teacher.model.num_classes, mesh)


def teacher_module(cfg: Config):
    return llamagen_imagenet if cfg.family == "llamagen" else var_imagenet


def codebook_of(cfg: Config, tokenizer) -> jax.Array:
    """The code vectors the teacher's tokens stand for (LlamaGen's are l2-normalised)."""
    quantize = bind(*tokenizer).quantize
    return quantize.codebook() if cfg.family == "llamagen" else quantize.embedding.embedding[...]


def student_module(cfg: Config, code_dim: int, teacher_params=None):
    """The student; with `teacher_params`, initialised from them."""
    if cfg.family == "llamagen":
        module = DDRaster(cfg.teacher.model, code_dim, rngs=nnx.Rngs(cfg.seed + 5))
        from_teacher = raster_from_teacher
    else:
        module = DDVAR(cfg.teacher.model, rngs=nnx.Rngs(cfg.seed + 5))
        from_teacher = var_from_teacher
    if teacher_params is None:
        return module
    graphdef, params = split(module)
    return bind(graphdef, from_teacher(params, teacher_params))


def flow_sampler(cfg: Config, teacher):
    """(labels, FlowDraw) -> the teacher's flow-mapped token ids [B, L]."""
    graphdef, params = teacher["model"]
    key, sample = jax.random.key(0), cfg.teacher.sample  # the key is unused by the flow map
    if cfg.family == "llamagen":
        return lambda labels, flow: raster.sample(graphdef, params, key, labels, sample,
                                                  flow)[0]
    vae = teacher["tokenizer"]
    return lambda labels, flow: var_sampling.sample(graphdef, params, *vae, key, labels,
                                                    sample, flow).aux["codes"]


def teacher_sampler(cfg: Config, teacher, graph_params, key, labels):
    """The teacher's categorical sampler for DD's teacher-involved mode: (prefix tokens or
    None, start unit, stop unit) -> (token ids [B, L], counted passes)."""
    graphdef, params = graph_params
    if cfg.family == "llamagen":
        def run(prefix, start, stop):
            tokens, stats = raster.sample(graphdef, params, key, labels, cfg.teacher.sample,
                                          prefix=prefix, stop=stop)
            return tokens, stats.target_passes
        return run
    bounds = scale_bounds(cfg.teacher.model.patch_nums)

    def run(prefix, start, stop):
        scales = None if prefix is None else [prefix[:, a:b] for a, b in bounds[:start]]
        out = var_sampling.sample(graphdef, params, *teacher["tokenizer"], key, labels,
                                  cfg.teacher.sample, prefix=scales, stop=stop)
        return out.aux["codes"], out.stats["target_passes"]
    return run


def make_sampler(cfg: Config, graphdef, teacher, codebook, mesh):
    """params -> Generated: `sample.steps` student passes (or teacher-involved), then the
    tokenizer decodes the vectors (continuous outputs unsnapped) in the same jit."""
    sc, (tok_graphdef, tok_params) = cfg.sample, teacher["tokenizer"]
    length, code_dim = cfg.teacher.model.seq_len, codebook.shape[-1]
    fixed = {"tokenizer": tok_params, "codebook": codebook,
             "teacher": teacher["model"][1] if sc.teacher_start >= 0 else None}

    def fn(p, f, key, labels):
        k_noise, k_teacher = jax.random.split(key)
        noise = jax.random.normal(k_noise, (labels.shape[0], length, code_dim))
        if sc.teacher_start >= 0:
            run = teacher_sampler(cfg, teacher, (teacher["model"][0], f["teacher"]),
                                  k_teacher, labels)
            vectors, tokens, stats = teacher_involved(
                graphdef, p, run, labels, noise, f["codebook"], sc.steps[1], sc.teacher_start,
                sc.split)
            stats = {**stats, "target_passes": stats["student_passes"]
                     + stats["teacher_passes"]}
        else:
            vectors, tokens, passes = few_step(graphdef, p, labels, noise, f["codebook"],
                                               sc.steps, sc.split)
            stats = {"target_passes": passes}
        images = bind(tok_graphdef, f["tokenizer"]).decode_vectors(vectors)
        return Samples(images, {"tokens": tokens}, stats)
    return make_generator(fn, mesh, fixed)


def pair_noise_key(cfg) -> jax.Array:
    return jax.random.key(cfg.seed + 7)


def teacher_pairs(cfg, teacher, codebook, workdir, mesh, progress: bool = True):
    """() -> the pair cache (`CodeStore`): `cfg.pairs` examples, example i of label
    i mod classes with the teacher's flow-mapped tokens of the noise from fold_in(
    `pair_noise_key(cfg)`, i): teacher samples with their noise. Generated (or resumed) on
    the first call only."""
    model = cfg.teacher.model
    (vocab, code_dim) = codebook.shape
    encode = pair_encoder(flow_sampler(cfg, teacher), pair_noise_key(cfg), model.num_classes,
                          model.seq_len, code_dim, codebook, jnp.asarray(cfg.flow.grid()))
    producer = fingerprint(teacher["model"][1], teacher=model, sample=cfg.teacher.sample,
                           flow=cfg.flow, seed=cfg.seed, pairs=cfg.pairs,
                           tokenizer=fingerprint(teacher["tokenizer"][1]))
    return functools.cache(lambda: cached_codes(
        encode, IdSource(cfg.pairs, model.num_classes), workdir, "pairs", producer,
        cfg.pair_batch, mesh, codes_dtype(vocab), progress))


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    teacher = teacher_module(cfg).build(
        cfg.teacher, None if workdir is None else os.path.join(workdir, "teacher"), progress)
    summary = {f"teacher/{k}": v for k, v in teacher["summary"].items()}
    codebook = codebook_of(cfg, teacher["tokenizer"])
    model = cfg.teacher.model
    code_dim = codebook.shape[-1]
    noise_key = pair_noise_key(cfg)
    pairs = teacher_pairs(cfg, teacher, codebook, workdir, mesh, progress)
    student_fn = lambda: student_module(cfg, code_dim, teacher["model"][1])
    graphdef = split(nnx.eval_shape(lambda: student_module(cfg, code_dim)))[0]
    generate = make_sampler(cfg, graphdef, teacher, codebook, mesh)
    score = None
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        score = digits_scorer(generate, model.num_classes, cfg.eval_samples_per_class,
                              cfg.seed, open_source(cfg.data, "train").images)
    loss = functools.partial(dd1_loss, noise_key=noise_key, timesteps=cfg.timesteps,
                             cont_weight=cfg.cont_weight)
    load = ((lambda path: load_dd_raster(path, model, code_dim)) if cfg.family == "llamagen"
            else (lambda path: load_dd_var(path, model)))
    _, params = stage_weights(cfg, "student", student_fn, loss, lambda: PairSource(pairs()),
                              mesh, workdir, progress, load, summary, score, frozen=codebook)
    summary["student/params"] = param_count(params)
    summary["teacher/params"] = param_count(teacher["model"][1])
    return dict(generate=generate, params=params, summary=summary, score=score,
                step=cfg.student_train.steps, model=(graphdef, params), teacher=teacher,
                codebook=codebook, pairs=pairs)  # pairs() -> the pair cache


def _student_stage(steps: int, batch: int = 64, lr: float = 1e-3) -> StageConfig:
    return StageConfig(steps=steps, batch_size=batch, log_every=100, ckpt_every=1000,
                       eval_every=0, ema_decay=0.999, ema_warmup=True,
                       optim=OptimConfig(lr=lr, warmup_steps=100, b2=0.95, weight_decay=0.0))


DIGITS_LLAMAGEN = Config(
    data=DIGITS_DATA, llamagen=llamagen_imagenet.DIGITS, pairs=20_000, timesteps=(0, 20),
    student_train=_student_stage(2000), sample=DDSampleConfig(steps=(0,), split=20),
    eval_samples_per_class=40)

DIGITS_VAR = Config(
    data=DIGITS_DATA, var=var_imagenet.DIGITS, pairs=20_000, timesteps=(0, 3),
    student_train=_student_stage(2000), sample=DDSampleConfig(steps=(0,), split=3),
    eval_samples_per_class=40)


def imagenet_llamagen(size: str, split_t: int) -> Config:
    """The released LlamaGen-DD settings: teacher GPT-`size` (official weights via
    `llamagen.gpt_ckpt` / `llamagen.tokenizer_ckpt`) with cfg 2.0, top-k 8000; t2 = 80 tokens
    and the README's split. Training hyper-parameters are not public: AdamW(0.9, 0.95),
    lr 1e-4, batch 256, EMA 0.9999 are our choice."""
    teacher = dataclasses.replace(
        llamagen_imagenet.imagenet(size),
        sample=dataclasses.replace(llamagen_imagenet.imagenet(size).sample, cfg=2.0,
                                   top_k=8000, top_p=1.0))
    return Config(**_imagenet_common(teacher.data, teacher.sample_classes), llamagen=teacher,
                  timesteps=(0, 80), sample=DDSampleConfig(steps=(0,), split=split_t))


def imagenet_var(depth: int, t2: int) -> Config:
    """The released VAR-DD settings: teacher VAR-d`depth` (official weights via
    `var.var_ckpt` / `var.tokenizer_ckpt`) with the official ramp to 2.0 (weight 3.0 here),
    top-k 900, top-p 0.95; t2 and split from the README."""
    base = var_imagenet.imagenet(depth)
    teacher = dataclasses.replace(base, sample=dataclasses.replace(
        base.sample, cfg=3.0, top_k=900, top_p=0.95))
    return Config(**_imagenet_common(teacher.data, teacher.sample_classes), var=teacher,
                  timesteps=(0, t2), sample=DDSampleConfig(steps=(0,), split=t2))


def _imagenet_common(data, classes) -> dict:
    return dict(data=data, sample_classes=classes, pairs=1_281_167, pair_batch=256,
                student_train=StageConfig(
                    steps=100_000, batch_size=256, log_every=100, ckpt_every=5000,
                    ema_decay=0.9999, optim=OptimConfig(lr=1e-4, b2=0.95, weight_decay=0.0)),
                fid_samples_per_class=50)


PRESETS = {"digits_llamagen": DIGITS_LLAMAGEN, "digits_var": DIGITS_VAR,
           "imagenet256_llamagen_B": imagenet_llamagen("B", 80),
           "imagenet256_llamagen_L": imagenet_llamagen("L", 130),
           "imagenet256_var_d16": imagenet_var(16, 5),
           "imagenet256_var_d20": imagenet_var(20, 4),
           "imagenet256_var_d24": imagenet_var(24, 4)}


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "dd")


if __name__ == "__main__":
    main(sys.argv[1:])
