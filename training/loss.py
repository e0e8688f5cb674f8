"""Training losses: EDM (PFGM++), VP and VE, one perturbation path for every D.

A loss is a callable `loss_fn(net, images, labels=None, augment_pipe=None, generator=None,
reference=None)` returning the per-element weighted loss lambda(sigma) ||D_theta(y + n, sigma) - target||^2.
Given the generator it is deterministic: sigma is drawn first, then the kernel noise n ~ p_r
(r = sigma sqrt(D); Gaussian at D = inf), so the D = inf path draws exactly what EDM's loss draws.
"""

from __future__ import annotations

import math

import torch

from torch_utils import rng
from training import pfgmpp, schedules


class KernelLoss:
    """Shared path: noise level, augmentation hook, PFGM++ perturbation, target and weight."""

    def __init__(self, D: float = math.inf, stf: bool = False, stf_chunk: int = 1024, fp: dict | None = None):
        self.D = pfgmpp.check_D(D)
        self.stf = bool(stf)
        if stf_chunk < 1:
            raise ValueError(f"stf_chunk must be >= 1, got {stf_chunk}")
        self.stf_chunk = int(stf_chunk)
        self.fp = None  # FP-Diffusion's score Fokker-Planck regulariser (training/fp_regularizer.py), off by default
        if fp:
            from training.fp_regularizer import FPRegularizer

            self.fp = FPRegularizer(D=self.D, **fp)

    def sample_sigma(self, batch: int, device, generator: rng.Generators = None) -> torch.Tensor:
        """Training noise levels, Tensor[batch] float32."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma)."""
        raise NotImplementedError

    def target(self, y: torch.Tensor, perturbed: torch.Tensor, sigma: torch.Tensor, reference) -> torch.Tensor:
        """The regression target: y, or with the stable target field E[y | perturbed] over a reference set."""
        if not self.stf:
            return y
        data = y if reference is None else torch.cat([y, reference.to(y.dtype)])
        return pfgmpp.posterior_mean(perturbed, sigma, self.D, data, chunk=self.stf_chunk)

    def draw(self, shape, device, generator: rng.Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma [B], noise n [B, ...]) for a batch of `shape`: sigma first, then the kernel noise.

        Drawing the whole global batch on every rank and slicing it makes training independent of the
        number of ranks and of gradient accumulation.
        """
        sigma = self.sample_sigma(shape[0], device, generator)
        noise = pfgmpp.sample_prior(shape, sigma, self.D, generator=generator, device=device)
        if self.fp is None:
            return sigma, noise
        return sigma, noise, self.fp.draw_probes(shape, device, generator)  # the regulariser's Hutchinson probes

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, reference=None, draws=None):
        """Per-element weighted loss; `draws` = (sigma, noise[, probes]) from `draw`, else drawn here from `generator`."""
        if self.stf and labels is not None:
            raise ValueError(
                "the stable target field averages over an unlabelled reference batch: "
                "train conditional models without stf"
            )
        if draws is None:
            sigma = self.sample_sigma(images.shape[0], images.device, generator)
        else:
            sigma, n, *probes = draws
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        if draws is None:
            n = pfgmpp.sample_perturbation(y, sigma, self.D, generator)
        perturbed = y + n.to(y.dtype)
        sigma_b = sigma.reshape(-1, *([1] * (y.ndim - 1)))
        denoised = net(perturbed, sigma_b, labels, augment_labels=augment_labels)
        target = self.target(y, perturbed, sigma, reference)
        loss = self.weight(sigma_b) * (denoised - target) ** 2
        if self.fp is not None:  # alpha (vector) + beta (scalar) FPE terms, added to every element of the sample
            probes = probes[0] if draws is not None and probes else self.fp.draw_probes(y.shape, y.device, generator)
            penalty = self.fp(net, perturbed, sigma, probes, labels, augment_labels)
            loss = loss + penalty.to(loss.dtype).reshape(sigma_b.shape)
        return loss


class EDMLoss(KernelLoss):
    """EDM / PFGM++ loss: ln(sigma / sigma_scale) ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, sigma_scale: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        if not P_std > 0 or not sigma_data > 0 or not sigma_scale > 0:
            raise ValueError(f"P_std, sigma_data and sigma_scale must be > 0, got {P_std}, {sigma_data}, {sigma_scale}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.sigma_scale = float(sigma_scale)  # PFGM++ trains LSUN 256^2 with sigma scaled by 380/80

    def sample_sigma(self, batch, device, generator=None):
        rnd_normal = rng.randn([batch], generator, device=device, dtype=torch.float32)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        return sigma if self.sigma_scale == 1.0 else sigma * self.sigma_scale

    def weight(self, sigma):
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VPLoss(KernelLoss):
    """Score SDE VP loss: t ~ U(epsilon_t, 1), sigma = sigma_vp(t), weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        if not 0 < epsilon_t < 1:
            raise ValueError(f"epsilon_t must lie in (0, 1), got {epsilon_t}")
        self.beta_d, self.beta_min, self.epsilon_t = float(beta_d), float(beta_min), float(epsilon_t)

    def sample_sigma(self, batch, device, generator=None):
        rnd_uniform = rng.rand([batch], generator, device=device, dtype=torch.float32)
        t = 1 + rnd_uniform * (self.epsilon_t - 1)
        return schedules.vp_sigma(t, self.beta_d, self.beta_min)

    def weight(self, sigma):
        return 1 / sigma**2


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


from training.pfgm import PFGMLoss  # noqa: E402 (PFGM's field objective lives with the rest of PFGM)

LOSSES = {"edm": EDMLoss, "vp": VPLoss, "ve": VELoss, "pfgm": PFGMLoss}
