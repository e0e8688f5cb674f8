"""EDM2's preconditioning and loss (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models"), for every D of PFGM++.

The denoiser is EDM's, D_theta(x, sigma) = c_skip x + c_out F_theta(c_in x, c_noise) with EDM's coefficients
(sigma_data = 0.5, c_noise = ln(sigma) / 4), which PFGM++ uses for every D (r = sigma sqrt(D)). EDM2 adds a
learned log-variance u(sigma): a magnitude-preserving linear layer on Fourier features of c_noise (Eqs. 47, 75),
which weights the loss of every noise level by its own uncertainty (Eq. 21):

    L = lambda(sigma) / exp(u(sigma)) ||D_theta(x, sigma) - y||^2 + u(sigma),
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,   ln sigma ~ N(P_mean, P_std^2).

For fixed D_theta the optimum is u(sigma) = ln(lambda(sigma) E||D_theta - y||^2), so the weighted loss of every
sigma is brought to one. The perturbation is the PFGM++ kernel of `KernelLoss` (Gaussian at D = inf, EDM2's own
case). EDM2's settings: P_mean = -0.8, P_std = 1.6 for 64x64 pixels (`EDM2_PIXELS`, the default here), -0.4 and
1.0 for its 64x64x4 latents (`EDM2_LATENTS`).

State_dict: the network under `model.` as in every preconditioner here, and the head under EDM2's own names
(`logvar_fourier.freqs`, `logvar_fourier.phases`, `logvar_linear.weight`), so that EDM2's `Precond` imports by
key once its `unet.` prefix is read as `model.` (training/legacy.py).
"""

from __future__ import annotations

import torch

from dnnlib.util import records_init_kwargs
from training.networks.edm2 import MPConv, MPFourier
from training.preconditioners.edm import EDMLoss, EDMPrecond

# EDM2's noise-level distributions (NVlabs/edm2 train_edm2.py presets edm2-img64-* and edm2-img512-*).
EDM2_PIXELS = dict(P_mean=-0.8, P_std=1.6)
EDM2_LATENTS = dict(P_mean=-0.4, P_std=1.0)


class EDM2Loss(EDMLoss):
    """EDM2's uncertainty-weighted loss (Eq. 21) for any D: EDM's sigma, weight and PFGM++ perturbation, each noise
    level's error divided by exp(u(sigma)) and u(sigma) added. The network must take `return_logvar`."""

    def __init__(self, P_mean: float = EDM2_PIXELS["P_mean"], P_std: float = EDM2_PIXELS["P_std"], **kwargs):
        super().__init__(P_mean=P_mean, P_std=P_std, **kwargs)

    def denoising_loss(self, net, x: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor, labels=None,
                       augment_labels=None) -> torch.Tensor:
        """Per-element lambda(sigma) / exp(u(sigma)) (D_theta(x, sigma) - target)^2 + u(sigma) (Eq. 21)."""
        denoised, logvar = net(x, sigma, labels, augment_labels=augment_labels, return_logvar=True)
        return self.weight(sigma) / logvar.exp() * (denoised - target) ** 2 + logvar


@records_init_kwargs
class EDM2Precond(EDMPrecond):
    """EDM's preconditioning with EDM2's learned log-variance head u(sigma) (module docstring).

    `forward(..., return_logvar=True)` returns (D_theta(x, sigma) [B, C, H, W], u(sigma) [B, 1, 1, 1]), the form
    the loss calls (through DDP); samplers call it as every denoiser and get D_theta only.
    """

    loss_class = EDM2Loss

    @classmethod
    def training_kwargs(cls, *, D: float, cond: bool, pfgmpp_on: bool, options: dict) -> tuple[float, dict, dict]:
        """EDM's; P_mean and P_std left unset (None) take EDM2's values for pixels (`EDM2_PIXELS`)."""
        options = {**options, **{k: v for k, v in EDM2_PIXELS.items() if options.get(k) is None}}
        return super().training_kwargs(D=D, cond=cond, pfgmpp_on=pfgmpp_on, options=options)

    def __init__(self, model: torch.nn.Module, *, logvar_channels: int = 128, **kwargs):
        if not (isinstance(logvar_channels, int) and logvar_channels >= 1):
            raise ValueError(f"logvar_channels must be an integer >= 1, got {logvar_channels!r}")
        super().__init__(model, **kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)  # Eq. 75, of c_noise
        self.logvar_linear = MPConv(logvar_channels, 1)  # Eq. 47, fully connected

    def logvar(self, sigma, batch: int = 1) -> torch.Tensor:
        """The learned log-variance u(sigma) [batch], float32; sigma a scalar or one per sample."""
        device = self.logvar_fourier.freqs.device
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        c_noise = self.coefficients(sigma)[3].expand(batch)
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, force_fp32: bool = False,
                augment_labels: torch.Tensor | None = None,
                return_logvar: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """D_theta(x, sigma) in float32, with return_logvar also u(sigma) shaped [B, 1, ..., 1]."""
        denoised = super().forward(x, sigma, class_labels, force_fp32, augment_labels)
        if not return_logvar:
            return denoised
        return denoised, self.logvar(sigma, x.shape[0]).reshape(-1, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, logvar_channels={self.logvar_fourier.num_channels}"
