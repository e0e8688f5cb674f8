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

from torch_utils import distributed
from training.datasets import DatasetError, ImageFolderDataset

KEEPS = ("features", "probs")  # per-image rows a metric may ask the statistics to keep


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


def open_images(path: str, num: int | None = None, seed: int = 0) -> ImageFolderDataset:
    """The images of a folder or ZIP; with `num`, a seeded choice of exactly num of them (EDM's subset)."""
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise DatasetError(f"found {len(dataset)} images in {path}, but --num={num}; generate more or lower --num")
    return dataset


def dataset_batches(dataset, batch_size: int, workers: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """This rank's batches of (positions, uint8 NCHW images), read by `workers` loader processes."""
    batches = [list(b) for b in distributed.rank_batches(len(dataset), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    for positions, (images, _labels) in zip(batches, loader):
        yield positions, images
