"""Network preconditioning D_theta(x, sigma) = c_skip x + c_out F_theta(c_in x, c_noise) (EDM Table 1).

PFGM++ uses the same preconditioning for every D; each wrapper records D (math.inf for diffusion)
so that sampling draws the matching prior. The inner model has the signature
`model(x, noise_labels, class_labels=None, augment_labels=None)` and sits under the `model.` prefix
of the state_dict, as in EDM.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dnnlib.util import records_init_kwargs
from training import schedules
from training.pfgmpp import check_D


class Precond(nn.Module):
    """Common wrapper: argument handling, mixed precision, and the skip connection."""

    learned_variance = False  # iDDPM's models also output a variance, which is discarded

    def __init__(
        self,
        model: nn.Module,
        *,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        D: float = math.inf,
        sigma_min: float = 0.0,
        sigma_max: float = math.inf,
        sigma_data: float = 0.5,
    ):
        super().__init__()
        if img_resolution < 1 or img_channels < 1 or label_dim < 0:
            raise ValueError(
                f"img_resolution and img_channels must be >= 1 and label_dim >= 0, got "
                f"{img_resolution}, {img_channels}, {label_dim}"
            )
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.model = model
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)
        self.D = check_D(D)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for float32 sigma of shape [B, 1, ..., 1]."""
        raise NotImplementedError

    def round_sigma(self, sigma) -> torch.Tensor:
        """The noise level the network is actually evaluated at (identity for continuous sigma)."""
        return torch.as_tensor(sigma)

    def forward(
        self,
        x: torch.Tensor,
        sigma,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoised estimate D_theta(x, sigma) in float32; sigma is a scalar or one per sample."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_fp16 else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        F_x = self.model((c_in * x).to(dtype), c_noise, class_labels=class_labels, augment_labels=augment_labels)
        if self.learned_variance:
            F_x = F_x[:, : self.img_channels]
        return c_skip * x + c_out * F_x.to(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"D={self.D}, img_resolution={self.img_resolution}, img_channels={self.img_channels}, "
            f"label_dim={self.label_dim}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
            f"sigma_data={self.sigma_data}, use_fp16={self.use_fp16}"
        )


@records_init_kwargs
class EDMPrecond(Precond):
    """EDM / PFGM++ preconditioning: unit-variance input and target at every sigma."""

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


@records_init_kwargs
class VPPrecond(Precond):
    """Score SDE variance-preserving preconditioning; noise labels are (M - 1) t(sigma)."""

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


@records_init_kwargs
class VEPrecond(Precond):
    """Score SDE variance-exploding preconditioning; noise labels are ln(sigma / 2)."""

    def __init__(self, model, **kwargs):
        kwargs.setdefault("sigma_min", 0.02)
        kwargs.setdefault("sigma_max", 100.0)
        super().__init__(model, **kwargs)

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


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


PRECONDITIONERS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond}
