"""Kernel Inception Distance (Binkowski et al. 2018), as StyleGAN3 computes it."""

from __future__ import annotations

import torch

from training.metrics.base import Metric


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


def compute(stats, reference, seed: int) -> dict:
    """KID of the evaluated images' features against the reference's; subsets drawn from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    ref_features = torch.as_tensor(reference.features, device=stats.features.device)
    return {"kid": kid_from_features(stats.features, ref_features, generator=generator)}


KID = Metric(compute, keeps=frozenset({"features"}), reference="features", description="Kernel Inception Distance")
