"""Multistep exponential integrators of the probability-flow ODE in lambda = -ln(sigma), for any D.

In lambda the ODE dx/dsigma = (x - D(x, sigma)) / sigma (the same for every D; only the prior depends on D)
reads dx/dlambda = D - x, whose exact solution over a step h = lambda_next - lambda = ln(sigma / sigma_next) is

    x_next = e^{-h} x + int_0^h e^{-(h - u)} D(lambda + u) du.

A multistep solver (DPM-Solver++, UniPC) replaces D under the integral by a combination of the denoised outputs
it already has, so every step is x_next = a x + sum_j b_j D_j. The coefficients depend on the noise levels
only: they are computed once, on the host, in float64 (a list of `Step`), and `integrate` applies them with one
network evaluation per level, no host-device sync. The last evaluation, D(x, sigma_min), is the sample: EDM's
last Euler step to sigma = 0 gives the same. NFE = the number of levels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.samplers.base import draw_prior, perturbation
from training.samplers.levels import noise_levels

# The options of `noise_levels` that a multistep solver reads (its prior draw too).
LEVEL_OPTIONS = ("num_steps", "sigma_min", "sigma_max", "rho", "discretization")


@dataclass(frozen=True)
class Combination:
    """a x + sum_j b_j D_j: `state` is a, `outputs` the b_j, newest denoised output first."""

    state: float
    outputs: tuple[float, ...]


@dataclass(frozen=True)
class Step:
    """One step sigma_i -> sigma_{i+1}: the prediction from x_i and D_i, D_{i-1}, ...; optionally a correction
    from x_i and D_{i+1} (the network at the prediction), D_i, D_{i-1}, ... (UniPC's corrector, no extra NFE)."""

    predict: Combination
    correct: Combination | None = None


def prior_latents(net, generator, batch: int | None = None, device=None, **level_options) -> torch.Tensor:
    """x from the network's own prior at the first level (D = net.D); `level_options` as in `levels`."""
    return draw_prior(net, generator, float(levels(net, **level_options)[0]), batch, device)


def levels(net, num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None,
           rho: float = 7.0, discretization: str = "edm") -> torch.Tensor:
    """The noise levels sigma_0 > ... > sigma_{n-1} > 0 (float64, host); n = num_steps = NFE."""
    return noise_levels(net, num_steps, sigma_min, sigma_max, rho, discretization)


def log_steps(sigmas: torch.Tensor) -> list[float]:
    """h_i = ln(sigma_i / sigma_{i+1}), the steps in lambda; ValueError unless the levels strictly decrease."""
    values = [float(v) for v in sigmas]
    steps = [math.log(a / b) for a, b in zip(values[:-1], values[1:])]
    if any(not h > 0 for h in steps):
        raise ValueError(f"the noise levels must strictly decrease, got {values}")
    return steps


LOWER_ORDER_FINAL_BELOW = 15  # levels: below this, the last steps lower their order (DPM-Solver's, diffusers' rule)


def step_orders(count: int, order: int) -> list[int]:
    """The order of each of `count` steps: warming up (step i has i + 1 outputs), and with fewer than
    `LOWER_ORDER_FINAL_BELOW` levels lowered towards the end (the last step first order, the one before second),
    where the steps in lambda of EDM's grid are longest and extrapolating more outputs is unstable."""
    final = count + 1 < LOWER_ORDER_FINAL_BELOW
    return [min(order, i + 1, count - i if final else order) for i in range(count)]


def exp_moments(h: float, count: int) -> list[float]:
    """int_0^h e^{-(h - u)} u^k du for k = 0 .. count - 1 (k = 0: 1 - e^{-h})."""
    moments = [-math.expm1(-h)]
    for k in range(1, count):
        moments.append(h**k - k * moments[-1])
    return moments


def adams_weights(h: float, past: Sequence[float]) -> tuple[float, ...]:
    """Weights of D_i, D_{i-1}, ... (newest first) in int_0^h e^{-(h - u)} P(u) du, P interpolating the outputs.

    `past` are the earlier steps h_{i-1}, h_{i-2}, ...: the nodes are u = 0, -h_{i-1}, -(h_{i-1} + h_{i-2}), ...
    Exact when D is a polynomial in lambda of degree len(past): order len(past) + 1.
    """
    nodes = np.concatenate([[0.0], -np.cumsum(np.asarray(past, dtype=np.float64))])
    vandermonde = nodes[:, None] ** np.arange(len(nodes))[None, :]
    return tuple(float(w) for w in np.linalg.solve(vandermonde.T, np.asarray(exp_moments(h, len(nodes)))))


def _combine(rule: Combination, x: torch.Tensor, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    result = x * rule.state
    for weight, denoised in zip(rule.outputs, outputs):
        if weight != 0:
            result.add_(denoised, alpha=weight)
    return result


def integrate(net, latents: torch.Tensor, sigmas: torch.Tensor, steps: Sequence[Step],
              class_labels: torch.Tensor | None = None, callback: Callable | None = None, generator=None,
              perturb_alpha: float = 0.0) -> tuple[torch.Tensor, int]:
    """Run a plan: (D(x, sigma_{n-1}) in latents' dtype, n evaluations); len(steps) = n - 1 = len(sigmas) - 1.

    `callback(i, sigma_i, x_i, D_i)` follows every evaluation (x_i: the point the network saw). `perturb_alpha` > 0
    adds perturb_alpha * sigma_i * N(0, I) (from `generator`) to the state at every level before the network sees
    it (`base.perturbation`); a corrected state gets the same draw as the prediction it corrects.
    """
    perturb = perturbation(perturb_alpha, generator)
    if len(steps) != len(sigmas) - 1:
        raise ValueError(f"a plan over {len(sigmas)} levels has {len(sigmas) - 1} steps, got {len(steps)}")
    depth = max([1] + [len(rule.outputs) for step in steps for rule in (step.predict, step.correct) if rule])
    on_device = sigmas.to(device=latents.device, dtype=torch.float64)  # one copy: no host-device sync per step
    x = latents.to(torch.float64)
    if perturb is not None:
        x = x + perturb(x, float(sigmas[0]))
    denoised = net(x, on_device[0], class_labels).to(torch.float64)
    if callback is not None:
        callback(0, float(sigmas[0]), x, denoised)
    outputs: list[torch.Tensor] = []
    for i, step in enumerate(steps):
        outputs = [denoised, *outputs][:depth]
        x_pred = _combine(step.predict, x, outputs)
        noise = None if perturb is None else perturb(x_pred, float(sigmas[i + 1]))
        if noise is not None:
            x_pred = x_pred + noise
        denoised = net(x_pred, on_device[i + 1], class_labels).to(torch.float64)
        if callback is not None:
            callback(i + 1, float(sigmas[i + 1]), x_pred, denoised)
        if step.correct is None:
            x = x_pred
        else:
            x = _combine(step.correct, x, [denoised, *outputs])
            x = x if noise is None else x + noise
    return denoised.to(latents.dtype), len(sigmas)
