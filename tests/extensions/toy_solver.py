"""A toy solver, as a user would add one: one file (this) plus one registry line (`SOLVERS["toy"] = TOY`).

One Euler step of the probability-flow ODE from sigma_max straight to sigma = 0, x = D(x, sigma_max): the
denoiser's guess at the data, which costs one network evaluation.
"""

from __future__ import annotations

import torch

from torch_utils import rng
from training.samplers.base import Solver, draw_prior
from training.samplers.levels import flow_range


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None,
                  sigma_max: float | None = None) -> torch.Tensor:
    """The network's prior at sigma_max."""
    return draw_prior(net, generator, flow_range(net, sigma_max=sigma_max)[1], batch, device)


def sample(net, latents: torch.Tensor, class_labels=None, generator: rng.Generators = None,
           sigma_max: float | None = None) -> tuple[torch.Tensor, int]:
    """x = D(x, sigma_max): (images, one evaluation)."""
    sigma = flow_range(net, sigma_max=sigma_max)[1]
    return net(latents, sigma, class_labels).to(latents.dtype), 1


TOY = Solver(sample, prior_latents, ("sigma_max",), ("sigma_max",), "one denoising step from sigma_max")
