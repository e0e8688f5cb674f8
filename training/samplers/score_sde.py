"""Score SDE samplers (Song et al. 2021): predictor-corrector for the VE and VP SDEs, on this project's denoisers.

The networks here are denoisers D(x, sigma) of x = y + sigma n (EDM's unscaled coordinates). The SDE state is
x_t = s(t) x, with
    VE: sigma(t) = sigma_min (sigma_max / sigma_min)^t, s(t) = 1,  dx = sqrt(d sigma^2 / dt) dw;
    VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), s(t) = 1 / sqrt(1 + sigma^2),
        dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw,  beta(t) = beta_min + beta_d t;
and the score follows from the denoiser (Tweedie): grad log p_t(x_t) = (D(x_t / s, sigma) - x_t / s) / (s sigma^2).
This holds for the Gaussian kernel only: networks with finite D (PFGM++) use the ODE samplers.

Time runs over t_i = 1 + i (eps - 1) / num_steps, i = 0..num_steps. Step i applies the corrector at t_i and the
predictor from t_i to t_(i+1). Predictors: reverse diffusion (the forward transition from t_(i+1) to t_i,
x_i = a_i x_(i+1) + G_i z with a_i = s_i / s_(i+1), G_i^2 = s_i^2 (sigma_i^2 - sigma_(i+1)^2), reversed:
x_(i+1) = (2 - a_i) x_i + G_i^2 score + G_i z, Song et al. eq. 46) or Euler-Maruyama on the reverse SDE.
Correctors, x <- x + e score + sqrt(2 e) z with e = 2 alpha_i (snr r)^2 (alpha_i = a_i^2 for VP, 1 for VE):
  langevin: r = mean |z| / mean |score| over the batch (Score SDE's corrector). A sample then depends on its
            batch companions (slightly, for large batches): per-seed generation is not batch-independent.
  ald:      r = s_i sigma_i, the ratio's value for Gaussian noise (Score SDE's annealed Langevin dynamics);
            batch-independent.
  A per-sample ratio would be batch-independent too, but a step that depends on the state biases Langevin
  dynamics (its stationary density becomes p / e(x)): it visibly skews the mode weights of a mixture.
With `denoise`, the result is E[y | x] at the last level, D(x / s, sigma(eps)) (one more evaluation).
Registered as the solver `pc`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torch_utils import rng
from training import schedules
from training.samplers.base import Solver, draw_prior
from training.samplers.levels import noise_levels

SDES = ("ve", "vp")
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "ald", "none")
DEFAULT_EPS = {"ve": 1e-5, "vp": 1e-3}  # Score SDE's sampling eps


@dataclass(frozen=True)
class _Grid:
    """Host-side float64 values at every time t_0 > ... > t_n: sigma, s, linear drift f, squared diffusion g^2."""

    t: list[float]
    sigma: list[float]
    s: list[float]
    f: list[float]
    g2: list[float]


def _sde_kind(net, sde: str | None) -> str:
    if not math.isinf(float(getattr(net, "D", math.inf))):
        raise ValueError(f"the reverse SDE needs the Gaussian kernel (D = inf); this network has D = {net.D}: "
                         "use an ODE solver (heun, euler or rk45)")
    if sde is None:
        return getattr(net, "score_sde", "ve")  # the preconditioner's own SDE: vp for VP networks
    if sde not in SDES:
        raise ValueError(f"sde must be one of {', '.join(SDES)}, got {sde!r}")
    return sde


def _level_options(sde: str, eps: float, sigma_min: float | None, sigma_max: float | None) -> dict:
    """The options of `noise_levels` that give this SDE's range."""
    return dict(sigma_min=sigma_min, sigma_max=sigma_max, discretization=sde, epsilon_s=eps)


def _grid(net, sde: str, num_steps: int, eps: float, sigma_min, sigma_max) -> _Grid:
    """sigma(t), s(t), f(t), g^2(t) on the time grid, for the SDE whose range the network supports."""
    levels = noise_levels(net, 2, **_level_options(sde, eps, sigma_min, sigma_max))
    hi, lo = float(levels[0]), float(levels[-1])
    t = torch.linspace(1.0, eps, num_steps + 1, dtype=torch.float64)
    if sde == "ve":
        sigma = lo * (hi / lo) ** t
        s, f = torch.ones_like(t), torch.zeros_like(t)
        g2 = 2 * sigma**2 * math.log(hi / lo)  # d sigma^2 / dt
    else:
        beta_d, beta_min = schedules.vp_betas_for_range(lo, hi, eps)
        sigma = schedules.vp_sigma(t, beta_d, beta_min)
        s = 1 / (1 + sigma**2).sqrt()
        g2 = beta_min + beta_d * t
        f = -0.5 * g2
    return _Grid(*(v.tolist() for v in (t, sigma, s, f, g2)))


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None, sde: str | None = None,
                  eps: float | None = None, sigma_min: float | None = None, sigma_max: float | None = None) -> torch.Tensor:
    """Prior draws N(0, sigma(1)^2 I) in unscaled coordinates for `sample` with the same options."""
    sde = _sde_kind(net, sde)
    eps = DEFAULT_EPS[sde] if eps is None else eps
    return draw_prior(net, generator, float(noise_levels(net, **_level_options(sde, eps, sigma_min, sigma_max))[0]),
                      batch, device)


