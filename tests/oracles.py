"""Test oracles: networks whose exact answer is known."""

from __future__ import annotations

import math

import torch
from torch import nn

from training import pfgmpp


class AnalyticDenoiser(nn.Module):
    """The exact denoiser E[y | x] of a finite data set under the PFGM++ kernel, with the network interface."""

    def __init__(self, data: torch.Tensor, D: float, sigma_min: float = 0.0, sigma_max: float = math.inf):
        super().__init__()
        if data.ndim != 4 or data.shape[2] != data.shape[3]:
            raise ValueError("data must be [M, C, R, R]")
        self.register_buffer("data", data.to(torch.float64))
        self.D = D
        self.img_channels, self.img_resolution = data.shape[1], data.shape[2]
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.calls += 1
        return pfgmpp.posterior_mean(x.to(torch.float64), sigma, self.D, self.data)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(0, s^2 I) data at D = inf: D(x, sigma) = x s^2 / (s^2 + sigma^2)."""

    D = math.inf

    def __init__(self, s: float, channels: int = 1, resolution: int = 2):
        super().__init__()
        self.s = s
        self.img_channels, self.img_resolution = channels, resolution
        self.sigma_min, self.sigma_max = 0.0, math.inf

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        return x.to(torch.float64) * self.s**2 / (self.s**2 + sigma**2)


class PoissonFieldModel(nn.Module):
    """The exact PFGM field of a finite data set, laid out as a PFGMPrecond network's output.

    Called as model(x, ln z): channels [:C] hold v_x, channel C holds v_z (spatially constant).
    """

    def __init__(self, data: torch.Tensor, gamma: float = 5.0):
        super().__init__()
        self.register_buffer("data", data.to(torch.float64))
        self.gamma = gamma
        self.calls = 0

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        from training.losses import pfgm

        self.calls += 1
        z = noise_labels.to(torch.float64).exp()
        v_x, v_z = pfgm.normalized_field(x, z, self.data, self.gamma)
        v_z = v_z.reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return torch.cat([v_x, v_z], dim=1).to(x.dtype)
