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
