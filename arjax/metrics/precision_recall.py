"""Improved precision/recall (Kynkaanniemi et al.) as in ADM's ManifoldEstimator, k = 3.

Distances are *squared* Euclidean, first computed in float16 (falling back to float32 when that
overflows), as the reference does. A point is in a manifold if it lies within the k-NN radius of
some point of it; the k-NN radius counts the point itself as neighbour 0.
Precision = fraction of samples in the reference manifold; recall = the converse.
"""

from __future__ import annotations

import numpy as np


def pairwise_sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    def dist(a, b):
        na = np.sum(np.square(a, dtype=a.dtype), 1, dtype=a.dtype)[:, None]
        nb = np.sum(np.square(b, dtype=b.dtype), 1, dtype=b.dtype)[None, :]
        return np.maximum(na - 2 * (a @ b.T) + nb, 0)

    with np.errstate(over="ignore", invalid="ignore"):
        d16 = dist(u.astype(np.float16), v.astype(np.float16))
    if np.all(np.isfinite(d16)):
        return d16.astype(np.float32)
    return dist(u.astype(np.float32), v.astype(np.float32))


def manifold_radii(features: np.ndarray, k: int = 3, block: int = 10000) -> np.ndarray:
    """Squared distance of every point to its k-th nearest neighbour (itself = 0th)."""
    radii = np.zeros(len(features), np.float32)
    for start in range(0, len(features), block):
        d = pairwise_sq_distances(features[start:start + block], features)
        radii[start:start + block] = np.partition(d, k, axis=1)[:, k]
    return radii


def precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                     block: int = 10000) -> tuple[float, float]:
    r_ref, r_smp = manifold_radii(reference, k, block), manifold_radii(samples, k, block)
    ref_in = np.zeros(len(reference), bool)  # reference point inside the sample manifold
    smp_in = np.zeros(len(samples), bool)  # sample inside the reference manifold
    for i in range(0, len(reference), block):
        for j in range(0, len(samples), block):
            d = pairwise_sq_distances(reference[i:i + block], samples[j:j + block])
            ref_in[i:i + block] |= np.any(d <= r_smp[None, j:j + block], axis=1)
            smp_in[j:j + block] |= np.any(d <= r_ref[i:i + block, None], axis=0)
    return float(smp_in.mean()), float(ref_in.mean())
