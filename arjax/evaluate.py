"""Evaluate generated samples: `python -m arjax.evaluate --samples S.npz --reference digits:train`.

Samples: an .npz with `images` (or ADM's `arr_0`) uint8 [N,H,W,3] (or floats in [-1,1]) and
optional `labels` [N]; or a directory of PNGs. Reference: `digits:<split>` or an .npz/dir of
images. Results are printed and written as JSON next to the samples (`<samples>.eval.json`).

The feature network today is the project's digits classifier (FID-digits, IS-digits,
precision/recall with k=3, class accuracy); the same metric functions serve Inception features.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help=".npz or directory of PNGs")
    parser.add_argument("--reference", default="digits:train",
                        help="digits:<split>, or an .npz / directory of reference images")
    parser.add_argument("--out", default=None, help="JSON path (default: next to samples)")
    args = parser.parse_args(argv)
    images, labels = load_images(args.samples)
    reference, _ = load_images(args.reference)
    results = evaluate_digits(images, labels, reference)
    out = args.out or os.path.splitext(args.samples.rstrip("/"))[0] + ".eval.json"
    with open(out, "w") as f:
        json.dump({"samples": args.samples, "reference": args.reference, **results}, f, indent=1)
    print(json.dumps(results, indent=1))
    print(f"written: {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
