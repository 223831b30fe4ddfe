"""Input-pipeline throughput on a synthetic ImageNet-like folder: JPEG decode + each family's
training views, through `Batches` with 0, 1, 2 grain workers against the old synchronous path
(the same loader called in the training thread).

    python -m benchmarks.input_pipeline [--images 2000] [--batch 32] [--steps 12] [--rounds 3]

The folder (10 classes, 500x375 JPEGs of smooth random content, quality 90) is built once in
a temporary directory. Each round times `--steps` batches of every (views, path) pair in turn
(interleaved); the table gives the median and spread of images/s over rounds, with the load
average. The last column converts the best measured rate into the per-host rate an ImageNet
preset needs on a v5e-8 host if its tokenizer encoded online (8 chips x 197 TFLOP/s bf16 at 40 %
MFU, divided by the training FLOPs per image of docs/scaling.md): with cached codes, as arjax
trains by default, the host only reads ~1-64 KiB per image and decoding happens once, at
extraction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

VIEWS = {"llamagen (center_flip)": "center_flip", "var (var_crops, K=10)": "var_crops",
         "flowar (flowar_crops, K=10)": "flowar_crops"}
# Training FLOPs per image (6 * params * tokens, docs/scaling.md) of the presets' models.
FLOPS_PER_IMAGE = {"llamagen (center_flip)": ("GPT-B", 1.70e11),
                   "var (var_crops, K=10)": ("VAR-d16", 1.26e12),
                   "flowar (flowar_crops, K=10)": ("FlowAR-S", 3.51e11)}
V5E_HOST_FLOPS = 8 * 197e12 * 0.40


def build_folder(root: str, images: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = os.path.join(root, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def rate(root: str, views: str, path: str, batch: int, steps: int, start: int) -> float:
    import jax

    from arjax import sharding
    from arjax.data import Batches
    from arjax.data.sources import FolderSource

    source = FolderSource(root, 256, views, crops=10)
    mesh = sharding.make_mesh((("data", 1),), jax.devices()[:1])
    if path == "synchronous":
        batches = Batches(source, batch, 0, mesh, start)
        t0 = time.perf_counter()
        for s in range(start, start + steps):
            jax.block_until_ready(sharding.to_global(batches.local(s), mesh))
        return batch * steps / (time.perf_counter() - t0)
    workers = int(path.split()[0])
    batches = Batches(source, batch, 0, mesh, start, workers=workers, prefetch=2)
    jax.block_until_ready(next(batches))  # workers started, first batch ready
    t0 = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(next(batches))
    seconds = time.perf_counter() - t0
    batches.close()
    return batch * steps / seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    paths = ("synchronous", "0 workers (thread)", "1 workers", "2 workers")
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        build_folder(root, args.images)
        print(f"built {args.images} JPEGs in {time.perf_counter() - t0:.0f} s; "
              f"{os.cpu_count()} cores, load {os.getloadavg()}")
        rates = {(v, p): [] for v in VIEWS for p in paths}
        for r in range(args.rounds):
            for v in VIEWS:
                for p in paths:
                    start = 1 + r * (args.steps + 1)  # fresh images every round
                    rates[(v, p)].append(rate(root, VIEWS[v], p, args.batch, args.steps,
                                              start))
        print(f"load after {os.getloadavg()}")
    print("| recipe | path | images/s (median) | spread | needed per v5e-8 host if online |")
    print("|---|---|---|---|---|")
    for (v, p), values in rates.items():
        model, flops = FLOPS_PER_IMAGE[v]
        need = V5E_HOST_FLOPS / flops
        print(f"| {v} | {p} | {statistics.median(values):.0f} | {min(values):.0f}-"
              f"{max(values):.0f} | {model}: {need:,.0f} img/s |")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
