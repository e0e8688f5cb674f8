"""Score SDE's variance-preserving (VP) preconditioning (Song et al. 2021), as EDM writes it (Table 1)."""

from __future__ import annotations

import torch

from dnnlib.util import records_init_kwargs
from training import schedules
from training.preconditioners.base import Precond


@records_init_kwargs
class VPPrecond(Precond):
    """Score SDE variance-preserving preconditioning; noise labels are (M - 1) t(sigma)."""

    default_loss = "vp"
    score_sde = "vp"

    def __init__(self, model, *, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000,
                 epsilon_t: float = 1e-5, **kwargs):
        kwargs.setdefault("sigma_min", float(schedules.vp_sigma(epsilon_t, beta_d, beta_min)))
        kwargs.setdefault("sigma_max", float(schedules.vp_sigma(1.0, beta_d, beta_min)))
        super().__init__(model, **kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * schedules.vp_sigma_inv(sigma, self.beta_d, self.beta_min)
        return c_skip, c_out, c_in, c_noise.to(torch.float32)

