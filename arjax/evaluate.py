"""Evaluate generated samples against a reference set, as the ADM evaluator does.

    python -m arjax.evaluate --samples S.npz --reference VIRTUAL_imagenet256_labeled.npz
    python -m arjax.evaluate --samples S.npz --reference tfds:imagenet2012:validation
    python -m arjax.evaluate --samples S.npz --reference digits:train   # digits evaluator

Samples: an .npz with `images` (or ADM's `arr_0`) uint8 [N,H,W,3] and optional `labels`, or a
directory of PNGs. Greyscale [N,H,W] or [N,H,W,1] images are repeated to RGB; anything else
(float images, channels-first arrays, fewer than 4 images, samples at another resolution than
the reference, object arrays) is refused with a message before any network runs.
Reference: `digits:<split>`, `tfds:<name>:<split>[:<size>]`, or an .npz /
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

from arjax.errors import UserError
from arjax.experiment.cli import exit_on_user_error
from arjax.experiment.outputs import json_safe, write_json
from arjax.metrics.fid import FeatureStats, frechet_distance
from arjax.metrics.inception_score import inception_score
from arjax.metrics.precision_recall import precision_recall

MIN_IMAGES = 4  # precision/recall use each image's 3rd nearest neighbour


class InputError(UserError, ValueError):
    """Samples or reference images that cannot be scored as given."""


def check_images(images, what: str) -> np.ndarray:
    """uint8 [N, H, W, 3] images (greyscale repeated to RGB), or an InputError saying why not."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        hint = ("contain NaN" if np.issubdtype(images.dtype, np.floating)
                and np.isnan(images).any() else f"are {images.dtype}")
        raise InputError(f"{what} {hint}; uint8 in [0, 255] is required (from [-1, 1] floats "
                         "use arjax.images.to_uint8, from [0, 1] round(x * 255))")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise InputError(f"{what} have shape {images.shape}; expected [N, H, W, 3]")
    if images.shape[-1] not in (1, 3):
        layout = " (channels first? transpose to [N, H, W, C])" if images.shape[1] in (1, 3) \
            else ""
        raise InputError(f"{what} have shape {images.shape}: {images.shape[-1]} channels"
                         f"{layout}; expected [N, H, W, 3]")
    if len(images) < MIN_IMAGES:
        raise InputError(f"{what}: {len(images)} image(s); at least {MIN_IMAGES} are needed")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def load_images(spec: str) -> tuple[np.ndarray, np.ndarray | None]:
    """npz file, PNG directory or `digits:<split>` -> (images, labels or None)."""
    if spec.startswith("digits:"):
        from arjax.data.sources import digits

        source = digits(spec.split(":", 1)[1], 32)
        return source.images, source.labels
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(spec, "*.png")))
        if not files:
            raise InputError(f"no .png files in directory {spec!r}")
        return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]), None
    if not os.path.isfile(spec):
        raise InputError(f"{spec!r} is neither a file, a directory nor digits:<split>")
    try:
        with np.load(spec, allow_pickle=False) as data:
            key = "images" if "images" in data else "arr_0" if "arr_0" in data else None
            if key is None:
                raise InputError(f"{spec!r} has no 'images' or 'arr_0' array (found "
                                 f"{list(data.keys())})")
            return data[key], data["labels"] if "labels" in data else None
    except InputError:
        raise
    except ValueError as e:  # object arrays need pickle, which could run code
        raise InputError(f"{spec!r}: its arrays are Python objects, not numbers ({e}); save "
                         "plain uint8 arrays with np.savez") from None
    except Exception as e:  # not an npz at all
        raise InputError(f"{spec!r} is not a readable .npz file ({type(e).__name__}: {e})"
                         ) from None


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
        result = fn(params, sharding.from_host(padded, mesh))
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
        data = np.load(spec, allow_pickle=False)
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
    images = check_images(images, f"samples {args.samples!r}")
    if labels is not None and len(labels) != len(images):
        raise InputError(f"samples {args.samples!r}: {len(labels)} labels for {len(images)} "
                         "images")
    if args.reference.startswith("digits:"):
        reference, stats = load_images(args.reference)[0], None
    else:
        reference, stats = load_reference(args.reference)
    reference = check_images(reference, f"reference {args.reference!r}")
    if images.shape[1:3] != reference.shape[1:3]:
        raise InputError(f"samples are {images.shape[1]}x{images.shape[2]} but the reference "
                         f"is {reference.shape[1]}x{reference.shape[2]}; resize one of them "
                         "(the protocol fixes the resolution scores are computed at)")
    if args.reference.startswith("digits:"):
        results = evaluate_digits(images, labels, reference)
    else:
        results = evaluate_inception(images, reference, stats, args.inception_weights)
    out = args.out or os.path.splitext(args.samples.rstrip("/"))[0] + ".eval.json"
    write_json(out, {"samples": args.samples, "reference": args.reference, **results})
    print(json.dumps(json_safe(results), indent=1))
    print(f"written: {out}")
    return results


def cli(argv=None) -> None:
    """`python -m arjax.evaluate`: expected errors are one line and exit status 2."""
    exit_on_user_error(lambda: main(argv))


if __name__ == "__main__":
    from arjax import compilation_cache
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    compilation_cache.enable()
    cli(sys.argv[1:])
