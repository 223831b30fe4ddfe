"""Pipeline pieces every experiment shares: training stages, early checks, cached codes.

A stage is one model trained by the shared `fit` loop in its own `<workdir>/<name>` folder
(checkpoints, TensorBoard, resume); code extraction tokenizes a split once (every view of
every image: the family's flips / crops) into a sharded cache, as LlamaGen's extract_codes
and MAR's cache do. A cache is named by what produced it (the tokenizer's parameters, the
data and its views) and is extracted anew when that changes.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from arjax import config as cfglib
from arjax import distributed, sharding
from arjax.data import Batches, cache
from arjax.data.cache import CodeStore
from arjax.experiment.outputs import training_summary
from arjax.models import split
from arjax.optim import OptimConfig, make_optimizer
from arjax.train import fit, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class StageConfig:
    steps: int = 1000
    batch_size: int = 64
    optim: OptimConfig = OptimConfig()
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 0  # 0 = evaluate only at the end (digits: FID-digits etc. of samples)
    ema_decay: float = 0.0  # EMA of the weights (FlowAR/MAR: 0.9999); 0 = none
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)) (not official)
    use_ema: bool = True  # sample and evaluate with the EMA weights when there is an EMA

    def validate(self, name: str) -> None:
        cfglib.check(self.steps >= 0, f"{name}.steps must be >= 0, got {self.steps}")
        for field in ("batch_size", "log_every", "ckpt_every"):
            value = getattr(self, field)
            cfglib.check(value >= 1, f"{name}.{field} must be >= 1, got {value}")
        cfglib.check(self.eval_every >= 0,
                     f"{name}.eval_every must be >= 0 (0 = at the end), got {self.eval_every}")
        cfglib.check(0 <= self.ema_decay < 1,
                     f"{name}.ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        self.optim.validate(f"{name}.optim")

    @property
    def samples_from_ema(self) -> bool:
        return self.ema_decay > 0 and self.use_ema


class PlannedStage(NamedTuple):
    """What `arjax.plan` compiles: a stage's model, loss, training config and the shapes of
    one example of its batches (no leading batch axis)."""
    name: str
    module_fn: Callable
    loss_fn: Callable
    stage: StageConfig
    example: dict[str, jax.ShapeDtypeStruct]
    model_cfg: object


def sampling_weights(state, stage: StageConfig):
    """The weights a stage samples and evaluates with: the EMA unless `use_ema` is off."""
    return state.ema if stage.samples_from_ema else state.params


def stage_program(module_fn, loss_fn, stage: StageConfig, seed: int = 0):
    """What a stage trains with: (graphdef, init_fn() -> TrainState, train_step(state,
    batch)), with the optimizer of `stage.optim` and an EMA when `stage.ema_decay` > 0. `fit`,
    the memory planner and the train-step benchmark all run this."""
    graphdef = split(nnx.eval_shape(module_fn))[0]
    tx = make_optimizer(stage.optim)
    init_fn = lambda: init_state(split(module_fn())[1], tx, seed, ema=stage.ema_decay > 0)
    return graphdef, init_fn, make_train_step(graphdef, loss_fn, tx, stage.ema_decay,
                                              stage.ema_warmup)


def train_stage(name: str, module_fn, loss_fn, stage: StageConfig, source, seed: int, mesh,
                workdir, progress=True, evaluate=None,
                rules: tuple[sharding.Rule, ...] = sharding.DEFAULT_RULES,
                workers: int = 0, prefetch: int = 2, frozen=None):
    """Trains one stage (or resumes / loads it when complete); returns (graphdef, weights,
    logged history, earlier runs' rows included). `evaluate(weights) -> {name: value}` and the
    returned weights are the EMA's when the stage keeps one (`sampling_weights`). `workers`
    and `prefetch` configure the input pipeline (`Batches`); `frozen` weights go to every
    step (`fit`)."""
    graphdef, init_fn, train_step = stage_program(module_fn, loss_fn, stage, seed)
    state, history = fit(
        name=name, init_fn=init_fn, train_step=train_step,
        make_batches=lambda start: Batches(source, stage.batch_size, seed, mesh, start,
                                           workers, prefetch),
        steps=stage.steps, mesh=mesh, workdir=workdir, rules=rules,
        log_every=stage.log_every, ckpt_every=stage.ckpt_every,
        evaluate=(lambda st: evaluate(sampling_weights(st, stage))) if evaluate else None,
        eval_every=stage.eval_every, progress=progress, frozen=frozen)
    return graphdef, sampling_weights(state, stage), history


def stage_weights(cfg, name: str, module_fn, loss_fn, data, mesh, workdir, progress: bool,
                  load, summary: dict, evaluate=None, frozen=None):
    """One stage's (graphdef, weights): `cfg.<name>_ckpt` converted by `load(path)` and placed
    once on the mesh, or the stage trained (resumed) per `cfg.<name>_train` on `data()` (only
    called when training), its summary added to `summary`. Weights land in the layout of
    `cfg.param_sharding` either way."""
    rules = sharding.rules_named(cfg.param_sharding)
    path = getattr(cfg, f"{name}_ckpt")
    if path:
        return split(nnx.eval_shape(module_fn))[0], sharding.place(load(path), mesh, rules)
    graphdef, weights, history = train_stage(
        name, module_fn, loss_fn, getattr(cfg, f"{name}_train"), data(), cfg.seed, mesh,
        workdir, progress, evaluate, rules, cfg.data.workers, cfg.data.prefetch, frozen)
    summary.update(training_summary(name, history))
    return graphdef, weights


def check_stages(cfg, mesh, *names: str) -> None:
    """`cfg.param_sharding` names a rule set, and for each stage `name`: `cfg.<name>_ckpt`
    exists if set, otherwise `cfg.<name>_train` is valid, has steps and a batch that fills the
    mesh."""
    sharding.rules_named(cfg.param_sharding)
    for name in names:
        ckpt, stage = getattr(cfg, f"{name}_ckpt"), getattr(cfg, f"{name}_train")
        stage.validate(f"{name}_train")
        if ckpt is not None:
            cfglib.check(os.path.isfile(ckpt), f"{name}_ckpt {ckpt!r} does not exist")
            continue
        cfglib.check(stage.steps > 0, f"{name}_train.steps must be > 0 (or set {name}_ckpt)")
        sharding.check_batch(stage.batch_size, mesh, f"{name}_train.batch_size")


def check_sampling(cfg, num_classes: int, mesh) -> None:
    """The sampling fields of `ExperimentConfig`: classes in range, batches that fill the
    mesh."""
    cfglib.check(len(cfg.sample_classes) > 0 and cfg.samples_per_class >= 1,
                 "sample_classes must be non-empty and samples_per_class >= 1")
    cfglib.check(all(0 <= c < num_classes for c in cfg.sample_classes),
                 f"sample_classes must lie in [0, {num_classes})")
    cfglib.check(cfg.encode_batch >= 1, f"encode_batch must be >= 1, got {cfg.encode_batch}")
    cfglib.check(cfg.fid_samples_per_class >= 0, "fid_samples_per_class must be >= 0")
    if cfg.fid_samples_per_class:
        sharding.check_batch(cfg.fid_batch, mesh, "fid_batch")
    sharding.check_batch(cfg.samples_per_class * len(cfg.sample_classes), mesh,
                         "samples_per_class * len(sample_classes)")
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        sharding.check_batch(cfg.eval_samples_per_class * num_classes, mesh,
                             "eval_samples_per_class * model.num_classes")


def fingerprint(params, **producer) -> str:
    """A hash of everything that determines a split's codes: the tokenizer's parameters
    (bytes) and the JSON-able `producer` facts (tokenizer config, data config, split...)."""
    digest = hashlib.sha256(json.dumps(producer, sort_keys=True, default=str).encode())
    for leaf in jax.tree.leaves(distributed.gather_tree(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()[:16]


def cached_codes(encode, source, workdir: str | None, name: str, producer: str, batch: int,
                 mesh, dtype=None, progress: bool = True) -> CodeStore:
    """The codes of `source` (every view of every row) from the cache
    `<workdir>/codes/<name>-<producer>/`, extracted (or resumed) first if incomplete
    (`arjax.data.cache.extract`). The directory is named by the producer's fingerprint, so a
    tokenizer that trained on gets a new cache; the superseded caches of `name` are deleted
    once the new one is complete. Without a work dir the cache lives in a temporary folder."""
    if workdir is None:
        root = tempfile.mkdtemp(prefix="arjax-codes-")
        atexit.register(shutil.rmtree, root, True)
    else:
        root = os.path.join(workdir, "codes")
    path = os.path.join(root, f"{name}-{producer}")
    store = cache.extract(encode, source, path, producer, batch, mesh, dtype,
                          progress=progress)
    if distributed.is_main():
        for stale in glob.glob(os.path.join(root, f"{name}-*")):
            if stale != path:
                print(f"removing the superseded code cache {stale}")
                shutil.rmtree(stale, ignore_errors=True)
    return store


def codes_dtype(vocab_size: int):
    """uint16 storage for token ids when the vocabulary fits (half of int32's bytes)."""
    return np.uint16 if vocab_size <= 2**16 else np.int32
