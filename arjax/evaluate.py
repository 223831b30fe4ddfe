"""Evaluate generated samples against a reference set, as the ADM evaluator does.

    python -m arjax.evaluate --samples S.npz --reference VIRTUAL_imagenet256_labeled.npz
    python -m arjax.evaluate --samples S.npz --reference tfds:imagenet2012:validation
    python -m arjax.evaluate --samples S.npz --reference digits:train   # digits evaluator

Samples: an .npz with `images` (or ADM's `arr_0`) uint8 [N,H,W,3] and optional `labels`, or a
directory of PNGs. Reference: `digits:<split>`, `tfds:<name>:<split>[:<size>]`, or an .npz /
directory of images (an ADM reference batch's precomputed mu/sigma/mu_s/sigma_s are used for
FID/sFID, its images for precision/recall, exactly as ADM). The evaluator is Inception
(FID, sFID, IS, precision, recall) unless the reference is `digits:*` (FID-digits, IS-digits,
precision, recall, class accuracy). Results are printed and written as JSON next to the samples.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys

import numpy as np
from PIL import Image

from arjax.metrics.fid import FeatureStats, frechet_distance
from arjax.metrics.inception_score import inception_score
from arjax.metrics.precision_recall import precision_recall


def load_images(spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """npz file, PNG directory or `digits:<split>` -> (images, labels or None)."""
    if spec.startswith("digits:"):
        from arjax.data.sources import digits

        source = digits(spec.split(":", 1)[1], 32)
        return source.images, source.labels
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(spec, "*.png")))
        if not files:
            raise FileNotFoundError(f"no .png files in directory {spec!r}")
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), None
    if not os.path.exists(spec):
        raise FileNotFoundError(f"{spec!r} is neither a file, a directory nor digits:<split>")
    data = np.load(spec)
    key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
    if key is None:
        raise KeyError(f"{spec!r} has no 'images' or 'arr_0' array (found {list(data.keys())})")
    return data[key], data["labels"] if "labels" in data else None


def evaluate_digits(images, labels=None, reference=None, evaluator=None) -> dict[str, float]:
    """All digits-domain metrics of `images` against `reference` images (default: train)."""
    from arjax.data.sources import digits
    from arjax.metrics.digits import DigitsEvaluator

    evaluator = evaluator or DigitsEvaluator.load()
    reference = digits("train", 32).images if reference is None else reference
    feats, probs = evaluator.features_and_probs(images)
    ref_feats, _ = evaluator.features_and_probs(reference)
    precision, recall = precision_recall(ref_feats, feats)
    results = {
        "fid_digits": frechet_distance(FeatureStats.of(feats), FeatureStats.of(ref_feats)),
        "is_digits": inception_score(probs),
        "precision": precision,
        "recall": recall,
        "num_samples": len(images),
    }
    if labels is not None:
        results["class_accuracy"] = float(np.mean(np.argmax(probs, -1) == np.asarray(labels)))
    return results


@functools.lru_cache(maxsize=2)
def _inception(weights: str | None):
    """Loaded once per weights file; the jitted forward compiles once per batch shape."""
    import jax

    from arjax import sharding
    from arjax.metrics import inception
    from arjax.models import bind

    graphdef, params = inception.load(weights)
    mesh = sharding.make_mesh((("data", -1),))
    fn = jax.jit(lambda p, x: bind(graphdef, p)(x), out_shardings=sharding.replicated(mesh))
    return params, fn, mesh


def inception_features(images, weights: str | None = None, batch: int = 64,
                       progress: bool = True) -> dict[str, np.ndarray]:
    """pool_3 / spatial / probs of uint8 images, jit-compiled and sharded over the batch."""
    from tqdm.auto import tqdm

    from arjax import sharding

    params, fn, mesh = _inception(weights)
    n_dev = sharding.data_parallel_size(mesh)
    batch = -(-min(batch, len(images)) // n_dev) * n_dev  # a multiple of the devices
    out: dict[str, list] = {"pool_3": [], "spatial": [], "probs": []}
    for start in tqdm(range(0, len(images), batch), desc="inception", disable=not progress):
        chunk = np.asarray(images[start:start + batch])
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                                 chunk.dtype)])  # static shape: one compile
        result = fn(params, sharding.to_global(padded, mesh))
        for k in out:
            out[k].append(np.asarray(result[k])[:len(chunk)])
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_inception(images, reference_images, reference_stats: dict | None = None,
                       weights: str | None = None) -> dict[str, float]:
    """ADM's five numbers: FID, sFID, IS (5k splits), precision and recall (k=3)."""
    feats = inception_features(images, weights)
    ref = inception_features(reference_images, weights)
    if reference_stats:
        ref_pool = FeatureStats(reference_stats["mu"], reference_stats["sigma"])
        ref_spatial = FeatureStats(reference_stats["mu_s"], reference_stats["sigma_s"])
    else:
        ref_pool, ref_spatial = FeatureStats.of(ref["pool_3"]), FeatureStats.of(ref["spatial"])
    precision, recall = precision_recall(ref["pool_3"], feats["pool_3"])
    return {"fid": frechet_distance(FeatureStats.of(feats["pool_3"]), ref_pool),
            "sfid": frechet_distance(FeatureStats.of(feats["spatial"]), ref_spatial),
            "inception_score": inception_score(feats["probs"]),
            "precision": precision, "recall": recall, "num_samples": len(images)}


def load_reference(spec: str) -> tuple[np.ndarray, dict | None]:
    """Reference images and, for ADM reference batches, their precomputed statistics."""
    if spec.startswith("tfds:"):
        from arjax.data import DataConfig, open_source

        _, name, split, *size = spec.split(":")
        source = open_source(DataConfig(name=name, image_size=int(size[0]) if size else 256),
                             split)
        return source[np.arange(source.num_examples)]["image"], None
    images, _ = load_images(spec)
    stats = None
    if spec.endswith(".npz"):
        data = np.load(spec)
        if "mu" in data:
            stats = {k: data[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    return images, stats


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help=".npz or directory of PNGs")
    parser.add_argument("--reference", default="digits:train",
                        help="digits:<split>, tfds:<name>:<split>[:<size>], .npz or directory")
    parser.add_argument("--inception-weights", default=None,
                        help="pt_inception-2015-12-05-6726825d.pth (default: $ARJAX_CACHE)")
    parser.add_argument("--out", default=None, help="JSON path (default: next to samples)")
    args = parser.parse_args(argv)
    images, labels = load_images(args.samples)
    if args.reference.startswith("digits:"):
        reference, _ = load_images(args.reference)
        results = evaluate_digits(images, labels, reference)
    else:
        reference, stats = load_reference(args.reference)
        results = evaluate_inception(images, reference, stats, args.inception_weights)
    out = args.out or os.path.splitext(args.samples.rstrip("/"))[0] + ".eval.json"
    with open(out, "w") as f:
        json.dump({"samples": args.samples, "reference": args.reference, **results}, f, indent=1)
    print(json.dumps(results, indent=1))
    print(f"written: {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
