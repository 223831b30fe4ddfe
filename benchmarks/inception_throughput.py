"""Images/s of FID Inception features (pool_3, spatial, probs) on this machine.

    python -m benchmarks.inception_throughput [--batch 64] [--images 256] [--size 256]

Random weights (speed does not depend on them); uint8 inputs at --size px, resized to 299 inside
the jitted forward; compilation excluded. The path is `arjax.evaluate.inception_features`.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import torch
from flax import nnx

from arjax import evaluate
from arjax.convert import torch_io
from arjax.metrics import inception
from arjax.models import split


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--weights", default="/tmp/arjax_random_inception.pth")
    args = parser.parse_args(argv)
    _, params = split(inception.FIDInception(rngs=nnx.Rngs(0)))
    torch.save({k: torch.from_numpy(v.copy()) for k, v in
                torch_io.export(params, torch_io.default_torch_name).items()}, args.weights)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3),
                                               dtype=np.uint8)
    evaluate.inception_features(images[:args.batch], args.weights, args.batch, progress=False)
    t0 = time.perf_counter()
    evaluate.inception_features(images, args.weights, args.batch, progress=False)
    seconds = time.perf_counter() - t0
    print(f"inception features: {args.images / seconds:.1f} images/s "
          f"({args.images} images of {args.size}px, batch {args.batch}, "
          f"{len(jax.devices())} x {jax.devices()[0].device_kind})")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
