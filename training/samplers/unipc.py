"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), the B(h) = e^h - 1 variant ("bh2") with data prediction and the corrector UniC, for any D.

Step i (sigma_i -> sigma_{i+1}, h = ln(sigma_i / sigma_{i+1})) with order p (`multistep.step_orders`: warm-up, and
below 15 levels lower at the last two steps):

- Predictor UniP-p: x = (sigma_{i+1} / sigma_i) x_i + (1 - e^{-h}) D_i - B(-h) sum_k rho_k (D_{i-k} - D_i) / r_k,
  r_k = (lambda_{i-k} - lambda_i) / h for the p - 1 earlier outputs.
- Corrector UniC-p: the same update with D_{i+1} (the network at the prediction, r_p = 1) among the differences
  and the coefficients rho^c; it replaces x_{i+1} and D_{i+1} is reused as the next step's output, so the
  corrector costs no evaluation and raises the order by one.

The rho solve sum_k rho_k r_k^(j-1) = j! h phi_{j+1}(-h) / B(-h) (j = 1 .. p), with the paper's choices rho = 1/2
for the second-order predictor and the first-order corrector. `num_steps` levels give exactly num_steps network
evaluations; the sample is D(x, sigma_min) (the last step's prediction needs no correction).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from training.samplers import multistep
from training.samplers.base import Solver

ORDERS = (1, 2, 3)


def _targets(h: float, order: int) -> np.ndarray:
    """j! (-h) phi_{j+1}(-h) / B(-h), j = 1 .. order, with phi_1(z) = (e^z - 1) / z, phi_{k+1} = (phi_k - 1/k!) / z."""
    z, b = -h, math.expm1(-h)
    phi, factorial, targets = math.expm1(z) / z, 1.0, []
    for j in range(1, order + 1):
        phi = (phi - 1.0 / factorial) / z  # phi_{j+1}
        targets.append(factorial * z * phi / b)  # factorial = j!
        factorial *= j + 1
    return np.asarray(targets)


def _rule(ratio: float, h: float, ratios: list[float], rhos, new: float | None) -> multistep.Combination:
    """The update as weights of (D_new,) D_i, D_{i-1}, ...: rhos[k] weigh (D_{i-k-1} - D_i) / ratios[k] and `new`
    weighs D_{i+1} - D_i."""
    b = math.expm1(-h)
    current = -math.expm1(-h) + b * sum(rho / r for rho, r in zip(rhos, ratios))
    earlier = [-b * rho / r for rho, r in zip(rhos, ratios)]
    if new is None:
        return multistep.Combination(ratio, (current, *earlier))
    return multistep.Combination(ratio, (-b * new, current + b * new, *earlier))


def plan(sigmas: torch.Tensor, order: int = 2) -> list[multistep.Step]:
    """UniPC-bh2's predictor and corrector coefficients over the levels `sigmas`."""
    if order not in ORDERS:
        raise ValueError(f"the UniPC order must be one of {ORDERS}, got {order}")
    h = multistep.log_steps(sigmas)
    steps, orders = [], multistep.step_orders(len(h), order)
    for i, step in enumerate(h):
        p = orders[i]
        ratios = [-sum(h[i - k:i]) / step for k in range(1, p)]  # r_k < 0: the earlier outputs
        targets = _targets(step, p)
        powers = np.asarray([[r**j for r in [*ratios, 1.0]] for j in range(p)])  # R[j, k] = r_k^j
        if p == 1:
            predictor = []
        elif p == 2:
            predictor = [0.5]
        else:
            predictor = list(np.linalg.solve(powers[:-1, :-1], targets[:-1]))
        ratio = float(sigmas[i + 1] / sigmas[i])
        correct = None
        if i < len(h) - 1:  # the last prediction is only denoised: correcting it would change nothing
            corrector = [0.5] if p == 1 else list(np.linalg.solve(powers, targets))
            correct = _rule(ratio, step, ratios, corrector[:-1], float(corrector[-1]))
        steps.append(multistep.Step(_rule(ratio, step, ratios, predictor, None), correct))
    return steps


def sample(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, generator=None, *, order: int = 2,
           perturb_alpha: float = 0.0, callback=None, **level_options) -> tuple[torch.Tensor, int]:
    """Integrate the prior draws `latents` to samples with UniPC-bh2 of `order` (with the corrector: order + 1)."""
    sigmas = multistep.levels(net, **level_options)
    return multistep.integrate(net, latents, sigmas, plan(sigmas, int(order)), class_labels, callback, generator,
                               perturb_alpha)


UNIPC = Solver(sample, multistep.prior_latents, (*multistep.LEVEL_OPTIONS, "order", "perturb_alpha", "callback"),
               multistep.LEVEL_OPTIONS, "UniPC-bh2 with the corrector UniC: one evaluation per level")
