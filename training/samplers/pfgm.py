"""PFGM's sampler (Xu et al. 2022): the backward ODE in t = ln z, from z_max to z_min, for PFGM networks.

A PFGM network's field gives dx/dt = z v_x / v_z = x - D(x, z) (training/preconditioners/pfgm.py), the
probability-flow ODE in t = ln z; z plays the part of sigma, so the options are named sigma_min and sigma_max
(z_min and z_max: by default the network's own; values outside the network's range are clamped to it, for the
prior and the sampler alike, as every sampler here does). PFGM integrates it with RK45 (its default, rtol = atol = 1e-4)
or with `num_steps` uniform steps of forward or improved Euler, and returns x at z_min; `denoise` takes the
Euler step on to z = 0 instead (x = D(x, z_min): free with RK45, one evaluation otherwise). The prior is the
D = 1 kernel at z_max with its norm clipped by the network's upper_norm. Registered as pfgm_rk45, pfgm_euler,
pfgm_improved_euler; every other ODE solver runs PFGM networks too.
"""

from __future__ import annotations

import functools
import math

import torch

from torch_utils import rng
from training import ode
from training.samplers import rk45
from training.samplers.base import Solver, draw_prior, log_sigma_drift
from training.samplers.levels import noise_levels

METHODS = ("rk45", "euler", "improved_euler")


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None,
                  sigma_max: float | None = None) -> torch.Tensor:
    """PFGM's prior: the D = 1 kernel at z_max (default: the network's), its norm clipped by upper_norm."""
    if getattr(net, "upper_norm", None) is None:
        raise ValueError(f"the pfgm_* solvers are PFGM's sampler, for networks trained with --precond=pfgm; "
                         f"{type(net).__name__} solves the same ODE with --solver=rk45")
    z_max = float(net.sigma_max if sigma_max is None else sigma_max)
    levels = noise_levels(net, sigma_min=min(float(net.sigma_min), z_max / 2), sigma_max=z_max)
    return draw_prior(net, generator, float(levels[0]), batch, device)


def sample(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, generator: rng.Generators = None,
           method: str = "rk45", num_steps: int = 100, sigma_min: float | None = None, sigma_max: float | None = None,
           rtol: float = 1e-4, atol: float = 1e-4, denoise: bool = False) -> tuple[torch.Tensor, int]:
    """PFGM's sampler for a PFGM network (or any denoiser): (x, network evaluations); see the module docstring.

    `latents`: `prior_latents(net, generators, sigma_max=sigma_max)`. Deterministic: `generator` is not used.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    # Clamped to the network's range, as the prior and every other sampler are: the same z_max for both.
    z_min = max(float(net.sigma_min if sigma_min is None else sigma_min), float(net.sigma_min))
    z_max = min(float(net.sigma_max if sigma_max is None else sigma_max), float(net.sigma_max))
    if not 0 < z_min < z_max < math.inf:
        raise ValueError(f"need 0 < z_min < z_max < inf, got {z_min} and {z_max}")
    if method == "rk45":
        return rk45.sample(net, latents, class_labels, None, z_min, z_max, rtol, atol, denoise)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    drift = log_sigma_drift(net, class_labels)
    t = torch.linspace(math.log(z_max), math.log(z_min), int(num_steps) + 1, dtype=torch.float64).tolist()
    solution = ode.fixed_step(drift, latents.to(torch.float64), t, method)
    x, nfe = solution.y, solution.nfe
    if denoise:
        x, nfe = x - drift(t[-1], x), nfe + 1
    return x.to(latents.dtype), nfe


_RANGE = ("sigma_min", "sigma_max")
RK45 = Solver(functools.partial(sample, method="rk45"), prior_latents, (*_RANGE, "rtol", "atol", "denoise"),
              ("sigma_max",), "PFGM's RK45 in ln z (PFGM networks)")
EULER = Solver(functools.partial(sample, method="euler"), prior_latents, (*_RANGE, "num_steps", "denoise"),
               ("sigma_max",), "PFGM's forward Euler in ln z (PFGM networks)")
IMPROVED_EULER = Solver(functools.partial(sample, method="improved_euler"), prior_latents,
                        (*_RANGE, "num_steps", "denoise"), ("sigma_max",), "PFGM's improved Euler in ln z (PFGM networks)")
