"""What every sampler family shares: the registry entry, the prior draw and the probability-flow drift.

A family module (edm.py, rk45.py, score_sde.py, pfgm.py) defines, for each solver it offers, a `Solver`:

    prior(net, generator, batch=None, device=None, **prior_options) -> latents at the solver's first noise level
    run(net, latents, class_labels=None, generator=None, **options) -> (x at sigma = 0 or the last level, evaluations)

`options` names every keyword `run` reads and `prior_options` the subset `prior` reads (the noise range, the
SDE), so that `training.samplers.sample` can refuse an option the chosen solver does not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_utils import rng
from training import pfgmpp


@dataclass(frozen=True)
class Solver:
    """A registered solver: how to draw its latents (`prior`) and integrate them (`run`), and what each reads."""

    run: Callable[..., tuple[torch.Tensor, int]]
    prior: Callable[..., torch.Tensor]
    options: tuple[str, ...]
    prior_options: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if not set(self.prior_options) <= set(self.options):
            raise ValueError(f"prior options {self.prior_options} must be among the solver's options {self.options}")


@dataclass
class SampleInfo:
    """Filled in by `training.samplers.sample`: network evaluations (calls of the network on the whole batch)."""

    nfe: int = 0


def draw_prior(net, generator: rng.Generators, sigma: float, batch: int | None = None, device=None) -> torch.Tensor:
    """x ~ p_r at noise level `sigma` (r = sigma sqrt(D), D = net.D), the network's own prior.

    `generator`: one per sample (batch = their count) or one generator with `batch`. Networks with an
    `upper_norm` (PFGM) get each draw's norm clipped there (PFGM App. B.2.1).
    """
    if batch is None:
        if generator is None or isinstance(generator, torch.Generator):
            raise ValueError("batch is required unless one generator per sample is given")
        batch = len(list(generator))
    if device is None:
        device = rng.device_of(generator)
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    latents = pfgmpp.sample_prior(shape, float(sigma), net.D, generator=generator, device=device)
    upper_norm = getattr(net, "upper_norm", None)
    if upper_norm is not None:
        norm = latents.flatten(1).norm(dim=1).reshape(-1, *([1] * (latents.ndim - 1)))
        latents = latents * (float(upper_norm) / norm).clamp(max=1.0)
    return latents


def perturbation(alpha: float, generator: rng.Generators) -> Callable[[torch.Tensor, float], torch.Tensor] | None:
    """The robustness study's modelling error (PFGM++ paper, Sec. 5.3; its generate_alpha.py): noise(x, sigma) =
    alpha * sigma * N(0, I), drawn from `generator` (one, or one per sample), which a fixed-step solver adds to x at
    the start of every step, where the level is sigma, before anything else (churn, the network). None for
    alpha = 0: nothing is added and nothing drawn, so the samples are those of the unperturbed solver, bitwise."""
    if not alpha >= 0 or math.isinf(alpha):
        raise ValueError(f"perturb_alpha must be a finite number >= 0, got {alpha}")
    if alpha == 0:
        return None
    randn_like = rng.randn_like_fn(generator)
    return lambda x, sigma: randn_like(x) * (float(alpha) * float(sigma))


def log_sigma_drift(net, class_labels: torch.Tensor | None = None) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """dx/dt of the probability-flow ODE in t = ln(sigma): sigma dx/dsigma = x - D(x, sigma), for any network and D.

    With r = sigma sqrt(D) the PFGM++ ODE dx/dr = (x - E[y|x]) / r is this ODE for every D (PFGM++ eq. 7).
    """

    def drift(t: float, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.full([], math.exp(t), dtype=torch.float64, device=x.device)  # a fill, no host-device copy
        return x - net(x, sigma, class_labels).to(x.dtype)

    return drift
