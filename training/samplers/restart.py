"""Restart (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), for any D.

The main process is EDM's Heun sampler over `num_steps` levels. For each restart interval [t_min, t_max],
once the main process reaches the level nearest t_min it is K times carried forward to t_max (re-noised) and
integrated back to t_min with N Heun steps on EDM's rho grid, as the reference's generate_restart.py does. The
interval list has the reference's format, a JSON object {"0": [N, K, t_min, t_max], ...} (`restart_info`);
`restart_gamma` adds EDM churn of that strength inside the intervals (between S_min and S_max).

Re-noising follows the PFGM++ kernel: if x = y + n with n ~ p(. | sigma = t_min), the increment of
`pfgmpp.transition_noise` makes n + increment ~ p(. | t_max) exactly, at every D (D = inf: Gaussian noise of
variance t_max^2 - t_min^2, the published algorithm). It needs |n|, taken as |x - D(x, t_min)| from the
evaluation the step into t_min already made (no extra NFE): exact when the denoiser identifies y, which is what
Restart's small t_min gives; tests/test_fast_solvers.py measures the law. The reference instead moves x along a
random direction of the N + D dimensional space until the augmented radius is sqrt(D) t_max.

Evaluations: 2 num_steps - 1 for the main process plus 2 (N - 1) per restart; `num_steps` keeps the reference's
meaning (the main process), and the NFE is reported exactly.
"""

from __future__ import annotations

import json
import math

import torch

from torch_utils import rng
from training import pfgmpp, schedules
from training.samplers import edm
from training.samplers.base import Solver
from training.samplers.levels import noise_levels

DEFAULT_RESTARTS = '{"0": [3, 2, 0.06, 0.30]}'  # the reference README's example (CIFAR-10, NFE 43 at 18 steps)
LEVEL_OPTIONS = ("num_steps", "sigma_min", "sigma_max", "rho", "discretization")


def parse_restarts(text: str) -> list[tuple[int, int, float, float]]:
    """[(N, K, t_min, t_max), ...] from the reference's JSON; ValueError naming what is wrong."""
    try:
        entries = json.loads(text)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f'restart_info must be JSON like {DEFAULT_RESTARTS} ({{"i": [N, K, t_min, t_max]}}), '
                         f"got {text!r}: {error}") from None
    if not isinstance(entries, dict):
        raise ValueError(f'restart_info must be a JSON object like {DEFAULT_RESTARTS}, got {text!r}')
    restarts = []
    for key, value in entries.items():
        if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"restart interval {key!r} must be [N, K, t_min, t_max], got {value!r}")
        steps, times, low, high = value
        if steps != int(steps) or steps < 2 or times != int(times) or times < 0:
            raise ValueError(f"restart interval {key!r}: N must be an integer >= 2 and K >= 0, got {value!r}")
        if not 0 < low < high < math.inf:
            raise ValueError(f"restart interval {key!r}: need 0 < t_min < t_max, got {value!r}")
        restarts.append((int(steps), int(times), float(low), float(high)))
    return restarts


def sample(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, generator: rng.Generators = None,
           *, num_steps: int = 18, sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
           discretization: str = "edm", restart_info: str = DEFAULT_RESTARTS, restart_gamma: float = 0.0,
           S_churn: float = 0.0, S_min: float = 0.0, S_max: float = math.inf, S_noise: float = 1.0,
           perturb_alpha: float = 0.0, callback=None) -> tuple[torch.Tensor, int]:
    """Integrate the prior draws `latents` with Restart: (samples in latents' dtype, network evaluations)."""
    if restart_gamma < 0:
        raise ValueError(f"restart_gamma must be >= 0, got {restart_gamma}")
    levels = noise_levels(net, num_steps, sigma_min, sigma_max, rho, discretization)
    at = {}  # main level index -> its intervals' inner levels and repeats
    for steps, times, low, high in parse_restarts(restart_info):
        index = int(torch.argmin((levels - low).abs()))
        if index == 0:
            raise ValueError(f"restart t_min = {low:g} is nearest the first level {float(levels[0]):g}: "
                             "an interval must end below the start")
        if high <= float(levels[index]) or high > float(net.sigma_max):
            raise ValueError(f"restart t_max = {high:g} must lie in ({float(levels[index]):g}, "
                             f"{float(net.sigma_max):g}], above the level nearest t_min")
        inner = schedules.edm_sigma_steps(steps, float(levels[index]), high, rho)
        inner = torch.as_tensor(net.round_sigma(inner), dtype=torch.float64).cpu()
        inner[-1] = levels[index]  # land exactly on the main level
        at.setdefault(index, []).append((inner, times))
    evaluations, last = 0, {}
    remember = lambda i, sigma_cur, sigma_next, x_next, denoised: last.update(denoised=denoised)  # noqa: E731

    def restart(i, x, denoised):  # after main step i, at level i + 1; `denoised`: the network there
        nonlocal evaluations
        for inner, times in at.get(i + 1, ()):
            for _ in range(times):
                x = x + S_noise * pfgmpp.transition_noise(x - denoised, float(inner[-1]), float(inner[0]), net.D,
                                                          generator)
                x, count = edm.integrate(net, x, inner, class_labels, generator, to_zero=False,
                                         S_churn=restart_gamma * (len(inner) - 1), S_min=S_min, S_max=S_max,
                                         S_noise=S_noise, perturb_alpha=perturb_alpha, callback=remember)
                denoised, evaluations = last["denoised"], evaluations + count
        return x

    x, count = edm.integrate(net, latents, levels, class_labels, generator, S_churn=S_churn, S_min=S_min,
                             S_max=S_max, S_noise=S_noise, perturb_alpha=perturb_alpha, callback=callback,
                             after_step=restart)
    return x, count + evaluations


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None, **level_options):
    """The network's prior at the main process's first level."""
    return edm.prior_latents(net, generator, batch, device, **level_options)


OPTIONS = (*LEVEL_OPTIONS, "restart_info", "restart_gamma", "S_churn", "S_min", "S_max", "S_noise", "perturb_alpha",
           "callback")
RESTART = Solver(sample, prior_latents, OPTIONS, LEVEL_OPTIONS,
                 "Restart: EDM's Heun with re-noised, re-solved intervals (the PFGM++ kernel's transition)")
