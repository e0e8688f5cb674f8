"""PFGM's preconditioning (Xu et al. 2022), the D = 1 member of PFGM++: the network predicts the normalised Poisson
field in N + 1 dimensions, which is also a denoiser.

The field of a finite set {y_i} at (x, z) is parallel to (E[y|x] - x, -z), E[y|x] the PFGM++ posterior mean at
D = 1 with r = z (training/losses/pfgm.py, which trains it). So D(x, sigma = z) = x - z v_x / v_z, and its
backward ODE in t = ln z, dx/dt = z v_x / v_z, is the probability-flow ODE of that denoiser
(`training.samplers.pfgm`, PFGM's sampler; every other sampler runs PFGM networks too).
"""

from __future__ import annotations

import math

import torch

from dnnlib.util import records_init_kwargs
from training.pfgmpp import check_D
from training.preconditioners.base import Precond

# The z-component of the predicted field is kept below -_V_Z_CEILING, so that x - z v_x / v_z stays finite.
_V_Z_CEILING = 1e-5


@records_init_kwargs
class PFGMPrecond(Precond):
    """PFGM (D = 1, Xu et al. 2022): the network predicts the normalised Poisson field (v_x, v_z) in N + 1 dims.

    As in PFGM's reference code: the input is x itself (no c_in scaling), the noise label is ln z, and the
    network has img_channels + 1 output channels: v_x is the first img_channels, v_z the spatial mean of the
    last. `field` (or `forward(..., return_field=True)`, for DDP) returns (v_x, v_z), the training target's
    form. Called like every preconditioner, the network is a denoiser: the field of a finite set is parallel
    to (E[y|x] - x, -z) with E[y|x] the PFGM++ posterior mean at D = 1, r = z (see the module docstring), so
    D(x, sigma = z) = x - z v_x / v_z, and every sampler of this project runs PFGM networks. The PFGM
    sampling settings travel with the network: sigma_max = z_max, sigma_min = z_min, upper_norm (the prior's
    norm is clipped there), gamma and z_exp (below z_exp, v_z is derived from |v_x|, PFGM App. B.2.3).
    """

    default_loss = "pfgm"
    outputs = ("field",)

    @classmethod
    def out_channels(cls, img_channels: int) -> int:
        """v_x, and one more channel whose spatial mean is v_z."""
        return img_channels + 1

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
            scale = math.sqrt(v_x[0].numel() + 1)  # the target's sqrt(N + 1) (`normalized_field`)
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
