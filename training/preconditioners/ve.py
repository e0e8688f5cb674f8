"""Score SDE's variance-exploding (VE) preconditioning (Song et al. 2021), as EDM writes it (Table 1)."""

from __future__ import annotations

import torch

from dnnlib.util import records_init_kwargs
from training.preconditioners.base import Precond


@records_init_kwargs
class VEPrecond(Precond):
    """Score SDE variance-exploding preconditioning; noise labels are ln(sigma / 2)."""

    default_loss = "ve"

    def __init__(self, model, **kwargs):
        kwargs.setdefault("sigma_min", 0.02)
        kwargs.setdefault("sigma_max", 100.0)
        super().__init__(model, **kwargs)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()