def _check(num_steps, predictor, corrector, snr, n_corrector, eps) -> None:
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {', '.join(PREDICTORS)}, got {predictor!r}")
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {', '.join(CORRECTORS)}, got {corrector!r}")
    if predictor == "none" and corrector == "none":
        raise ValueError("predictor and corrector are both 'none': choose at least one")
    if int(num_steps) < 1 or int(n_corrector) < 1:
        raise ValueError(f"num_steps and n_corrector must be >= 1, got {num_steps} and {n_corrector}")
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (Score SDE: 0.16 for VE on CIFAR-10), got {snr}")
    if not 0 < eps < 1:
        raise ValueError(f"eps must lie in (0, 1), got {eps}")


def _langevin_step(x, grad, z, corrector: str, alpha_snr2: float, marginal_std: float) -> torch.Tensor:
    """x + e grad + sqrt(2 e) z with e = 2 alpha snr^2 r^2 (r: see the module docstring)."""
    if corrector == "langevin":  # Score SDE: the norms averaged over the batch
        ratio = z.flatten(1).norm(dim=1).mean() / grad.flatten(1).norm(dim=1).mean().clamp_min(1e-30)
    else:  # annealed Langevin: |z| / |score| for Gaussian noise of the marginal std s sigma
        ratio = marginal_std
    step = 2 * alpha_snr2 * ratio**2
    return x + step * grad + (2 * step) ** 0.5 * z


def sample(
    net,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    generator: rng.Generators = None,
    sde: str | None = None,
    num_steps: int = 1000,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector: int = 1,
    eps: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    denoise: bool = True,
) -> tuple[torch.Tensor, int]:
    """Predictor-corrector sampling of the reverse VE / VP SDE; returns (x in latents' dtype, network evaluations).

    `latents`: `prior_latents(net, generators, sde=..., ...)` with the same options (unscaled coordinates).
    `generator` (one, or one per sample) draws the predictor and corrector noise. `sde` defaults to 'vp' for
    VPPrecond networks and 've' otherwise; `eps` to Score SDE's 1e-5 (VE) / 1e-3 (VP); the sigma range to
    the VE / VP defaults clamped to the network's range.
    """
    sde = _sde_kind(net, sde)
    eps = DEFAULT_EPS[sde] if eps is None else float(eps)
    _check(num_steps, predictor, corrector, snr, n_corrector, eps)
    grid = _grid(net, sde, int(num_steps), eps, sigma_min, sigma_max)
    sigmas = torch.tensor(grid.sigma, dtype=torch.float64, device=latents.device)  # one copy: no sync per step
    nfe = 0

    def score(x, i):
        nonlocal nfe
        nfe += 1
        x_unscaled = x / grid.s[i]
        denoised = net(x_unscaled, sigmas[i], class_labels).to(x.dtype)
        return (denoised - x_unscaled) / (grid.s[i] * grid.sigma[i] ** 2)

    def noise(x):
        return rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)

    x = latents.to(torch.float64) * grid.s[0]
    for i in range(int(num_steps)):
        a = grid.s[i] / grid.s[i + 1]
        if corrector != "none":
            alpha = a * a if sde == "vp" else 1.0
            for _ in range(int(n_corrector)):
                x = _langevin_step(x, score(x, i), noise(x), corrector, alpha * snr**2, grid.s[i] * grid.sigma[i])
        if predictor == "reverse_diffusion":
            G2 = grid.s[i] ** 2 * (grid.sigma[i] ** 2 - grid.sigma[i + 1] ** 2)
            x = (2 - a) * x + G2 * score(x, i) + math.sqrt(G2) * noise(x)
        elif predictor == "euler_maruyama":
            dt = grid.t[i + 1] - grid.t[i]  # < 0: the reverse SDE runs backwards in time
            x = x + (grid.f[i] * x - grid.g2[i] * score(x, i)) * dt + math.sqrt(grid.g2[i] * -dt) * noise(x)
    x = x / grid.s[-1]
    if denoise:
        x = net(x, sigmas[-1], class_labels).to(x.dtype)
        nfe += 1
    return x.to(latents.dtype), nfe


PC = Solver(sample, prior_latents,
            ("sde", "num_steps", "predictor", "corrector", "snr", "n_corrector", "eps", "sigma_min", "sigma_max", "denoise"),
            ("sde", "eps", "sigma_min", "sigma_max"), "Score SDE's predictor-corrector sampler (D = inf)")
