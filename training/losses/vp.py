"""Score SDE's variance-preserving (VP) loss (Song et al. 2021), as EDM writes it (Table 1)."""

from __future__ import annotations

import torch

from torch_utils import rng
from training import schedules
from training.losses.base import KernelLoss


class VPLoss(KernelLoss):
    """Score SDE VP loss: t ~ U(epsilon_t, 1), sigma = sigma_vp(t), weight 1 / sigma^2."""

    options = tuple(k for k in KernelLoss.options if k != "stf")  # as Score SDE: no stable target field

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        if not 0 < epsilon_t < 1:
            raise ValueError(f"epsilon_t must lie in (0, 1), got {epsilon_t}")
        self.beta_d, self.beta_min, self.epsilon_t = float(beta_d), float(beta_min), float(epsilon_t)

    def sample_sigma(self, batch, device, generator=None):
        rnd_uniform = rng.rand([batch], generator, device=device, dtype=torch.float32)
        t = 1 + rnd_uniform * (self.epsilon_t - 1)
        return schedules.vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma**2
