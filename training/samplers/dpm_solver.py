"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): multistep exponential integrators with data prediction, for any D.

The probability-flow ODE is the same for every D (training/samplers/multistep.py), so the solvers apply as
published, in lambda = -ln(sigma); only the prior is D's. Registered as

- `dpmpp-2m`: Algorithm 2 of the paper. The first step is DPM-Solver++(1) (DDIM); step i then uses
  D_d = (1 + 1/(2 r)) D_i - 1/(2 r) D_{i-1}, r = h_{i-1} / h_i, and x_{i+1} = e^{-h} x_i + (1 - e^{-h}) D_d.
  Second order.
- `dpmpp-3m`: the third-order multistep method: D under the integral replaced by the quadratic through the last
  three outputs (in lambda), integrated exactly (`multistep.adams_weights`); the first two steps use the one and
  two outputs there are, and below 15 levels the last two steps are of order 1 and 2 (DPM-Solver's
  `lower_order_final`). Third order. The widely distributed "3M" update (e.g. the reference implementation's
  `multistep_dpm_solver_third_update`) weighs the second divided difference by half of this and converges at
  order 2 (tests/test_fast_solvers.py measures both).

`num_steps` levels give exactly num_steps network evaluations; the sample is D(x, sigma_min).
"""

from __future__ import annotations

import functools
import math

import torch

from training.samplers import multistep
from training.samplers.base import Solver


def plan_2m(sigmas: torch.Tensor) -> list[multistep.Step]:
    """DPM-Solver++(2M)'s coefficients over the levels `sigmas`."""
    h = multistep.log_steps(sigmas)
    plan = []
    for i, step in enumerate(h):
        ratio, first = float(sigmas[i + 1] / sigmas[i]), -math.expm1(-step)
        if i == 0:
            outputs = (first,)
        else:
            r = h[i - 1] / step
            outputs = (first * (1 + 1 / (2 * r)), -first / (2 * r))
        plan.append(multistep.Step(multistep.Combination(ratio, outputs)))
    return plan


def plan_multistep(sigmas: torch.Tensor, order: int) -> list[multistep.Step]:
    """The exponential Adams method of `order` (the exact integral of the interpolating polynomial)."""
    h = multistep.log_steps(sigmas)
    plan = []
    for i, (step, k) in enumerate(zip(h, multistep.step_orders(len(h), order))):
        past = h[i - k + 1:i][::-1]  # h_{i-1}, h_{i-2}, ...: k - 1 of them
        weights = multistep.adams_weights(step, past)
        plan.append(multistep.Step(multistep.Combination(float(sigmas[i + 1] / sigmas[i]), weights)))
    return plan


def sample(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, generator=None, *, order: int = 2,
           perturb_alpha: float = 0.0, callback=None, **level_options) -> tuple[torch.Tensor, int]:
    """Integrate the prior draws `latents` to samples with DPM-Solver++(2M) (order 2) or (3M) (order 3)."""
    sigmas = multistep.levels(net, **level_options)
    plan = plan_2m(sigmas) if order == 2 else plan_multistep(sigmas, order)
    return multistep.integrate(net, latents, sigmas, plan, class_labels, callback, generator, perturb_alpha)


OPTIONS = (*multistep.LEVEL_OPTIONS, "perturb_alpha", "callback")
DPMPP_2M = Solver(functools.partial(sample, order=2), multistep.prior_latents, OPTIONS, multistep.LEVEL_OPTIONS,
                  "DPM-Solver++(2M): second-order multistep, one evaluation per level")
DPMPP_3M = Solver(functools.partial(sample, order=3), multistep.prior_latents, OPTIONS, multistep.LEVEL_OPTIONS,
                  "DPM-Solver++(3M): third-order multistep, one evaluation per level")
