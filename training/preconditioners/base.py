"""The preconditioner protocol: D_theta(x, sigma) = c_skip x + c_out F_theta(c_in x, c_noise) (EDM Table 1).

A preconditioner wraps a network F_theta (`training.networks`), called as
`model(x, noise_labels, class_labels=None, augment_labels=None)` and stored under the `model.` prefix of the
state_dict as in EDM, and records D (math.inf for diffusion) so that a sampler draws the matching prior.
PFGM++ uses the same preconditioning for every D. A preconditioner holds its coefficients, and declares:

- `out_channels(img_channels)`: the channels its network outputs;
- `outputs`: what it computes besides the denoised image for a loss to train (EDM2's 'logvar', PFGM's 'field');
- `default_loss`: the loss it trains with unless train.py's --loss says otherwise (`training.losses`), or None
  for preconditioners that run imported networks only (iDDPM).

How a run's options become its keyword arguments is the loss's to say (`training.losses.base.Loss.configure`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from training.pfgmpp import check_D


class Precond(nn.Module):
    """Common wrapper: argument handling, mixed precision, the skip connection, and the declarations (module docstring)."""

    default_loss: ClassVar[str | None] = None
    outputs: ClassVar[tuple[str, ...]] = ()
    learned_variance = False  # iDDPM's models also output a variance, which is discarded
    score_sde = "ve"  # the Score SDE a predictor-corrector sampler runs by default (training.samplers.score_sde)

    @classmethod
    def out_channels(cls, img_channels: int) -> int:
        """Channels the network F_theta outputs for images of `img_channels` channels."""
        return 2 * img_channels if cls.learned_variance else img_channels

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
