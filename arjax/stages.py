"""Pieces every experiment's pipeline shares: a training stage and cached code extraction.

A stage is one model trained by the shared `fit` loop in its own `<workdir>/<name>` folder
(checkpoints, TensorBoard, resume); code extraction tokenizes a split once and caches it, as
LlamaGen's extract_codes and VAR's pre-tokenisation do.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from arjax import config as cfglib
from arjax import sharding
from arjax.data import Batches
from arjax.data.sources import ArraySource
from arjax.images import save_grid
from arjax.models import split
from arjax.optim import OptimConfig, make_optimizer
from arjax.train import fit, init_state, make_train_step
from arjax.writer import MetricWriter


@dataclasses.dataclass(frozen=True)
class StageConfig:
    steps: int = 1000
    batch_size: int = 64
    optim: OptimConfig = OptimConfig()
    log_every: int = 50
    ckpt_every: int = 500
    eval_every: int = 0  # 0 = evaluate only at the end (digits: FID-digits etc. of samples)


def train_stage(name: str, module_fn, loss_fn, stage: StageConfig, source, seed: int, mesh,
                workdir, progress=True, evaluate=None):
    """Trains one stage (or resumes / loads it when complete); returns (graphdef, params,
    logged history)."""
    graphdef, _ = split(nnx.eval_shape(module_fn))
    tx = make_optimizer(stage.optim)
    state, history = fit(
        name=name, init_fn=lambda: init_state(split(module_fn())[1], tx, seed),
        train_step=make_train_step(graphdef, loss_fn, tx),
        make_batches=lambda start: Batches(source, stage.batch_size, seed, mesh, start),
        steps=stage.steps, mesh=mesh, workdir=workdir, log_every=stage.log_every,
        ckpt_every=stage.ckpt_every, evaluate=evaluate, eval_every=stage.eval_every,
        progress=progress)
    return graphdef, state.params, history


class CodesSource(ArraySource):
    """Pre-extracted codes: rows are {"codes": int32 [L] (or float moments), "label"}."""

    def __getitem__(self, indices):
        return {"codes": self.images[indices], "label": self.labels[indices]}


def extract_codes(encode, source, batch: int, cache_path: str | None) -> CodesSource:
    """Tokenizes a whole split once with `encode(uint8 images) -> codes [B, ...]` (jitted by
    the caller; int codes, or a KL-VAE's float posterior moments), cached as .npz."""
    if cache_path and os.path.exists(cache_path):
        data = np.load(cache_path)
        return CodesSource(data["codes"], data["label"], source.num_classes)
    codes, labels = [], []
    for start in tqdm(range(0, source.num_examples, batch), desc="extract codes"):
        rows = source[np.arange(start, min(start + batch, source.num_examples))]
        codes.append(np.asarray(jax.device_get(encode(rows["image"]))))
        labels.append(rows["label"])
    codes, labels = np.concatenate(codes), np.concatenate(labels)
    if cache_path:
        np.savez(cache_path, codes=codes, label=labels)
    return CodesSource(codes, labels, source.num_classes)


def check_stages(cfg, mesh, *names: str) -> None:
    """For each stage `name`: `cfg.<name>_ckpt` exists if set, otherwise `cfg.<name>_train`
    has steps and a batch that fills the mesh."""
    for name in names:
        ckpt, stage = getattr(cfg, f"{name}_ckpt"), getattr(cfg, f"{name}_train")
        if ckpt is not None:
            cfglib.check(os.path.exists(ckpt), f"{name}_ckpt {ckpt!r} does not exist")
            continue
        cfglib.check(stage.steps > 0, f"{name}_train.steps must be > 0 (or set {name}_ckpt)")
        sharding.check_batch(stage.batch_size, mesh, f"{name}_train.batch_size")


def training_summary(name: str, history: list[dict]) -> dict:
    """The last logged loss and speed of a stage (empty when it was loaded, not trained)."""
    logs = [h for h in history if "train/loss" in h]
    if not logs:
        return {}
    return {f"{name}/final_loss": logs[-1]["train/loss"],
            f"{name}/steps_per_s": logs[-1]["time/steps_per_s"]}


def check_sampling(cfg, num_classes: int, mesh) -> None:
    """The sampling fields every experiment config has (sample_classes, samples_per_class,
    eval_samples_per_class, data.name): classes in range, batches that fill the mesh."""
    cfglib.check(all(0 <= c < num_classes for c in cfg.sample_classes),
                 f"sample_classes must lie in [0, {num_classes})")
    sharding.check_batch(cfg.samples_per_class * len(cfg.sample_classes), mesh,
                         "samples_per_class * len(sample_classes)")
    if cfg.data.name == "digits" and cfg.eval_samples_per_class:
        sharding.check_batch(cfg.eval_samples_per_class * num_classes, mesh,
                             "eval_samples_per_class * model.num_classes")


def save_samples(workdir: str, images: np.ndarray, labels: np.ndarray, per_row: int,
                 step: int, summary: dict, config, **arrays) -> None:
    """The end of every sampling pipeline: `samples.png` (one row per class), `samples.npz`
    (images, labels and `arrays`), TensorBoard (`sample_tb`: the grid and numeric summary
    values) and `summary.json` (config + summary)."""
    grid = save_grid(f"{workdir}/samples.png", images, per_row,
                     scale=max(1, 128 // images.shape[1]))
    np.savez(f"{workdir}/samples.npz", images=images, labels=labels, **arrays)
    writer = MetricWriter(f"{workdir}/sample_tb")
    writer.image(step, "samples", grid)
    writer.scalars(step, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
    writer.close()
    with open(f"{workdir}/summary.json", "w") as f:
        json.dump({"config": cfglib.to_dict(config), **summary}, f, indent=1)


def digits_scorer(generate, num_classes: int, per_class: int, seed: int, reference_images):
    """params -> digits metrics of `per_class` class-balanced samples from
    `generate(params, labels, key) -> (uint8 images, ...)` (FID-digits, class accuracy, ...)."""
    from arjax.evaluate import evaluate_digits
    from arjax.metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator.load()
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)

    def score(params) -> dict:
        images = generate(params, labels, jax.random.key(seed + 1))[0]
        return evaluate_digits(images, labels, reference_images, evaluator)
    return score


def final_samples(generate, params, classes, per_class: int, seed: int, workdir, step: int,
                  summary: dict, config, array_name: str) -> dict:
    """Samples `per_class` images of each class (timed after a compiling call), records the
    sampler's stats under `sample/` and saves everything (`save_samples`)."""
    labels = np.repeat(np.asarray(classes, np.int32), per_class)
    generate(params, labels, jax.random.key(seed))  # compile for this batch size
    images, arrays, stats = generate(params, labels, jax.random.key(seed))
    summary.update({"sample/images": len(labels),
                    **{f"sample/{k}": v for k, v in stats.items()}})
    if workdir:
        save_samples(workdir, images, labels, per_class, step, summary, config,
                     **{array_name: arrays})
    summary["images"] = images
    summary["labels"] = labels
    return summary


def cli(presets, run, argv, doc: str, name: str) -> None:
    """`python -m experiments.<name> --config PRESET [--set k=v] [--workdir DIR]`."""
    cfg, args = cfglib.from_argv(presets, argv, doc)
    workdir = args.workdir or f"runs/{name}_{args.config}"
    summary = run(cfg, workdir)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, np.ndarray)},
                     indent=1))
    print(f"samples: {workdir}/samples.png (one row per class)")
