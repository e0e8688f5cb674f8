"""Noise levels: the discretisations of EDM Table 1 and the noise range every sampler clamps to its network.

A network supplies sigma_min, sigma_max and round_sigma (iDDPM's discrete grid); a discretisation supplies
its default range and its levels sigma_0 > ... > sigma_{n-1} (0 excluded), in float64 on the host.
"""

from __future__ import annotations

import math

import torch

from training import schedules

DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")
DEFAULT_RANGE = {"edm": (0.002, 80.0), "ve": (0.02, 100.0), "iddpm": (0.002, 81.0)}  # vp: from epsilon_s


def check_choice(name: str, value: str, choices) -> None:
    """ValueError unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def clamped_range(net, discretization: str = "edm", sigma_min: float | None = None, sigma_max: float | None = None,
                  epsilon_s: float = 1e-3) -> tuple[float, float]:
    """The noise-level range: the discretisation's defaults, clamped to what the network supports."""
    if discretization == "vp":
        default = (float(schedules.vp_sigma(epsilon_s)), float(schedules.vp_sigma(1.0)))
    else:
        default = DEFAULT_RANGE[discretization]
    lo = default[0] if sigma_min is None else float(sigma_min)
    hi = default[1] if sigma_max is None else float(sigma_max)
    lo, hi = max(lo, float(net.sigma_min)), min(hi, float(net.sigma_max))
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf (after clamping to the network's range), got {lo}, {hi}")
    return lo, hi


def noise_levels(
    net,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    discretization: str = "edm",
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
) -> torch.Tensor:
    """The sampler's noise levels sigma_0 > ... > sigma_{n-1}: float64 on the CPU, rounded by the network, 0 excluded."""
    check_choice("discretization", discretization, DISCRETIZATIONS)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    lo, hi = clamped_range(net, discretization, sigma_min, sigma_max, epsilon_s)
    step = torch.arange(num_steps, dtype=torch.float64) / max(num_steps - 1, 1)
    if discretization == "vp":
        beta_d, beta_min = schedules.vp_betas_for_range(lo, hi, epsilon_s)
        sigmas = schedules.vp_sigma(1 + step * (epsilon_s - 1), beta_d, beta_min)
    elif discretization == "ve":
        sigmas = schedules.ve_sigma(hi**2 * (lo**2 / hi**2) ** step)
    elif discretization == "iddpm":
        u = schedules.iddpm_sigmas(M, C_1, C_2)
        u = u[(u >= lo) & (u <= hi)]
        sigmas = u[(step * (len(u) - 1)).round().long()]
    else:
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        sigmas = schedules.edm_sigma_steps(num_steps, lo, hi, rho)
    levels = torch.as_tensor(net.round_sigma(sigmas), dtype=torch.float64).cpu()
    if not bool(torch.all(torch.isfinite(levels) & (levels > 0))):
        raise ValueError(f"the {discretization} noise levels from sigma_max={hi:g} to sigma_min={lo:g}"
                         + (f" with rho={rho:g}" if discretization == "edm" else "")
                         + " reach 0 in float64 arithmetic: narrow the range" + (" or raise --rho" if discretization == "edm" else ""))
    return levels


def flow_range(net, sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the probability-flow ODE: EDM's [0.002, 80] by default, clamped and rounded by the network."""
    levels = noise_levels(net, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max)
    return float(levels[-1]), float(levels[0])
