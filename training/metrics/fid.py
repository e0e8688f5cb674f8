"""Fréchet Inception Distance (Heusel et al. 2017) from feature moments, in float64."""

from __future__ import annotations

import numpy as np

from training.metrics.base import Metric
from training.metrics.features import moments_problem


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64.

    tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, a symmetric positive semi-definite matrix, so two
    symmetric eigendecompositions give it; eigenvalues at the rounding level, and negative ones, are
    set to 0, so the result is real even for slightly indefinite or rank-deficient covariances. Statistics
    with NaN or inf, or a sigma that is not symmetric, are refused (ValueError) rather than giving nan.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "were they made with the same detector?"
        )
    for which, (mu, sigma) in (("first", (mu1, sigma1)), ("second", (mu2, sigma2))):
        problem = moments_problem(mu, sigma)
        if problem is not None:
            raise ValueError(f"no FID from these statistics: in the {which}, {problem}")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(_numerically_nonnegative(w))) @ v.T
    inner = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(_numerically_nonnegative(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _numerically_nonnegative(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those below its rounding level (n * eps * max |w|) set to 0.

    Without this, the ~n null eigenvalues of a rank-deficient covariance (fewer images than
    features) each add sqrt(eps) * max |w| to the trace of the square root.
    """
    tol = eigenvalues.size * np.finfo(np.float64).eps * max(np.abs(eigenvalues).max(initial=0.0), 1e-300)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def few_images_warning(num: int, feature_dim: int) -> str | None:
    """What to tell a user whose FID comes from no more images than features (None otherwise): the covariance is
    then singular and the distance biased upwards, not comparable with a 50,000-image FID."""
    if num > feature_dim:
        return None
    return (f"warning: FID from {num} images: the covariance of {feature_dim} features from them has rank at most "
            f"{max(num - 1, 0)}, so this FID is biased and not comparable with FIDs of 50,000 images (use more than "
            f"{feature_dim} images)")


def compute(stats, reference, seed: int) -> dict:
    """FID of the evaluated images against the reference moments."""
    mu, sigma = stats.mean_cov()
    return {"fid": fid_from_stats(mu, sigma, reference.mu, reference.sigma)}


FID = Metric(compute, reference="moments", description="Fréchet Inception Distance", few_images=few_images_warning)
