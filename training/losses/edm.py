"""EDM's loss (Karras et al. 2022), which PFGM++ uses for every D (r = sigma sqrt(D))."""

from __future__ import annotations

import torch

from torch_utils import rng
from training.losses.base import KernelLoss


class EDMLoss(KernelLoss):
    """EDM / PFGM++ loss: ln(sigma / sigma_scale) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    options = (*KernelLoss.options, "P_mean", "P_std", "sigma_scale")

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, sigma_scale: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not P_std > 0 or not sigma_data > 0 or not sigma_scale > 0:
            raise ValueError(f"P_std, sigma_data and sigma_scale must be > 0, got {P_std}, {sigma_data}, {sigma_scale}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.sigma_scale = float(sigma_scale)  # PFGM++ trains LSUN 256^2 with sigma scaled by 380/80

    def sample_sigma(self, batch, device, generator=None):
        rnd_normal = rng.randn([batch], generator, device=device, dtype=torch.float32)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        return sigma if self.sigma_scale == 1.0 else sigma * self.sigma_scale

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
