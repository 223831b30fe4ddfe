"""Feature statistics and the Frechet distance (FID / sFID), as in ADM's evaluator.

ADM: mu = mean, sigma = np.cov(rowvar=False) in float64; sqrtm(sigma1 @ sigma2) by scipy with
an eps*I retry when the product is singular and the real part taken when the imaginary part is
negligible. Reproducing this (not a JAX eigen-decomposition) is what makes numbers comparable.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import linalg


@dataclasses.dataclass
class FeatureStats:
    mu: np.ndarray  # [D]
    sigma: np.ndarray  # [D, D]

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        features = np.asarray(features, np.float64)
        if len(features) < 2:
            raise ValueError("need at least 2 feature vectors for a covariance")
        return cls(features.mean(0), np.cov(features, rowvar=False))

    def save(self, path: str) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma)


def frechet_distance(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dims differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    covmean, _ = linalg.sqrtm(a.sigma.dot(b.sigma), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular covariance product; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))
