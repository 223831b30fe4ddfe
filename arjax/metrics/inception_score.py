"""Inception Score as ADM computes it: exp(E_x KL(p(y|x) || p(y))) averaged over splits of
5,000 samples (10 splits for the usual 50k)."""

from __future__ import annotations

import numpy as np


def inception_score(probs: np.ndarray, split_size: int = 5000) -> float:
    """probs [N, C] softmax outputs -> IS."""
    probs = np.asarray(probs, np.float64)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))
