"""EDM's sampler (Karras et al. 2022, Algorithms 1 and 2) with every ablation of EDM Table 1, for any D.

With r = sigma sqrt(D) the PFGM++ ODE dx/dr = (x - E[y|x]) / r becomes dx/dsigma = (x - D(x, sigma)) / sigma,
EDM's ODE, for every D; only the prior differs (`prior_latents` draws the network's own). `sample` covers
the deterministic sampler (Algorithm 1) and the stochastic one (Algorithm 2, churn), and the ablations:
time discretisation edm|vp|ve|iddpm, schedule sigma(t) linear|vp|ve, scaling s(t) none|vp, solver euler|heun.
The network is called as `net(x, sigma, class_labels)` and supplies sigma_min, sigma_max, round_sigma, D.
Registered as the solvers `heun` and `euler` (training/samplers/__init__.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_utils import rng
from training import schedules
from training.samplers.base import Solver, draw_prior, perturbation
from training.samplers.levels import DISCRETIZATIONS, check_choice, clamped_range, noise_levels

METHODS = ("euler", "heun")
SCHEDULES = ("linear", "vp", "ve")
SCALINGS = ("none", "vp")
__all__ = ["DISCRETIZATIONS", "EULER", "HEUN", "METHODS", "SCALINGS", "SCHEDULES", "integrate", "prior_latents", "sample"]

# The options of `noise_levels`, which the prior draw shares with the sampler.
LEVEL_OPTIONS = ("num_steps", "sigma_min", "sigma_max", "rho", "discretization", "epsilon_s", "C_1", "C_2", "M")


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None, **level_options) -> torch.Tensor:
    """x_0 from the network's own prior p_{r_max} (D = net.D) at the sampler's first noise level.

    `level_options` are those of `noise_levels`; pass the same ones to `sample`.
    """
    return draw_prior(net, generator, float(noise_levels(net, **level_options)[0]), batch, device)


def _time_functions(schedule, scaling, sigma_min, sigma_max, epsilon_s):
    """sigma(t), sigma'(t), t(sigma), s(t), s'(t) for the chosen schedule and scaling."""
    if schedule == "vp":
        beta_d, beta_min = schedules.vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
        sigma = lambda t: schedules.vp_sigma(t, beta_d, beta_min)  # noqa: E731
        sigma_deriv = lambda t: schedules.vp_sigma_deriv(t, beta_d, beta_min)  # noqa: E731
        sigma_inv = lambda s: schedules.vp_sigma_inv(s, beta_d, beta_min)  # noqa: E731
    elif schedule == "ve":
        sigma, sigma_deriv, sigma_inv = schedules.ve_sigma, schedules.ve_sigma_deriv, schedules.ve_sigma_inv
    else:
        sigma, sigma_deriv, sigma_inv = (lambda t: t), (lambda t: torch.ones_like(t)), (lambda s: s)
    if scaling == "vp":
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()  # noqa: E731
        s_deriv = lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3  # noqa: E731
    else:
        s, s_deriv = (lambda t: torch.ones_like(t)), (lambda t: torch.zeros_like(t))
    return sigma, sigma_deriv, sigma_inv, s, s_deriv


@dataclass(frozen=True)
class _Step:
    """One sampler step, precomputed on the host: times, coefficients and churn."""

    hat: tuple  # (sigma, s, a, b) at t_hat, where dx/dt = a x - b D(x / s, sigma)
    prime: tuple | None  # the same at t_hat + alpha h for the second-order correction, else None
    h: float
    sigma_cur: float
    s_cur: float
    s_ratio: float
    churn_std: float
    sigma_next: float
    s_next: float

    @property
    def net_sigmas(self) -> list[float]:
        return [self.hat[0]] + ([] if self.prime is None else [self.prime[0]])


def _plan(net, funcs, sigma_steps, solver, alpha, S_churn, S_min, S_max, to_zero=True) -> list[_Step]:
    """Precompute every step of the sampler in float64 on the host (to sigma = 0 after the levels if `to_zero`)."""
    sigma, sigma_deriv, sigma_inv, s, s_deriv = funcs
    t_steps = sigma_inv(sigma_steps)
    if to_zero:
        t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    num = len(t_steps) - 1

    def point(t):
        sig, sc = float(sigma(t)), float(s(t))
        if not 0 < sig < math.inf:  # t_hat + h of two levels far apart cancels to 0 in float64
            raise ValueError(f"a step from sigma={float(sigma_steps[0]):g} down to {float(sigma_steps[-1]):g} lands on "
                             f"sigma={sig:g} in float64 arithmetic: the range is too wide; lower --sigma_max")
        a = float(sigma_deriv(t)) / sig + float(s_deriv(t)) / sc
        return sig, sc, a, float(sigma_deriv(t)) * sc / sig

    steps = []
    for i in range(num):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        sigma_cur = float(sigma(t_cur))
        gamma = min(S_churn / num, math.sqrt(2) - 1) if S_min <= sigma_cur <= S_max else 0.0
        t_hat = t_cur
        if gamma > 0:
            t_hat = sigma_inv(torch.as_tensor(net.round_sigma(sigma(t_cur) * (1 + gamma)), dtype=torch.float64).cpu())
        h = float(t_next - t_hat)
        second = solver == "heun" and (i < num - 1 or not to_zero)  # the step to sigma = 0 is Euler's
        steps.append(_Step(
            hat=point(t_hat),
            prime=point(t_hat + alpha * h) if second else None,
            h=h,
            sigma_cur=sigma_cur,
            s_cur=float(s(t_cur)),
            s_ratio=float(s(t_hat) / s(t_cur)),
            churn_std=float((sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clamp_min(0).sqrt() * s(t_hat)),
            sigma_next=float(sigma(t_next)),
            s_next=float(s(t_next)),
        ))
    return steps


def sample(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: rng.Generators = None,
    num_steps: int = 18,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    perturb_alpha: float = 0.0,
    callback: Callable | None = None,
) -> tuple[torch.Tensor, int]:
    """Integrate from the prior to the data: (x at sigma = 0 in latents' dtype, network evaluations).

    `latents` are prior draws at the first noise level, `noise_levels(net, ...)[0]` (see
    `prior_latents`); the sampler applies the scaling s(t_0) itself. `generator` (one, or one per
    sample) draws the churn noise. `callback(i, sigma_cur,
    sigma_next, x_next, denoised)` is called after every step. `perturb_alpha` > 0 adds
    perturb_alpha * sigma_i * N(0, I) to x at the start of every step (`perturbation`). Defaults: EDM's
    deterministic Heun sampler, 18 steps, sigma in [0.002, 80], rho = 7.
    """
    check_choice("schedule", schedule, SCHEDULES)
    check_choice("scaling", scaling, SCALINGS)
    sigma_steps = noise_levels(net, num_steps, sigma_min, sigma_max, rho, discretization, epsilon_s, C_1, C_2, M)
    lo, hi = clamped_range(net, discretization, sigma_min, sigma_max, epsilon_s)
    funcs = _time_functions(schedule, scaling, lo, hi, epsilon_s)
    return integrate(net, latents, sigma_steps, class_labels, generator, funcs=funcs, solver=solver, alpha=alpha,
                     S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, perturb_alpha=perturb_alpha,
                     callback=callback)


def integrate(
    net,
    latents: torch.Tensor,
    sigma_steps: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: rng.Generators = None,
    *,
    to_zero: bool = True,
    funcs: tuple | None = None,
    solver: str = "heun",
    alpha: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    perturb_alpha: float = 0.0,
    callback: Callable | None = None,
    after_step: Callable | None = None,
) -> tuple[torch.Tensor, int]:
    """EDM's steps through the levels `sigma_steps` (float64, host), then to sigma = 0 if `to_zero`: (x, evaluations).

    `latents` are at sigma_steps[0]. `funcs` are the schedule's and scaling's time functions (default: sigma(t) = t,
    no scaling); with `to_zero` False every step is second order and the result is x at the last level.
    `after_step(i, x_next, denoised)` may replace x_next after step i (Restart's re-noising); `callback` as in `sample`.
    """
    check_choice("solver", solver, METHODS)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn} and {S_noise}")
    perturb = perturbation(perturb_alpha, generator)
    if funcs is None:
        funcs = _time_functions("linear", "none", None, None, None)
    plan = _plan(net, funcs, sigma_steps, solver, alpha, S_churn, S_min, S_max, to_zero)
    # Every noise level the network sees, copied to the device once: no host-device sync per step.
    net_sigmas = torch.tensor([v for step in plan for v in step.net_sigmas], dtype=torch.float64, device=latents.device)

    def derivative(x, point, k):  # dx/dt of EDM eq. 4, with the denoiser at sigma(t)
        _, t_s, a, b = point
        denoised = net(x / t_s, net_sigmas[k], class_labels).to(torch.float64)
        return a * x - b * denoised, denoised

    randn_like = rng.randn_like_fn(generator)
    x_next = latents.to(torch.float64) * plan[0].s_cur
    k = 0
    for i, step in enumerate(plan):
        x_cur = x_next if perturb is None else x_next + perturb(x_next, step.sigma_cur * step.s_cur)
        x_hat = x_cur
        if step.churn_std > 0:  # EDM Algorithm 2: raise the noise level, adding fresh noise
            x_hat = step.s_ratio * x_cur + step.churn_std * S_noise * randn_like(x_cur)
        d_cur, denoised = derivative(x_hat, step.hat, k)
        k += 1
        if step.prime is None:
            x_next = x_hat + step.h * d_cur
        else:  # second-order correction (Heun for alpha = 1)
            d_prime, denoised = derivative(x_hat + alpha * step.h * d_cur, step.prime, k)
            k += 1
            x_next = x_hat + step.h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
        if callback is not None:
            callback(i, step.hat[0], step.sigma_next, x_next / step.s_next, denoised)
        if after_step is not None:
            x_next = after_step(i, x_next, denoised)
    return x_next.to(latents.dtype), k


OPTIONS = (*LEVEL_OPTIONS, "schedule", "scaling", "S_churn", "S_min", "S_max", "S_noise", "perturb_alpha", "callback")
HEUN = Solver(functools.partial(sample, solver="heun"), prior_latents, (*OPTIONS, "alpha"), LEVEL_OPTIONS,
              "EDM's second-order sampler (Heun; churn with S_churn)")
EULER = Solver(functools.partial(sample, solver="euler"), prior_latents, OPTIONS, LEVEL_OPTIONS,
               "EDM's sampler with Euler steps")
