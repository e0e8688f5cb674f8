"""The sampler: one function for the PFGM++ / EDM ODE and its stochastic and ablation variants.

With r = sigma sqrt(D) the PFGM++ ODE dx/dr = (x - E[y|x]) / r becomes dx/dsigma = (x - D(x, sigma)) / sigma,
EDM's ODE, for every D; only the prior differs (`prior_latents`). `sample` covers EDM's Algorithm 1
(deterministic Heun) and 2 (churn), and the ablations of EDM Table 1: time discretisation
edm|vp|ve|iddpm, schedule sigma(t) linear|vp|ve, scaling s(t) none|vp, solver euler|heun.
The network is called as `net(x, sigma, class_labels)` and supplies sigma_min, sigma_max, round_sigma, D.
`sample_rk45` solves the same ODE with the adaptive Dormand-Prince solver of `training.ode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from torch_utils import rng
from training import ode, pfgmpp, schedules

SOLVERS = ("euler", "heun")
DISCRETIZATIONS = ("edm", "vp", "ve", "iddpm")
SCHEDULES = ("linear", "vp", "ve")
SCALINGS = ("none", "vp")

_DEFAULT_RANGE = {"edm": (0.002, 80.0), "ve": (0.02, 100.0), "iddpm": (0.002, 81.0)}


def _sigma_range(net, discretization, sigma_min, sigma_max, epsilon_s) -> tuple[float, float]:
    """The noise-level range: the discretisation's defaults, clamped to what the network supports."""
    if discretization == "vp":
        default = (float(schedules.vp_sigma(epsilon_s)), float(schedules.vp_sigma(1.0)))
    else:
        default = _DEFAULT_RANGE[discretization]
    lo = default[0] if sigma_min is None else float(sigma_min)
    hi = default[1] if sigma_max is None else float(sigma_max)
    lo, hi = max(lo, float(net.sigma_min)), min(hi, float(net.sigma_max))
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf (after clamping to the network's range), got {lo}, {hi}")
    return lo, hi


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
    _check_choice("discretization", discretization, DISCRETIZATIONS)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    lo, hi = _sigma_range(net, discretization, sigma_min, sigma_max, epsilon_s)
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
    return torch.as_tensor(net.round_sigma(sigmas), dtype=torch.float64).cpu()


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None, **options) -> torch.Tensor:
    """Draw x_0 from the network's own prior p_{r_max} (D = net.D) at the sampler's first noise level.

    `generator`: one per seed (batch = their count) or one generator with `batch`. `options` are
    those of `noise_levels`; pass the same ones to `sample`. Networks with an `upper_norm` (PFGM) get
    each draw's norm clipped there.
    """
    if batch is None:
        if generator is None or isinstance(generator, torch.Generator):
            raise ValueError("batch is required unless one generator per sample is given")
        batch = len(list(generator))
    if device is None:
        device = rng.device_of(generator)
    sigma_0 = float(noise_levels(net, **options)[0])
    shape = [batch, net.img_channels, net.img_resolution, net.img_resolution]
    latents = pfgmpp.sample_prior(shape, sigma_0, net.D, generator=generator, device=device)
    upper_norm = getattr(net, "upper_norm", None)  # PFGM networks: the prior's norm is clipped (PFGM App. B.2.1)
    if upper_norm is not None:
        norm = latents.flatten(1).norm(dim=1).reshape(-1, *([1] * (latents.ndim - 1)))
        latents = latents * (float(upper_norm) / norm).clamp(max=1.0)
    return latents


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class _Step:
    """One sampler step, precomputed on the host: times, coefficients and churn."""

    hat: tuple  # (sigma, s, a, b) at t_hat, where dx/dt = a x - b D(x / s, sigma)
    prime: tuple | None  # the same at t_hat + alpha h for the second-order correction, else None
    h: float
    s_cur: float
    s_ratio: float
    churn_std: float
    sigma_next: float
    s_next: float

    @property
    def net_sigmas(self) -> list[float]:
        return [self.hat[0]] + ([] if self.prime is None else [self.prime[0]])


