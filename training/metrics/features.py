"""Detector statistics of a set of images, the input of every metric.

Feature statistics are accumulated per rank as sufficient statistics in float64 (count, sum and sum
of outer products) and summed over ranks once at the end, so evaluation needs no barrier per batch and
2 ranks give what 1 rank gives. Per-image rows (features for KID, class probabilities for the Inception
Score) are kept only when a metric asks for them (`Metric.keeps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import tqdm

from torch_utils import distributed
from training.datasets import DatasetError, ImageFolderDataset

KEEPS = ("features", "probs")  # per-image rows a metric may ask the statistics to keep
SYMMETRY_TOLERANCE = 1e-5  # |sigma - sigma^T| allowed, relative to the largest |sigma| entry (float32 rounding and more)


def moments_problem(mu: np.ndarray, sigma: np.ndarray) -> str | None:
    """What makes (mu, sigma) unusable as feature moments (shapes, NaN or inf, asymmetry), or None if nothing."""
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        return f"mu {mu.shape} and sigma {sigma.shape} do not fit together (mu [F], sigma [F, F])"
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            return f"{name} holds NaN or inf"
    scale = np.abs(sigma).max(initial=0.0)
    asymmetry = np.abs(sigma - sigma.T).max(initial=0.0)
    if asymmetry > SYMMETRY_TOLERANCE * scale:
        return f"sigma is not symmetric (|sigma - sigma^T| reaches {asymmetry:.3g}, its entries {scale:.3g}), so not a covariance"
    return None


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
        """Sum every statistic over ranks (once, at the end); returns self. NaN or inf features are refused."""
        for t in (self.count, self.sum, self.outer):
            distributed.all_reduce_sum(t)
        if self.features is not None:
            self.features = distributed.assemble(self.features, range(self.capacity), self.capacity)
        if self.probs is not None:
            self.probs = distributed.assemble(self.probs, range(self.capacity), self.capacity)
        rows = [t for t in (self.sum, self.outer, self.features, self.probs) if t is not None]
        if not all(bool(torch.isfinite(t).all()) for t in rows):  # every rank holds the same sums: all raise together
            raise ValueError("the detector returned NaN or inf for some of the images, so no metric of them is "
                             "meaningful; check the detector (--detector) and the images")
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
    keep: Iterable[str] = (),
) -> FeatureStats:
    """Feature statistics of uint8 NCHW batches given with their global positions 0..count-1, over all ranks.

    `keep` names the per-image rows to keep (`KEEPS`). The detector (`training.metrics.detector.Detector`)
    repeats grayscale images to RGB, as EDM does; class probabilities take a second detector pass per batch.
    """
    keep = set(keep)
    if not keep <= set(KEEPS):
        raise ValueError(f"statistics can keep {', '.join(KEEPS)}, not {', '.join(sorted(keep - set(KEEPS)))}")
    stats = FeatureStats(detector.feature_dim, device, capacity=count, keep_features="features" in keep,
                         num_classes=detector.num_classes if "probs" in keep else 0)
    for positions, images in batches:
        images = images.to(device)
        with torch.no_grad():
            probs = detector.probabilities(images) if "probs" in keep else None
            stats.append(detector.features(images), positions, probs)
    return stats.reduce()


def image_dataset(path: str, num: int | None = None, seed: int = 0) -> ImageFolderDataset:
    """The images of a folder or ZIP; with `num`, a seeded choice of exactly num of them (EDM's subset). Their
    headers are checked first (`ImageFolderDataset.check_images`): an odd or cut-short image is found before any work."""
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise DatasetError(f"found {len(dataset)} images in {path}, but --num={num}; generate more or lower --num")
    dataset.check_images()
    return dataset


def dataset_batches(
    dataset, batch_size: int, workers: int, progress: bool = False
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """This rank's batches of (positions, uint8 NCHW images), read by `workers` loader processes.

    With `progress`, rank 0 shows a bar over its images, advanced when the next batch is asked for (once the
    previous one is used), from the positions alone: no host-device synchronisation.
    """
    batches = [list(b) for b in distributed.rank_batches(len(dataset), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    total = sum(len(b) for b in batches)
    enabled = progress and distributed.is_main()
    with tqdm.tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True) as bar:
        for positions, (images, _labels) in zip(batches, loader):
            yield positions, images
            bar.update(len(positions))
