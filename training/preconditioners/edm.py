"""EDM's preconditioning (Karras et al. 2022), which PFGM++ uses for every D (r = sigma sqrt(D))."""

from __future__ import annotations

from dnnlib.util import records_init_kwargs
from training.preconditioners.base import Precond


@records_init_kwargs
class EDMPrecond(Precond):
    """EDM / PFGM++ preconditioning: unit-variance input and target at every sigma."""

    default_loss = "edm"

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise
