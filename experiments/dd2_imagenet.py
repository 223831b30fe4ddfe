"""Distilled Decoding 2 (conditional score distillation, arXiv 2510.21003): a VAR teacher
turned into a one-step generator by score distillation (`arjax.distill.score`).

Run:   python -m experiments.dd2_imagenet --config digits_var --workdir runs/dd2_var
       python -m experiments.dd2_imagenet --config imagenet256_var_d16 --workdir /ckpt/dd2 \
           --set var.var_ckpt=/weights/var_d16.pth --set var.tokenizer_ckpt=/weights/vae.pth
Teacher-refined sampling (the paper's Algorithm 4: the teacher re-samples the last scales):
       ... --set sample.teacher_scales=2

Stages: (1) the teacher (`experiments.var_imagenet`, its config under `var`) in
`<workdir>/teacher`; (2) teacher samples: DD1's pair cache (`experiments.dd_imagenet`,
`<workdir>/codes`; the flow map draws the teacher's law); (3) `gts_head` then `gts`: one
AR-diffusion model (VAR's trunk + an MLP velocity head) fit to the teacher's exact
conditional velocity on those samples, head only then whole (GTS); (4) `csd`: generator and
guidance network both start from it and alternate, `guide_updates` FCS updates of the
guidance network per CSD update of the generator, with an EMA of the generator; (5) samples
from the EMA generator in one pass (PNG grid, digits scores, summary). Every stage resumes.
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
from arjax.data import Batches
from arjax.distill.objective import IdSource, PairSource
from arjax.distill.score import (
    ScoreVAR,
    Teacher,
    gts_loss,
    make_csd_step,
    one_step,
    score_from_teacher,
)
from arjax.experiment.base import DIGITS_DATA, ExperimentConfig
from arjax.experiment.cli import cli, run_experiment
from arjax.experiment.outputs import digits_scorer, training_summary
from arjax.experiment.pipeline import StageConfig, check_sampling, train_stage
from arjax.models import bind, param_count, split
from arjax.nn.layers import nearest_code
from arjax.nn.scales import scale_bounds
from arjax.optim import OptimConfig, make_optimizer
from arjax.sampling import var as var_sampling
from arjax.sampling.generator import Samples, make_generator
from arjax.train import fit, init_state
from experiments import dd_imagenet, var_imagenet


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """The score networks' head and noise law (the paper gives neither exactly)."""
    head_width: int = 1024  # MAR's diffusion MLP (MAR-B's width and depth)
    head_depth: int = 6
    copies: int = 4  # noised copies per token (MAR's diffusion_batch_mul; the paper's m)
    t_min: float = 0.02  # t ~ U(t_min, t_max) for GTS, FCS and CSD
    t_max: float = 1.0


@dataclasses.dataclass(frozen=True)
class DD2SampleConfig:
    teacher_scales: int = 0  # > 0: the teacher re-samples the last scales (Algorithm 4)


@dataclasses.dataclass(frozen=True)
class Config(ExperimentConfig):
    var: var_imagenet.Config = var_imagenet.DIGITS  # the teacher
    flow: dd_imagenet.FlowConfig = dd_imagenet.FlowConfig()  # teacher samples: DD1's pairs
    pairs: int = 1_281_167
    pair_batch: int = 256
    score: ScoreConfig = ScoreConfig()
    head_train: StageConfig = StageConfig()  # GTS, the trunk fixed (0 steps: skipped)
    gts_train: StageConfig = StageConfig()  # GTS, the whole model
    csd_train: StageConfig = StageConfig()  # the generator's steps, optimizer and EMA
    guide_optim: OptimConfig = OptimConfig()  # the guidance network's optimizer
    guide_updates: int = 5  # FCS updates per generator update (the paper's K)
    sample: DD2SampleConfig = DD2SampleConfig()

    family = "var"  # what `dd_imagenet`'s pair cache reads

    @property
    def teacher(self) -> var_imagenet.Config:
        return self.var


