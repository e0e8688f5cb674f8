"""EDM2's preconditioning (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models"),
for every D of PFGM++.

The denoiser is EDM's, D_theta(x, sigma) = c_skip x + c_out F_theta(c_in x, c_noise) with EDM's coefficients
(sigma_data = 0.5, c_noise = ln(sigma) / 4), which PFGM++ uses for every D (r = sigma sqrt(D)). EDM2 adds a
learned log-variance u(sigma): a magnitude-preserving linear layer on Fourier features of c_noise (Eqs. 47, 75),
the network's 'logvar' output, which EDM2's loss trains (training/losses/edm2.py, Eq. 21).

State_dict: the network under `model.` as in every preconditioner here, and the head under EDM2's own names
(`logvar_fourier.freqs`, `logvar_fourier.phases`, `logvar_linear.weight`), so that EDM2's `Precond` imports by
key once its `unet.` prefix is read as `model.` (training/checkpoint/legacy.py).
"""

from __future__ import annotations

import torch

from dnnlib.util import records_init_kwargs
from training.networks.edm2 import MPConv, MPFourier
from training.preconditioners.edm import EDMPrecond


@records_init_kwargs
class EDM2Precond(EDMPrecond):
    """EDM's preconditioning with EDM2's learned log-variance head u(sigma) (module docstring).

    `forward(..., return_logvar=True)` returns (D_theta(x, sigma) [B, C, H, W], u(sigma) [B, 1, 1, 1]), the form
    the loss calls (through DDP); samplers call it as every denoiser and get D_theta only.
    """

    default_loss = "edm2"
    outputs = ("logvar",)

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
