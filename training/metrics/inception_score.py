"""Inception Score (Salimans et al. 2016) over 10 splits, without the output bias as StyleGAN3 computes it."""

from __future__ import annotations

import math

import numpy as np
import torch

from training.metrics.base import Metric


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


def compute(stats, reference, seed: int) -> dict:
    """Mean and standard deviation of the Inception Score over the splits; no reference."""
    mean, std = inception_score(stats.probs)
    return {"is_mean": mean, "is_std": std}


IS = Metric(compute, keeps=frozenset({"probs"}), description="Inception Score", score="is_mean", higher_is_better=True)