def validate(cfg: Config, mesh) -> None:
    check = cfglib.check
    check(cfg.data == cfg.var.data, f"data must be the teacher's (var.data); got {cfg.data} "
          f"and {cfg.var.data}")
    var_imagenet.validate(cfg.var, mesh)
    check(not cfg.var.sample.smooth, "DD2's teacher law is over hard codes: var.sample.smooth")
    sc = cfg.score
    check(sc.head_width >= 1 and sc.head_depth >= 1 and sc.copies >= 1,
          "score.head_width, score.head_depth and score.copies must be >= 1")
    check(0 < sc.t_min < sc.t_max <= 1,
          f"score.t_min and score.t_max need 0 < t_min < t_max <= 1, got {sc.t_min}, "
          f"{sc.t_max}")
    check(cfg.guide_updates >= 1, f"guide_updates must be >= 1, got {cfg.guide_updates}")
    scales = len(cfg.var.model.patch_nums)
    check(0 <= cfg.sample.teacher_scales < scales,
          f"sample.teacher_scales must be in [0, {scales}), got {cfg.sample.teacher_scales}")
    check(cfg.pairs >= max(cfg.gts_train.batch_size, cfg.csd_train.batch_size)
          and cfg.pair_batch >= 1, f"pairs={cfg.pairs} must hold one batch of every stage")
    for name in ("head_train", "gts_train", "csd_train"):
        stage = getattr(cfg, name)
        stage.validate(name)
        sharding.check_batch(stage.batch_size, mesh, f"{name}.batch_size")
    check(cfg.gts_train.steps > 0 and cfg.csd_train.steps > 0,
          "gts_train.steps and csd_train.steps must be > 0")
    cfg.guide_optim.validate("guide_optim")
    sharding.check_batch(cfg.pair_batch, mesh, "pair_batch")
    check_sampling(cfg, cfg.var.model.num_classes, mesh)


def score_module(cfg: Config, teacher_params=None):
    module = ScoreVAR(cfg.var.model, cfg.score.head_width, cfg.score.head_depth,
                      rngs=nnx.Rngs(cfg.seed + 11))
    if teacher_params is None:
        return module
    graphdef, params = split(module)
    return bind(graphdef, score_from_teacher(params, teacher_params))


def init_model(cfg: Config, teacher, pairs, frozen, mesh, workdir, progress, summary):
    """Stage 1 (GTS): the AR-diffusion model both DD2 networks start from."""
    spec = Teacher(teacher["model"][0], teacher["tokenizer"][0], cfg.var.sample)
    loss = functools.partial(gts_loss, teacher=spec, copies=cfg.score.copies,
                             t_range=(cfg.score.t_min, cfg.score.t_max))
    module_fn = lambda: score_module(cfg, teacher["model"][1])
    rules = sharding.rules_named(cfg.param_sharding)
    for name, head_only in (("gts_head", True), ("gts", False)):
        stage = cfg.head_train if head_only else cfg.gts_train
        if stage.steps == 0:
            continue
        graphdef, weights, history = train_stage(
            name, module_fn, functools.partial(loss, head_only=head_only), stage,
            PairSource(pairs()), cfg.seed, mesh, workdir, progress, rules=rules,
            workers=cfg.data.workers, prefetch=cfg.data.prefetch, frozen=frozen)
        summary.update(training_summary(name, history))
        module_fn = functools.partial(bind, graphdef, weights)
    return module_fn


