"""What an experiment reports: training summaries, digits scores and sample reports.

A report never overwrites an earlier one: it goes to `<workdir>/samples/<tag>/` (the tag
defaults to `step<N>`; a taken tag gets `-2`, `-3`, ... appended), so re-sampling a finished
work dir with other settings keeps every earlier grid, array and score.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from arjax import config as cfglib
from arjax import distributed
from arjax.images import save_grid
from arjax.writer import MetricWriter


def json_safe(value):
    """Nested values with NaN/inf as null (JSON has no NaN) and numpy scalars as Python."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str, data: dict) -> None:
    """Strict JSON (no bare NaN), written atomically."""
    with open(f"{path}.partial", "w") as f:
        json.dump(json_safe(data), f, indent=1, allow_nan=False)
    os.replace(f"{path}.partial", path)


def training_summary(name: str, history: list[dict]) -> dict:
    """The last logged loss (and reconstruction MSE, if logged) and speed of a stage, from its
    whole logged history (a stage finished by an earlier run reports the same values)."""
    logs = [h for h in history if "train/loss" in h]
    if not logs:
        return {}
    last = logs[-1]
    out = {f"{name}/final_loss": last["train/loss"],
           f"{name}/steps_per_s": last["time/steps_per_s"]}
    if "train/mse" in last:
        out[f"{name}/final_mse"] = last["train/mse"]
    return out


def digits_scorer(generate, num_classes: int, per_class: int, seed: int, reference_images):
    """params -> digits metrics of `per_class` class-balanced samples from
    `generate(params, labels, key) -> Generated` (FID-digits, class accuracy, ...)."""
    from arjax.evaluate import evaluate_digits
    from arjax.metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator.load()
    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)

    def score(params) -> dict:
        images = generate(params, labels, jax.random.key(seed + 1)).images
        return evaluate_digits(images, labels, reference_images, evaluator)
    return score


def report_dir(workdir: str, tag: str) -> str:
    """`<workdir>/samples/<tag>`, or `<tag>-2`, `<tag>-3`, ... when taken."""
    base = os.path.join(workdir, "samples", tag)
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    os.makedirs(path)
    return path


def save_samples(outdir: str, generated, labels: np.ndarray, per_row: int, step: int,
                 summary: dict, config) -> None:
    """`samples.png` (one row per class), `samples.npz` (images, labels and the sampler's
    per-sample arrays), TensorBoard (`tb/`: the grid and numeric summary values) and
    `summary.json` (config + summary)."""
    images = generated.images
    grid = save_grid(f"{outdir}/samples.png", images, per_row,
                     scale=max(1, 128 // images.shape[1]))
    np.savez(f"{outdir}/samples.npz", images=images, labels=labels, **generated.aux)
    writer = MetricWriter(f"{outdir}/tb")
    writer.image(step, "samples", grid)
    writer.scalars(step, {k: v for k, v in summary.items()
                          if isinstance(v, (int, float)) and math.isfinite(v)})
    writer.close()
    write_json(f"{outdir}/summary.json", {"config": cfglib.to_dict(config), **summary})


def fid_samples(generate, params, path: str, num_classes: int, per_class: int, batch: int,
                seed: int, progress: bool = True) -> dict:
    """The FID protocol's samples: `per_class` images of every class in class order (ADM's
    50 x 1000), sampled `batch` at a time (the last chunk filled up with repeated labels, so
    one compiled shape) and streamed to `path` (.npz: `arr_0` uint8 [N,H,W,3], `labels`), the
    file `python -m arjax.evaluate --samples` reads. Memory holds one chunk."""
    from tqdm.auto import tqdm

    labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
    main = distributed.is_main()
    partial, images, seconds = f"{path}.partial.npy", None, 0.0
    key = jax.random.key(seed + 2)
    chunks = range(0, len(labels), batch)
    for i, start in enumerate(tqdm(chunks, desc="FID samples", disable=not (progress and main))):
        chunk = labels[start:start + batch]
        out = generate(params, np.resize(chunk, batch), jax.random.fold_in(key, i))
        seconds += out.stats["seconds"]
        if not main:
            continue
        if images is None:
            images = np.lib.format.open_memmap(partial, "w+", np.uint8,
                                               (len(labels), *out.images.shape[1:]))
        images[start:start + len(chunk)] = out.images[:len(chunk)]
    if main:
        np.savez(path, arr_0=images, labels=labels)
        del images
        os.remove(partial)
    return {"fid/images": len(labels), "fid/seconds": seconds, "fid/samples": path}


def report(generate, params, cfg, workdir: str | None, summary: dict, step: int,
           score=None, tag: str | None = None) -> dict:
    """Scores the model (digits) and samples `cfg.samples_per_class` images of each of
    `cfg.sample_classes` (timed after a compiling call), records the sampler's stats under
    `sample/` and, with a work dir, saves everything to a new `samples/<tag>/`. Returns the
    summary with the images, labels and the report folder (process 0 writes it; call on
    every process)."""
    summary = dict(summary)
    if score:
        summary.update({f"eval/{k}": v for k, v in score(params).items()})
    labels = np.repeat(np.asarray(cfg.sample_classes, np.int32), cfg.samples_per_class)
    generate(params, labels, jax.random.key(cfg.seed))  # compile for this batch size
    generated = generate(params, labels, jax.random.key(cfg.seed))
    summary.update({"sample/images": len(labels),
                    **{f"sample/{k}": v for k, v in generated.stats.items()}})
    outdir = None
    if workdir and distributed.is_main():
        outdir = report_dir(workdir, tag or f"step{step}")
        summary["report_dir"] = outdir
    if cfg.fid_samples_per_class:  # every process samples; process 0 writes
        path = os.path.join(outdir or workdir or ".", "fid_samples.npz")
        summary.update(fid_samples(generate, params, path, cfg.model.num_classes,
                                   cfg.fid_samples_per_class, cfg.fid_batch, cfg.seed))
    if outdir:
        save_samples(outdir, generated, labels, cfg.samples_per_class, step, summary, cfg)
    return {**summary, "images": generated.images, "labels": labels}
