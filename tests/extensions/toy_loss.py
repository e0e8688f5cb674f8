"""A toy loss, as a user would add one: one file (this) plus one registry line (`LOSSES["toy"] = ToyLoss`), and its
train option --toy_sigma one entry of train.py's options table (`OPTION`: `OPTIONS["toy_sigma"] = OPTION`).

The denoising loss of EDM's preconditioning at a single noise level sigma = --toy_sigma, weighted 1 / sigma^2. The
shared path (`KernelLoss`) adds the PFGM++ kernel's perturbation for any D, the stable target field and the
FP regulariser; `KernelLoss.configure` passes --toy_sigma to the constructor by its name.
"""

from __future__ import annotations

import torch

from training.losses.base import KernelLoss
from training.options import Option


class ToyLoss(KernelLoss):
    """lambda(sigma) ||D(y + n, sigma) - y||^2 at sigma = toy_sigma, lambda = 1 / sigma^2."""

    options = (*KernelLoss.options, "toy_sigma")

    def __init__(self, toy_sigma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not toy_sigma > 0:
            raise ValueError(f"toy_sigma must be > 0, got {toy_sigma}")
        self.toy_sigma = float(toy_sigma)

    def sample_sigma(self, batch, device, generator=None):
        return torch.full([batch], self.toy_sigma, dtype=torch.float32, device=device)

    def weight(self, sigma):
        return 1 / sigma**2


OPTION = Option("toy_sigma", "float", "Toy loss: its one noise level", low=0, low_open=True, objective=True)