def train_generator(cfg: Config, teacher, init_fn, frozen, mesh, workdir, progress, summary,
                    score=None):
    """Stage 2 (CSD): returns the generator's (EMA) weights."""
    stage = cfg.csd_train
    graphdef = split(nnx.eval_shape(lambda: score_module(cfg)))[0]
    tx_gen, tx_guide = make_optimizer(stage.optim), make_optimizer(cfg.guide_optim)
    spec = Teacher(teacher["model"][0], teacher["tokenizer"][0], cfg.var.sample)
    step = make_csd_step(graphdef, spec, tx_gen, tx_guide, guide_updates=cfg.guide_updates,
                         copies=cfg.score.copies, t_range=(cfg.score.t_min, cfg.score.t_max),
                         ema_decay=stage.ema_decay, ema_warmup=stage.ema_warmup)

    def init():
        params = split(init_fn())[1]
        return init_state({"gen": params, "guide": params}, {"gen": tx_gen, "guide": tx_guide},
                          cfg.seed + 13, ema="gen")

    weights = lambda state: state.ema if stage.samples_from_ema else state.params["gen"]
    state, history = fit(
        name="csd", init_fn=init, train_step=step,
        make_batches=lambda start: Batches(IdSource(cfg.pairs, cfg.var.model.num_classes),
                                           stage.batch_size, cfg.seed, mesh, start),
        steps=stage.steps, mesh=mesh, workdir=workdir,
        rules=sharding.rules_named(cfg.param_sharding), log_every=stage.log_every,
        ckpt_every=stage.ckpt_every, eval_every=stage.eval_every, progress=progress,
        evaluate=(lambda st: score(weights(st))) if score else None, frozen=frozen)
    summary.update(training_summary("csd", history))
    return graphdef, weights(state)


def make_sampler(cfg: Config, graphdef, teacher, mesh):
    """params -> Generated: the generator's one pass, decoded from its vectors; with
    `sample.teacher_scales` the generated scales before them are snapped to codes and the
    teacher samples the rest (the paper's teacher-refined multi-step sampling)."""
    (var_graphdef, var_params), (vae_graphdef, vae_params) = (teacher["model"],
                                                              teacher["tokenizer"])
    patch = cfg.var.model.patch_nums
    keep = len(patch) - cfg.sample.teacher_scales
    fixed = {"tokenizer": vae_params,
             "teacher": var_params if cfg.sample.teacher_scales else None}

    def fn(p, f, key, labels):
        k_noise, k_teacher = jax.random.split(key)
        vae = bind(vae_graphdef, f["tokenizer"])
        noise = jax.random.normal(k_noise, (labels.shape[0], cfg.var.model.seq_len,
                                            cfg.var.model.codebook_dim))
        vectors = one_step(bind(graphdef, p), vae.quantize, labels, noise)
        codes = nearest_code(vectors, vae.quantize.embedding.embedding[...])
        if not cfg.sample.teacher_scales:
            return Samples(vae.decode_vectors(vectors), {"tokens": codes},
                           {"target_passes": jnp.int32(1)})
        prefix = [codes[:, a:b] for a, b in scale_bounds(patch)[:keep]]
        out = var_sampling.sample(var_graphdef, f["teacher"], vae_graphdef, f["tokenizer"],
                                  k_teacher, labels, cfg.var.sample, prefix=prefix)
        passes = out.stats["target_passes"]
        return Samples(out.images, {"tokens": out.aux["codes"]},
                       {"target_passes": 1 + passes, "teacher_passes": passes})
    return make_generator(fn, mesh, fixed)


def build(cfg: Config, workdir: str | None, progress: bool = True) -> dict:
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    teacher = var_imagenet.build(
        cfg.var, None if workdir is None else os.path.join(workdir, "teacher"), progress)
    summary = {f"teacher/{k}": v for k, v in teacher["summary"].items()}
    codebook = dd_imagenet.codebook_of(cfg, teacher["tokenizer"])
    pairs = dd_imagenet.teacher_pairs(cfg, teacher, codebook, workdir, mesh, progress)
    frozen = {"teacher": teacher["model"][1], "tokenizer": teacher["tokenizer"][1]}
    graphdef = split(nnx.eval_shape(lambda: score_module(cfg)))[0]
    generate = make_sampler(cfg, graphdef, teacher, mesh)
    score = None
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        from arjax.data import open_source

        score = digits_scorer(generate, cfg.var.model.num_classes, cfg.eval_samples_per_class,
                              cfg.seed, open_source(cfg.data, "train").images)
    init_fn = init_model(cfg, teacher, pairs, frozen, mesh, workdir, progress, summary)
    graphdef, params = train_generator(cfg, teacher, init_fn, frozen, mesh, workdir, progress,
                                       summary, score)
    summary["generator/params"] = param_count(params)
    summary["teacher/params"] = param_count(teacher["model"][1])
    return dict(generate=generate, params=params, summary=summary, score=score,
                step=cfg.csd_train.steps, model=(graphdef, params), teacher=teacher)