def _plan(net, funcs, sigma_steps, solver, alpha, S_churn, S_min, S_max) -> list[_Step]:
    """Precompute every step of the sampler in float64 on the host."""
    sigma, sigma_deriv, sigma_inv, s, s_deriv = funcs
    t_steps = torch.cat([sigma_inv(sigma_steps), torch.zeros(1, dtype=torch.float64)])
    num = len(t_steps) - 1

    def point(t):
        sig, sc = float(sigma(t)), float(s(t))
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
        second = solver == "heun" and i < num - 1
        steps.append(_Step(
            hat=point(t_hat),
            prime=point(t_hat + alpha * h) if second else None,
            h=h,
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
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
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
    callback: Callable | None = None,
) -> torch.Tensor:
    """Integrate from the prior to the data; returns x at sigma = 0 in latents' dtype.

    `latents` are prior draws at the first noise level, `noise_levels(net, ...)[0]` (see
    `prior_latents`); the sampler applies the scaling s(t_0) itself. `randn_like` draws the churn
    noise (per-sample generators: `torch_utils.rng.randn_like_fn`). `callback(i, sigma_cur,
    sigma_next, x_next, denoised)` is called after every step. Defaults: EDM's deterministic Heun
    sampler, 18 steps, sigma in [0.002, 80], rho = 7.
    """
    _check_choice("solver", solver, SOLVERS)
    _check_choice("schedule", schedule, SCHEDULES)
    _check_choice("scaling", scaling, SCALINGS)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f"S_churn and S_noise must be >= 0, got {S_churn} and {S_noise}")
    sigma_steps = noise_levels(net, num_steps, sigma_min, sigma_max, rho, discretization, epsilon_s, C_1, C_2, M)
    lo, hi = _sigma_range(net, discretization, sigma_min, sigma_max, epsilon_s)
    funcs = _time_functions(schedule, scaling, lo, hi, epsilon_s)
    plan = _plan(net, funcs, sigma_steps, solver, alpha, S_churn, S_min, S_max)
    # Every noise level the network sees, copied to the device once: no host-device sync per step.
    net_sigmas = torch.tensor([v for step in plan for v in step.net_sigmas], dtype=torch.float64, device=latents.device)

    def derivative(x, point, k):  # dx/dt of EDM eq. 4, with the denoiser at sigma(t)
        _, t_s, a, b = point
        denoised = net(x / t_s, net_sigmas[k], class_labels).to(torch.float64)
        return a * x - b * denoised, denoised

    x_next = latents.to(torch.float64) * plan[0].s_cur
    k = 0
    for i, step in enumerate(plan):
        x_cur = x_next
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
    return x_next.to(latents.dtype)


# ----------------------------------------------------------------------------------------------
# The probability-flow ODE with the adaptive RK45 solver.


def log_sigma_drift(net, class_labels: torch.Tensor | None = None) -> Callable[[float, torch.Tensor], torch.Tensor]:
    """dx/dt of the ODE in t = ln(sigma): sigma dx/dsigma = x - D(x, sigma), for any network and D."""

    def drift(t: float, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.full([], math.exp(t), dtype=torch.float64, device=x.device)  # a fill, no host-device copy
        return x - net(x, sigma, class_labels).to(x.dtype)

    return drift


def sample_rk45(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    denoise: bool = True,
) -> tuple[torch.Tensor, int]:
    """Solve dx/dsigma = (x - D(x, sigma)) / sigma from sigma_max to sigma_min with adaptive RK45; (x, nfe).

    Integrated in t = ln(sigma) (smooth in log-time, as PFGM's t = ln z); the step is shared by the batch and
    controlled by the largest per-sample error (`training.ode.rk45`, one host sync per step). With
    `denoise`, the last step to sigma = 0 is Euler's, which equals the denoiser: x_0 = D(x, sigma_min). It is
    free: RK45's last stage already evaluated the drift there. `latents` are prior draws at sigma_max
    (`prior_latents(net, generators, sigma_min=..., sigma_max=...)`); defaults: EDM's [0.002, 80] clamped to the
    network's range. Returns x in latents' dtype and the number of network evaluations.
    """
    levels = noise_levels(net, num_steps=2, sigma_min=sigma_min, sigma_max=sigma_max)
    sigma_hi, sigma_lo = float(levels[0]), float(levels[-1])
    x = latents.to(torch.float64)
    solution = ode.rk45(log_sigma_drift(net, class_labels), x, math.log(sigma_hi), math.log(sigma_lo), rtol=rtol, atol=atol)
    x = solution.y - solution.dy if denoise else solution.y
    return x.to(latents.dtype), solution.nfe
