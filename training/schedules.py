"""Noise schedules sigma(t) and their inverses (Score SDE VP/VE, EDM, iDDPM), as plain functions.

Shared by the preconditioners (VP sigma range, iDDPM grid), the losses (VP training sigma) and the
sampler (time discretisations and schedules). Inputs are floats or tensors; results are tensors.
"""

from __future__ import annotations

import math

import torch


def _f64(t) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else torch.as_tensor(t, dtype=torch.float64)


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """VP SDE noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (EDM Table 1)."""
    t = _f64(t)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_deriv(t, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """d sigma / dt of the VP schedule: (beta_min + beta_d t) (sigma^2 + 1) / (2 sigma)."""
    t = _f64(t)
    sigma = vp_sigma(t, beta_d, beta_min)
    return 0.5 * (beta_min + beta_d * t) * (sigma + 1 / sigma)


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = _f64(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    log_min, log_max = math.log1p(sigma_min**2), math.log1p(sigma_max**2)
    beta_d = 2 * (log_min / epsilon_s - log_max) / (epsilon_s - 1)
    return beta_d, log_max - 0.5 * beta_d


def ve_sigma(t) -> torch.Tensor:
    """VE SDE noise level sigma(t) = sqrt(t)."""
    return _f64(t).sqrt()


def ve_sigma_deriv(t) -> torch.Tensor:
    """d sigma / dt of the VE schedule: 1 / (2 sqrt(t))."""
    return 0.5 / _f64(t).sqrt()


def ve_sigma_inv(sigma) -> torch.Tensor:
    """t(sigma) = sigma^2 for the VE schedule."""
    return _f64(sigma) ** 2


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device=None) -> torch.Tensor:
    """EDM eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.arange(num_steps, dtype=torch.float64, device=device) / max(num_steps - 1, 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def iddpm_sigmas(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> torch.Tensor:
    """The M + 1 noise levels u_0 > ... > u_M = 0 of improved DDPM's cosine schedule (EDM Table 1)."""
    j = torch.arange(M + 1, dtype=torch.float64)
    alpha_bar = torch.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clamp(min=C_1)  # alpha_bar(j - 1) / alpha_bar(j), j = 1..M
    u = torch.zeros(M + 1, dtype=torch.float64)
    for k in range(M, 0, -1):  # u_{j-1} = sqrt((u_j^2 + 1) / max(ratio_j, C_1) - 1)
        u[k - 1] = ((u[k] ** 2 + 1) / ratio[k - 1] - 1).sqrt()
    return u