def _stage(steps: int, lr: float, batch: int = 64, ema: float = 0.0) -> StageConfig:
    return StageConfig(steps=steps, batch_size=batch, log_every=50, ckpt_every=500,
                       ema_decay=ema, ema_warmup=ema > 0,
                       optim=OptimConfig(lr=lr, warmup_steps=50, b2=0.95, weight_decay=0.0))


# Sized for minutes on a 2-core CPU (the cost is the MLP head on every token's noised
# copies): 2 copies, K = 3 guidance updates at batch 32 (the paper: K = 5).
DIGITS_VAR = Config(
    data=DIGITS_DATA, var=dd_imagenet.DIGITS_VAR.var, pairs=20_000,
    score=ScoreConfig(head_width=128, head_depth=3, copies=2),
    head_train=_stage(300, 1e-3), gts_train=_stage(300, 3e-4),
    csd_train=_stage(500, 1e-4, batch=32, ema=0.999),
    guide_optim=OptimConfig(lr=1e-4, warmup_steps=50, b2=0.95, weight_decay=0.0),
    guide_updates=3, eval_samples_per_class=40)


def imagenet_var(depth: int) -> Config:
    """The paper's VAR settings (Tables 10-11): teacher with cfg 2.0 (3.0 in arjax's weight
    convention), top-k 900, top-p 0.95; GTS head-only then whole at lr 2e-4, batch 512;
    CSD with Adam(0.9, 0.95) warmed up from 1e-6 to 2e-4 for both networks, K = 5 guidance
    updates per generator update (the paper drops to 2 after its performance alignment, not
    implemented), EMA 0.9999 with the (1 + t) / (10 + t) warm-up. Iterations are the
    paper's (before alignment)."""
    base = dd_imagenet.imagenet_var(depth, 5).var
    steps = {16: (300_000, 30_000, 8_000), 20: (300_000, 30_000, 16_000),
             24: (200_000, 30_000, 15_000)}[depth]
    optim = lambda lr, warmup: OptimConfig(lr=lr, warmup_steps=warmup, b2=0.95, weight_decay=0.0)
    big = lambda n, lr, warmup, ema=0.0: StageConfig(
        steps=n, batch_size=512, log_every=100, ckpt_every=5000, ema_decay=ema,
        ema_warmup=ema > 0, optim=optim(lr, warmup))
    return Config(data=base.data, var=base, sample_classes=base.sample_classes,
                  pairs=1_281_167, head_train=big(steps[0], 2e-4, 0),
                  gts_train=big(steps[1], 2e-4, 0),
                  csd_train=big(steps[2], 2e-4, 8_000, 0.9999),
                  guide_optim=optim(2e-4, 40_000), guide_updates=5,
                  fid_samples_per_class=50)


PRESETS = {"digits_var": DIGITS_VAR, "imagenet256_var_d16": imagenet_var(16),
           "imagenet256_var_d20": imagenet_var(20), "imagenet256_var_d24": imagenet_var(24)}


def run(cfg: Config, workdir: str | None, progress: bool = True, tag: str | None = None
        ) -> dict:
    return run_experiment(build, cfg, workdir, progress, tag)


def main(argv: Sequence[str]) -> None:
    cli(PRESETS, run, argv, __doc__, "dd2")


if __name__ == "__main__":
    main(sys.argv[1:])
