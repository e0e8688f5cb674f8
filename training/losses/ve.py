"""Score SDE's variance-exploding (VE) loss (Song et al. 2021), as EDM writes it (Table 1)."""

from __future__ import annotations

import torch

from torch_utils import rng
from training.losses.base import KernelLoss


class VELoss(KernelLoss):
    """Score SDE VE loss: ln sigma ~ U(ln sigma_min, ln sigma_max), weight 1 / sigma^2."""

    options = tuple(k for k in KernelLoss.options if k != "stf")  # as Score SDE: no stable target field

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sample_sigma(self, batch, device, generator=None):
        rnd_uniform = rng.rand([batch], generator, device=device, dtype=torch.float32)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** rnd_uniform

    def weight(self, sigma):
        return 1 / sigma**2
