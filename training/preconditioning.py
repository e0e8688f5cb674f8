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
        x, sigma, class_labels, dtype = self._inputs(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        c_noise = c_noise.reshape(-1).expand(x.shape[0])
        F_x = self.model((c_in * x).to(dtype), c_noise, class_labels=class_labels, augment_labels=augment_labels)
        if self.learned_variance:
            F_x = F_x[:, : self.img_channels]
        return c_skip * x + c_out * F_x.to(torch.float32)

    def _inputs(self, x, sigma, class_labels, force_fp32: bool):
        """x in float32, sigma as [B, 1, ..., 1] float32, class labels [B, label_dim] or None, the network dtype."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_fp16 = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        return x, sigma, class_labels, torch.float16 if use_fp16 else torch.float32

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


# The z-component of the predicted field is kept below -_V_Z_CEILING, so that x - z v_x / v_z stays finite.
_V_Z_CEILING = 1e-5


@records_init_kwargs
class PFGMPrecond(Precond):
    """PFGM (D = 1, Xu et al. 2022): the network predicts the normalised Poisson field (v_x, v_z) in N + 1 dims.

    As in PFGM's reference code: the input is x itself (no c_in scaling), the noise label is ln z, and the
    network has img_channels + 1 output channels: v_x is the first img_channels, v_z the spatial mean of the
    last. `field` (or `forward(..., return_field=True)`, for DDP) returns (v_x, v_z), the training target's
    form. Called like every preconditioner, the network is a denoiser: the field of a finite set is parallel
    to (E[y|x] - x, -z) with E[y|x] the PFGM++ posterior mean at D = 1, r = z (see `training.pfgm`), so
    D(x, sigma = z) = x - z v_x / v_z, and every sampler of this project runs PFGM networks. The PFGM
    sampling settings travel with the network: sigma_max = z_max, sigma_min = z_min, upper_norm (the prior's
    norm is clipped there), gamma and z_exp (below z_exp, v_z is derived from |v_x|, PFGM App. B.2.3).
    """

    def __init__(self, model, *, gamma: float = 5.0, z_exp: float = 5.0, upper_norm: float = 3000.0, D: float = 1.0,
                 **kwargs):
        if check_D(D) != 1.0:
            raise ValueError(f"PFGM is D = 1, got D={D}; for PFGM++ at other D use EDMPrecond with that D")
        if not (gamma >= 0 and z_exp >= 0 and upper_norm > 0):
            raise ValueError(f"need gamma >= 0, z_exp >= 0 and upper_norm > 0, got {gamma}, {z_exp}, {upper_norm}")
        kwargs.setdefault("sigma_min", 1e-3)  # PFGM's z_min for CIFAR-10
        kwargs.setdefault("sigma_max", 40.0)  # PFGM's z_max for CIFAR-10
        super().__init__(model, D=1.0, **kwargs)
        self.gamma, self.z_exp, self.upper_norm = float(gamma), float(z_exp), float(upper_norm)

    def field(self, x, z, class_labels=None, force_fp32: bool = False, augment_labels=None):
        """The predicted normalised field (v_x [B, C, H, W], v_z [B]) at (x, z), float32."""
        x, z, class_labels, dtype = self._inputs(x, z, class_labels, force_fp32)
        c_noise = z.log().reshape(-1).expand(x.shape[0])
        F_x = self.model(x.to(dtype), c_noise, class_labels=class_labels, augment_labels=augment_labels).to(torch.float32)
        return F_x[:, : self.img_channels], F_x[:, self.img_channels].flatten(1).mean(dim=1)

    def z_component(self, v_x: torch.Tensor, v_z: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """v_z, replaced below z_exp by the value |v_x| implies (PFGM App. B.2.3), kept < 0."""
        if self.z_exp > 0 and self.gamma > 0:
            scale = math.sqrt(v_x[0].numel() + 1)  # the target's sqrt(N + 1) (training.pfgm.normalized_field)
            # |v_x| / scale ~ |E| / (|E| + gamma) gives |E|; then v_z = -scale z / (|(E, z)| + gamma).
            ratio = (v_x.flatten(1).norm(dim=1) / scale).clamp(max=1 - 1e-6)
            norm = self.gamma * ratio / (1 - ratio)
            implied = -scale * z / ((norm.square() + z.square()).sqrt() + self.gamma)
            v_z = torch.where(z < self.z_exp, implied, v_z)
        return v_z.clamp(max=-_V_Z_CEILING)

    def forward(self, x, sigma, class_labels=None, force_fp32: bool = False, augment_labels=None,
                return_field: bool = False):
        """D(x, sigma) = x - sigma v_x / v_z with z = sigma; with return_field, the field (v_x, v_z) itself."""
        v_x, v_z = self.field(x, sigma, class_labels, force_fp32, augment_labels)
        if return_field:
            return v_x, v_z
        x = x.to(torch.float32)
        z = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        ratio = z / self.z_component(v_x, v_z, z)
        return x - ratio.reshape(-1, *([1] * (x.ndim - 1))) * v_x


PRECONDITIONERS = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond, "pfgm": PFGMPrecond}
