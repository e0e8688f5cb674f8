"""The probability-flow ODE with the adaptive Dormand-Prince RK45 solver, for any network and D.

dx/dsigma = (x - D(x, sigma)) / sigma is integrated in t = ln(sigma) (smooth in log-time, as PFGM's t = ln z);
the step is shared by the batch and controlled by the largest per-sample error (`training.ode.rk45`, one host
sync per step), so a sample depends on its batch companions within the tolerance. Registered as `rk45`.
"""

from __future__ import annotations

import math

import torch

from torch_utils import rng
from training import ode
from training.samplers.base import Solver, draw_prior, log_sigma_drift
from training.samplers.levels import noise_levels


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None,
                  sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """The network's prior at sigma_max (EDM's 80 by default, clamped to the network's range)."""
    return draw_prior(net, generator, float(noise_levels(net, sigma_min=sigma_min, sigma_max=sigma_max)[0]), batch, device)


def sample(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: rng.Generators = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    denoise: bool = True,
) -> tuple[torch.Tensor, int]:
    """Solve dx/dsigma = (x - D(x, sigma)) / sigma from sigma_max to sigma_min with adaptive RK45; (x, nfe).

    With `denoise`, the last step to sigma = 0 is Euler's, which equals the denoiser: x_0 = D(x, sigma_min). It is
    free: RK45's last stage already evaluated the drift there. `latents` are prior draws at sigma_max
    (`prior_latents` with the same sigma_min and sigma_max); defaults: EDM's [0.002, 80] clamped to the network's
    range. Deterministic: `generator` is not used. Returns x in latents' dtype and the number of network evaluations.
    """
    levels = noise_levels(net, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max)
    sigma_hi, sigma_lo = float(levels[0]), float(levels[-1])
    x = latents.to(torch.float64)
    solution = ode.rk45(log_sigma_drift(net, class_labels), x, math.log(sigma_hi), math.log(sigma_lo), rtol=rtol, atol=atol)
    x = solution.y - solution.dy if denoise else solution.y
    return x.to(latents.dtype), solution.nfe


RK45 = Solver(sample, prior_latents, ("sigma_min", "sigma_max", "rtol", "atol", "denoise"), ("sigma_min", "sigma_max"),
              "adaptive probability-flow ODE (Dormand-Prince), any network and D")
