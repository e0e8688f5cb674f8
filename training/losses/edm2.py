"""EDM2's uncertainty-weighted loss (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Eq. 21), for every D of PFGM++.

It trains the denoiser D_theta of EDM's preconditioning together with the learned log-variance u(sigma) of
`training.preconditioners.edm2.EDM2Precond` (the network's 'logvar' output), which weights the loss of every
noise level by its own uncertainty:

    L = lambda(sigma) / exp(u(sigma)) ||D_theta(x, sigma) - y||^2 + u(sigma),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,   ln sigma ~ N(P_mean, P_std^2).

For fixed D_theta the optimum is u(sigma) = ln(lambda(sigma) E||D_theta - y||^2), so the weighted loss of every
sigma is brought to one. The perturbation is the PFGM++ kernel of `KernelLoss` (Gaussian at D = inf, EDM2's own
case). EDM2's settings: P_mean = -0.8, P_std = 1.6 for 64x64 pixels (`EDM2_PIXELS`, the default here), -0.4 and
1.0 for its 64x64x4 latents (`EDM2_LATENTS`).
"""

from __future__ import annotations

import torch

from training.losses.edm import EDMLoss

# EDM2's noise-level distributions (NVlabs/edm2 train_edm2.py presets edm2-img64-* and edm2-img512-*).
EDM2_PIXELS = dict(P_mean=-0.8, P_std=1.6)
EDM2_LATENTS = dict(P_mean=-0.4, P_std=1.0)


class EDM2Loss(EDMLoss):
    """EDM2's uncertainty-weighted loss (Eq. 21) for any D: EDM's sigma, weight and PFGM++ perturbation, each noise
    level's error divided by exp(u(sigma)) and u(sigma) added. The network must take `return_logvar`."""

    needs = "logvar"

    def __init__(self, P_mean: float = EDM2_PIXELS["P_mean"], P_std: float = EDM2_PIXELS["P_std"], **kwargs):
        super().__init__(P_mean=P_mean, P_std=P_std, **kwargs)

    def denoising_loss(self, net, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, labels=None,
                       augment_labels=None) -> torch.Tensor:
        """Per-element lambda(sigma) / exp(u(sigma)) (D_theta(x, sigma) - target)^2 + u(sigma) (Eq. 21)."""
        denoised, logvar = net(x, sigma, labels, augment_labels=augment_labels, return_logvar=True)
        return self.weight(sigma) / logvar.exp() * (denoised - target) ** 2 + logvar
