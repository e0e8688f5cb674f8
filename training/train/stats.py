"""Training statistics accumulated on the device and reduced across ranks once per tick.

Nothing here reads a device value during a step: the loss, gradient norm and non-finite counts are
added into one float64 tensor, which `reduce()` sums over ranks and copies to the host at the tick.
"""

from __future__ import annotations

import math

import torch

from torch_utils import distributed

# Edges of the noise-level buckets of the per-sigma loss (EDM's sigma range, roughly log-spaced).
SIGMA_EDGES = (0.01, 0.05, 0.2, 1.0, 5.0, 20.0)


def bucket_names(edges=SIGMA_EDGES) -> list[str]:
    """Readable names of the sigma buckets: 'sigma<0.01', '0.01-0.05', ..., 'sigma>=20'."""
    inner = [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]
    return [f"sigma<{edges[0]:g}", *inner, f"sigma>={edges[-1]:g}"]


class TickStats:
    """Sums of loss (overall and per sigma bucket), gradient norm, non-finite steps and steps; and the moments of the
    loss's elements, from which EDM's 'Loss/loss' {num, mean, std} is read."""

    _SCALARS = ("loss_sum", "loss_count", "grad_norm_sum", "nonfinite_steps", "steps", "elements", "element_sum",
                "element_sum_sq")

    def __init__(self, device, edges=SIGMA_EDGES):
        self.edges = torch.tensor(edges, dtype=torch.float32, device=device)
        self.names = bucket_names(edges)
        k = len(edges) + 1
        self.values = torch.zeros(len(self._SCALARS) + 2 * k, dtype=torch.float64, device=device)
        self._buckets = slice(len(self._SCALARS), len(self._SCALARS) + k)
        self._counts = slice(len(self._SCALARS) + k, len(self._SCALARS) + 2 * k)

    def add_loss(self, loss: torch.Tensor, sigma: torch.Tensor) -> None:
        """Record a loss [B, ...] (per element; [B]: one value per sample) at its samples' noise levels [B]."""
        elements = loss.detach()
        per_sample = elements.flatten(1).mean(dim=1) if elements.ndim > 1 else elements.reshape(-1)
        loss = per_sample.to(torch.float64)
        bucket = torch.bucketize(sigma.detach().reshape(-1).to(torch.float32), self.edges, right=True)
        self.values[0] += loss.sum()
        self.values[1] += loss.numel()
        self.values[5] += elements.numel()
        self.values[6] += elements.sum(dtype=torch.float64)  # float64 sums, no float64 copy of the loss
        self.values[7] += elements.square().sum(dtype=torch.float64)
        self.values[self._buckets].index_add_(0, bucket, loss)
        self.values[self._counts].index_add_(0, bucket, torch.ones_like(loss))

    def add_step(self, grad_norm: torch.Tensor) -> None:
        """Record one optimizer step with its total gradient norm (non-finite counted, not summed)."""
        finite = torch.isfinite(grad_norm)
        self.values[2] += torch.where(finite, grad_norm, torch.zeros_like(grad_norm)).to(torch.float64)
        self.values[3] += (~finite).to(torch.float64)
        self.values[4] += 1

    def reduce(self) -> dict:
        """Sum over ranks, copy to the host, reset; returns means ('nan' where nothing was seen)."""
        values = distributed.all_reduce_sum(self.values.clone()).cpu().tolist()
        self.values.zero_()
        loss_sum, loss_count, grad_sum, nonfinite, steps, elements, element_sum, element_sq = values[: len(self._SCALARS)]
        sums, counts = values[self._buckets], values[self._counts]
        world = distributed.get_world_size()
        finite_steps = steps - nonfinite
        return {
            "loss": loss_sum / loss_count if loss_count else math.nan,
            "loss_by_sigma": {n: (s / c if c else None) for n, s, c in zip(self.names, sums, counts)},
            "grad_norm": grad_sum / finite_steps if finite_steps else math.nan,
            "nonfinite_grad_steps": int(round(nonfinite / world)),
            "steps": int(round(steps / world)),
            "loss_elements": {"num": int(elements), **moments(elements, element_sum, element_sq)},
        }


def moments(count: float, total: float, squares: float) -> dict:
    """{'mean', 'std'} of `count` values from their sum and sum of squares ('nan' where there are none), as EDM's
    statistics collector reports them (the population standard deviation)."""
    if not count:
        return {"mean": math.nan, "std": math.nan}
    mean = total / count
    return {"mean": mean, "std": math.sqrt(max(squares / count - mean * mean, 0.0))}


NONFINITE_SHARE = 0.5  # a tick with more than this share of steps skipped for non-finite gradients has diverged


class Diverged(RuntimeError):
    """Training has diverged (`divergence`): the run stops, writing nothing of the tick that showed it."""


def divergence(stats: dict) -> str | None:
    """What shows that the run has diverged in a tick's reduced statistics (the same on every rank), or None.

    The rule: the tick's mean loss is NaN or inf, or more than NONFINITE_SHARE of its optimizer steps had non-finite
    gradients (those steps were skipped: a few are what fp16 and rare outliers give, most of them are a dead run).
    """
    seen = []
    if not math.isfinite(stats["loss"]):
        seen.append(f"the loss is {stats['loss']}")
    steps, skipped = stats["steps"], stats["nonfinite_grad_steps"]
    if steps and skipped > NONFINITE_SHARE * steps:
        seen.append(f"{skipped} of its {steps} steps had non-finite gradients")
    return "; ".join(seen) or None
