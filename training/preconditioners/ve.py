"""Score SDE's variance-exploding (VE) preconditioning and loss (Song et al. 2021), as EDM writes them (Table 1)."""

from __future__ import annotations

import torch

from dnnlib.util import records_init_kwargs
from torch_utils import rng
from training.preconditioners.base import Precond
from training.preconditioners.losses import KernelLoss


class VELoss(KernelLoss):
    """Score SDE VE loss: ln sigma ~ U(ln sigma_min, ln sigma_max), weight 1 / sigma^2."""

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


@records_init_kwargs
class VEPrecond(Precond):
    """Score SDE variance-exploding preconditioning; noise labels are ln(sigma / 2)."""

    loss_class = VELoss
    training_options = ("fp_reg",)

    def __init__(self, model, **kwargs):
        kwargs.setdefault("sigma_min", 0.02)
        kwargs.setdefault("sigma_max", 100.0)
        super().__init__(model, **kwargs)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()

