"""Reference points of the digits evaluator: real held-out digits and noise vs the train split.

    python -m benchmarks.digits_evaluator

Use them to read FID-digits / IS-digits / class accuracy of a model's samples (at equal N).
"""

from __future__ import annotations

import numpy as np

from arjax.data.sources import digits
from arjax.evaluate import evaluate_digits


def score_and_time(gens: dict, per_class: int, rounds: int = 3) -> tuple[dict, dict]:
    """Samplers {name: (generate, params)} on `per_class` images of each digit: the digits
    scores and counted stats of a first (compiling) call with key 0, then the seconds of
    `rounds` interleaved rounds (each runs every sampler once, keys 1..)."""
    import jax

    from arjax.metrics.digits import DigitsEvaluator

    evaluator = DigitsEvaluator.load()
    reference = digits("train", 32).images
    labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
    rows, times = {}, {name: [] for name in gens}
    for name, (gen, params) in gens.items():  # compiles; these samples are scored
        out = gen(params, labels, jax.random.key(0))
        rows[name] = {**evaluate_digits(out.images, labels, reference, evaluator), **out.stats}
    for r in range(rounds):
        for name, (gen, params) in gens.items():
            times[name].append(gen(params, labels, jax.random.key(r + 1)).stats["seconds"])
    return rows, times


def main() -> None:
    test = digits("test", 32)
    noise = np.random.default_rng(0).integers(0, 256, test.images.shape).astype(np.uint8)
    for name, images in (("real test digits", test.images), ("uniform noise", noise)):
        r = evaluate_digits(images, test.labels)
        print(f"{name} (N={len(images)}): FID-digits {r['fid_digits']:.2f}, "
              f"IS-digits {r['is_digits']:.2f}, precision {r['precision']:.3f}, "
              f"recall {r['recall']:.3f}, class accuracy {r['class_accuracy']:.3f}")


if __name__ == "__main__":
    from arjax.distributed import initialize

    initialize()  # joins a multi-process run first (no-op for one process)
    main()
