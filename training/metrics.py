"""Image-quality metrics: FID, KID and Inception Score from detector features.

Feature statistics are accumulated per rank as sufficient statistics in float64 (count, sum and sum
of outer products) and summed over ranks once at the end, so `fid.py` needs no barrier per batch and
2 ranks give what 1 rank gives. Reference statistics are npz files with `mu` [F] and `sigma` [F, F],
interchangeable with EDM's published files in both directions; ours may also hold `features` (for
KID) and `count`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from dnnlib import util
from torch_utils import distributed

METRICS = ("fid", "kid", "is")


class FeatureStats:
    """Running float64 sums of detector features on the device; optional rows kept for KID / IS."""

    def __init__(self, dim: int, device, capacity: int = 0, keep_features: bool = False, num_classes: int = 0):
        self.count = torch.zeros([], dtype=torch.float64, device=device)
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)
        self.capacity = capacity
        self.features = torch.zeros([capacity, dim], dtype=torch.float32, device=device) if keep_features else None
        self.probs = torch.zeros([capacity, num_classes], dtype=torch.float32, device=device) if num_classes else None

    def append(self, features: torch.Tensor, positions=None, probs: torch.Tensor | None = None) -> None:
        """Add a batch of features [B, F] (and class probabilities [B, K]) at global `positions`."""
        f = features.to(torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f
        index = None if positions is None else torch.as_tensor(list(positions), device=self.sum.device)
        if self.features is not None:
            self.features[index] = features.to(torch.float32)
        if self.probs is not None and probs is not None:
            self.probs[index] = probs.to(torch.float32)

    def reduce(self) -> FeatureStats:
        """Sum every statistic over ranks (once, at the end); returns self."""
        for t in (self.count, self.sum, self.outer):
            distributed.all_reduce_sum(t)
        if self.features is not None:
            self.features = distributed.assemble(self.features, range(self.capacity), self.capacity)
        if self.probs is not None:
            self.probs = distributed.assemble(self.probs, range(self.capacity), self.capacity)
        return self

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) in float64, sigma the unbiased covariance, as EDM computes them."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {int(n)}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def compute_stats(
    batches: Iterable[tuple[list[int], torch.Tensor]],
    detector,
    count: int,
    device,
    metrics: Iterable[str] = ("fid",),
) -> FeatureStats:
    """Feature statistics of uint8 NCHW batches given with their global positions 0..count-1, over all ranks.

    The detector (training.detector.Detector) repeats grayscale images to RGB, as EDM does.
    Inception Score takes a second detector pass per batch for the class probabilities.
    """
    metrics = set(metrics)
    stats = FeatureStats(detector.feature_dim, device, capacity=count, keep_features="kid" in metrics,
                         num_classes=detector.num_classes if "is" in metrics else 0)
    for positions, images in batches:
        images = images.to(device)
        with torch.no_grad():
            probs = detector.probabilities(images) if "is" in metrics else None
            stats.append(detector.features(images), positions, probs)
    return stats.reduce()


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) in float64.

    tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, a symmetric positive semi-definite matrix, so two
    symmetric eigendecompositions give it; eigenvalues at the rounding level, and negative ones, are
    set to 0, so the result is real even for slightly indefinite or rank-deficient covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}; "
            "were they made with the same detector?"
        )
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


def kid_from_features(
    gen: torch.Tensor, ref: torch.Tensor, num_subsets: int = 100, max_subset_size: int = 1000, generator=None
) -> float:
    """Kernel Inception Distance: the unbiased MMD^2 with k(x, y) = (x.y / F + 1)^3, averaged over subsets.

    StyleGAN3's protocol: `num_subsets` random subsets of m = min(len(gen), len(ref), max_subset_size).
    """
    gen, ref = gen.to(torch.float64), ref.to(torch.float64)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature sizes differ: {gen.shape[1]} vs {ref.shape[1]}; use the same detector")
    m = min(len(gen), len(ref), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    F = gen.shape[1]
    total = 0.0
    for _ in range(num_subsets):
        x = gen[torch.randperm(len(gen), generator=generator)[:m].to(gen.device)]
        y = ref[torch.randperm(len(ref), generator=generator)[:m].to(ref.device)]
        a = (x @ x.T / F + 1) ** 3 + (y @ y.T / F + 1) ** 3
        b = (x @ y.T / F + 1) ** 3
        total += float((a.sum() - a.diagonal().sum()) / (m - 1) - b.sum() * 2 / m) / m
    return total / num_subsets


def inception_score(probs: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive parts of exp(E_x KL(p(y|x) || p(y)))."""
    probs = probs.to(torch.float64)
    if len(probs) < splits:
        raise ValueError(f"Inception Score needs at least {splits} images, got {len(probs)}")
    scores = []
    for i in range(splits):
        part = probs[i * len(probs) // splits : (i + 1) * len(probs) // splits]
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class Reference:
    """Reference statistics: mu, sigma, and the features themselves when kept (for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    count: int | None = None


def save_reference(path, stats: FeatureStats, keep_features: bool = False) -> None:
    """Write an npz with mu and sigma (EDM's keys), count, and the features with `keep_features`."""
    mu, sigma = stats.mean_cov()
    arrays = dict(mu=mu, sigma=sigma, count=np.int64(stats.count.item()))
    if keep_features:
        if stats.features is None:
            raise ValueError("features were not kept while computing these statistics")
        arrays["features"] = stats.features.cpu().numpy()
    with util.atomic_write(path) as f:
        np.savez(f, **arrays)


def load_reference(path_or_url) -> Reference:
    """Read reference statistics from an npz path or URL (ours or EDM's); no pickled objects are read."""
    path = util.local_path(path_or_url)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not reference statistics (an npz with mu and sigma): {error}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path}: has {sorted(arrays)} but reference statistics need 'mu' and 'sigma'; make them with fid.py ref")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    count = int(arrays["count"]) if "count" in arrays else None
    return Reference(mu, sigma, arrays.get("features"), count)
