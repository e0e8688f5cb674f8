"""Improved DDPM's preconditioning (Nichol & Dhariwal 2021) on its discrete grid of noise levels, for imported
networks (EDM Table 1); it has no training objective here.
"""

from __future__ import annotations

import torch

from dnnlib.util import records_init_kwargs
from training import schedules
from training.preconditioners.base import Precond


@records_init_kwargs
class iDDPMPrecond(Precond):  # noqa: N801 (the method's name)
    """Improved DDPM preconditioning on its discrete grid of M noise levels (for imported networks)."""

    learned_variance = True

    def __init__(self, model, *, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, **kwargs):
        u = schedules.iddpm_sigmas(M, C_1, C_2).to(torch.float32)
        kwargs.setdefault("sigma_min", float(u[M - 1]))
        kwargs.setdefault("sigma_max", float(u[0]))
        super().__init__(model, **kwargs)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        self.register_buffer("u", u)

    def round_sigma(self, sigma, return_index: bool = False) -> torch.Tensor:
        """The nearest grid level u_j to sigma (or its index j)."""
        sigma = torch.as_tensor(sigma)
        u = self.u.to(sigma.device)
        index = (sigma.reshape(-1, 1).to(torch.float32) - u.reshape(1, -1)).abs().argmin(dim=1)
        result = index if return_index else u[index].to(sigma.dtype)
        return result.reshape(sigma.shape)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return c_skip, c_out, c_in, c_noise
