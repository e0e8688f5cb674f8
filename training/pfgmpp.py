"""The PFGM++ perturbation kernel: the one home of sigma <-> r, sampling, log-density and posterior mean.

With r = sigma * sqrt(D) the kernel p_r(x | y) of PFGM++ (Xu et al. 2023, eq. 4) is a multivariate
Student-t with D degrees of freedom, location y and scale sigma * I. Sampling uses the Student-t
form n = sigma * sqrt(D / (2 Y)) * g with g ~ N(0, I_N) and Y ~ Gamma(D / 2): exact for every real
D > 0, no clipping, drawn on the tensor's device from explicit generators. D = math.inf is the
Gaussian N(0, sigma^2 I) of diffusion models (EDM / VE).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from torch_utils import rng


# Marsaglia-Tsang proposals drawn in parallel per Gamma variate. Each is accepted with probability
# > 0.95 (alpha >= 1), so all 16 are rejected with probability < 0.05**16 ~ 1e-21 per variate.
_GAMMA_PROPOSALS = 16


# ----------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument; no host-device sync for accelerator tensors).


def check_D(D) -> float:
    """Return D as a float if it is a real number > 0 or math.inf; raise ValueError otherwise."""
    if isinstance(D, torch.Tensor) and D.numel() == 1:
        D = D.item()
    if isinstance(D, bool) or not isinstance(D, Real):
        raise ValueError(f"D must be a real number > 0 or math.inf, got {D!r}")
    D = float(D)
    if math.isnan(D) or D <= 0:
        raise ValueError(f"D must be a real number > 0 or math.inf (diffusion), got {D}")
    return D


def format_D(D: float) -> str:
    """D for people: 'inf' for the diffusion limit, else the shortest exact form ('128', '0.5')."""
    return "inf" if math.isinf(float(D)) else f"{float(D):g}"


def _check_positive(name: str, value) -> None:
    """Values of `value` must be finite and > 0; checked for numbers and CPU tensors only."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.numel() == 0:
            return  # reading device values would synchronise with the host
        ok = bool(torch.all(torch.isfinite(value) & (value > 0)))
    else:
        ok = isinstance(value, Real) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")


def _batched(name: str, x: torch.Tensor) -> tuple[int, int]:
    """Batch size B and per-sample dimension N of a [B, ...] tensor."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a batched tensor of shape [B, ...] with ndim >= 2, got {shape}")
    return x.shape[0], math.prod(x.shape[1:])  # not x[0].numel(): that fails for B = 0


def _per_sample(sigma, batch: int, ndim: int, device) -> torch.Tensor:
    """sigma as a float64 tensor of shape [B]: a scalar, [B], or [B, 1, ..., 1] are accepted."""
    _check_positive("sigma", sigma)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if sigma.ndim > ndim or any(s != 1 for s in sigma.shape[1:]) or sigma.numel() not in (1, batch):
        raise ValueError(
            f"sigma must be a scalar or hold one value per sample (shape [{batch}] or "
            f"[{batch}, 1, ...]), got shape {list(sigma.shape)}"
        )
    return sigma.reshape(-1).expand(batch)


def _view_per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.reshape(-1, *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------------------------
# sigma <-> r


def sigma_to_r(sigma, D):
    """r = sigma * sqrt(D), the PFGM++ radius aligned with the diffusion noise level sigma."""
    D = check_D(D)
    if math.isinf(D):
        raise ValueError("r = sigma * sqrt(D) is infinite for D = inf: work with sigma directly")
    return sigma * math.sqrt(D)


def r_to_sigma(r, D):
    """sigma = r / sqrt(D), the inverse of sigma_to_r."""
    D = check_D(D)
    if math.isinf(D):
        raise ValueError("sigma = r / sqrt(D) is undefined for D = inf: work with sigma directly")
    return r / math.sqrt(D)


# ----------------------------------------------------------------------------------------------
# Sampling


def _log_standard_gamma(alpha: float, batch: int, generator: rng.Generators, device) -> torch.Tensor:
    """log Y for Y ~ Gamma(alpha, 1), shape [batch], float64, from `generator` (no host sync).

    Marsaglia & Tsang (2000) with `_GAMMA_PROPOSALS` proposals drawn at once and the first accepted one
    kept; alpha < 1 uses Gamma(alpha) = Gamma(alpha + 1) * U**(1/alpha), in log space so that tiny
    variates (heavy tails at small D) do not underflow.
    """
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    f64 = torch.float64
    z = rng.randn([batch, _GAMMA_PROPOSALS], generator, device=device, dtype=f64)
    u = rng.rand([batch, _GAMMA_PROPOSALS], generator, device=device, dtype=f64)
    t = c * z
    v_minus_1 = t * (3.0 + t * (3.0 + t))  # (1 + t)^3 - 1 without cancellation
    valid = t > -1.0
    log_v = torch.log1p(torch.where(valid, v_minus_1, torch.zeros_like(t)))
    # Accept iff log u < z^2/2 + d - d v + d log v.
    accept = valid & (torch.log(u) < 0.5 * z * z + d * (log_v - v_minus_1))
    first = accept.to(torch.uint8).argmax(dim=1, keepdim=True)
    log_y = math.log(d) + log_v.gather(1, first).squeeze(1)
    # All proposals rejected (probability < 1e-21): keep a finite value, d ~ the mode.
    log_y = torch.where(accept.any(dim=1), log_y, torch.full_like(log_y, math.log(d)))
    if boost:
        u_boost = 1.0 - rng.rand([batch], generator, device=device, dtype=f64)  # in (0, 1]
        log_y = log_y + torch.log(u_boost) / alpha
    return log_y


def _noise(shape, sigma, D: float, generator: rng.Generators, device, dtype) -> torch.Tensor:
    """Kernel noise n ~ p_r(n) of `shape` = [B, ...] (Student-t form, or Gaussian at D = inf)."""
    batch, ndim = shape[0], len(shape)
    sigma = _per_sample(sigma, batch, ndim, device)
    g = rng.randn(shape, generator, device=device, dtype=dtype)
    if math.isinf(D):
        scale = sigma
    else:
        log_y = _log_standard_gamma(D / 2.0, batch, generator, device)
        scale = sigma * torch.exp(0.5 * (math.log(D / 2.0) - log_y))  # sigma * sqrt(D / (2 Y))
    return g.mul_(_view_per_sample(scale.to(dtype), ndim))


def sample_perturbation(x: torch.Tensor, sigma, D, generator: rng.Generators = None) -> torch.Tensor:
    """Draw the perturbation n ~ p_r(n) (r = sigma * sqrt(D)) shaped like `x`, on `x.device`.

    `x` is a batch [B, ...] and only lends its shape, dtype and device (like `torch.randn_like`);
    the perturbed sample is `x + n`. `sigma` is a scalar or one value per sample. `D = math.inf` gives
    exactly `sigma * torch.randn(x.shape, generator=generator)`. `generator` is one torch.Generator
    or one per sample; then sample i's noise depends on `generator[i]` alone.
    """
    D = check_D(D)
    _batched("x", x)
    dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    return _noise(x.shape, sigma, D, generator, x.device, dtype)


def sample_prior(
    shape, sigma_max, D, generator: rng.Generators = None, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Draw the generation prior: the kernel at sigma_max centred at 0 (r_max = sigma_max * sqrt(D))."""
    D = check_D(D)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be [B, ...] with at least two dimensions, got {list(shape)}")
    if device is None:
        device = rng.device_of(generator)
    return _noise(shape, sigma_max, D, generator, device, dtype)


def transition_noise(noise: torch.Tensor, sigma_from, sigma_to, D, generator: rng.Generators = None) -> torch.Tensor:
    """The increment that carries kernel noise at `sigma_from` to kernel noise at `sigma_to` > sigma_from, exactly.

    The kernel is a Gaussian scale mixture, n = sigma * sqrt(D / (2 Y)) g with Y ~ Gamma(D / 2), so
    n_sigma = sqrt(D / (2 Y)) W(sigma^2) with one Brownian motion W and one Y has the kernel as its law at every
    sigma. Given n = `noise` at sigma_from, Y ~ Gamma((N + D) / 2, rate 1 + |n|^2 / (D sigma_from^2)) (its
    posterior), and the increment is sqrt((sigma_to^2 - sigma_from^2) D / (2 Y)) g': n + increment then has the
    kernel's law at sigma_to, for every D (D = inf: the Gaussian increment, Y's posterior being a point).
    Returns float64, shaped like `noise`, on its device; the draws come from `generator` (one, or one per sample).
    """
    D = check_D(D)
    batch, N = _batched("noise", noise)
    low = _per_sample(sigma_from, batch, noise.ndim, noise.device)
    high = _per_sample(sigma_to, batch, noise.ndim, noise.device)
    if high.device.type == "cpu" and bool(torch.any(high <= low)):  # device values: no host sync
        raise ValueError(f"sigma_to must exceed sigma_from, got {sigma_to} and {sigma_from}")
    g = rng.randn(noise.shape, generator, device=noise.device, dtype=torch.float64)
    variance = high.square() - low.square()
    if not math.isinf(D):
        sq = noise.reshape(batch, N).to(torch.float64).square().sum(dim=1)
        log_y = _log_standard_gamma((N + D) / 2.0, batch, generator, noise.device)
        log_y = log_y - torch.log1p(sq / (D * low.square()))
        variance = variance * torch.exp(math.log(D / 2.0) - log_y)
    return g.mul_(_view_per_sample(variance.sqrt(), noise.ndim))


# ----------------------------------------------------------------------------------------------
# Densities


def log_prob(x: torch.Tensor, sigma, D) -> torch.Tensor:
    """Exact normalised log-density of the kernel centred at 0, per sample: Tensor[B], float64.

    Student-t with D degrees of freedom and scale sigma * I; Gaussian N(0, sigma^2 I) at D = inf.
    """
    D = check_D(D)
    batch, N = _batched("x", x)
    sigma = _per_sample(sigma, batch, x.ndim, x.device)
    sq = x.reshape(batch, N).to(torch.float64).square().sum(dim=1)
    if math.isinf(D):
        return -0.5 * N * math.log(2 * math.pi) - N * torch.log(sigma) - 0.5 * sq / sigma.square()
    const = math.lgamma((N + D) / 2) - math.lgamma(D / 2) - 0.5 * N * math.log(D * math.pi)
    return const - N * torch.log(sigma) - 0.5 * (N + D) * torch.log1p(sq / (D * sigma.square()))


def _log_weights(dist_sq: torch.Tensor, sigma: torch.Tensor, D: float, N: int) -> torch.Tensor:
    """log p_r(x | y_i) up to a constant per row, from squared distances [B, M] and sigma [B]."""
    sigma_sq = sigma.square()[:, None]
    if math.isinf(D):
        return -0.5 * dist_sq / sigma_sq
    return -0.5 * (N + D) * torch.log1p(dist_sq / (D * sigma_sq))


def posterior_mean(x: torch.Tensor, sigma, D, data: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """E[y | x] for the uniform distribution on the finite set `data` under the kernel at sigma.

    The exact minimiser of the denoising loss for that data set: weights w_i = p_r(x | y_i)
    normalised by a streaming log-sum-exp over chunks of `chunk` data points (memory B * chunk),
    in float64. Returns a tensor shaped like `x` in x's dtype.
    """
    D = check_D(D)
    batch, N = _batched("x", x)
    count, N_data = _batched("data", data)
    if N_data != N:
        raise ValueError(f"data samples have {N_data} values but x samples have {N}: shapes must agree")
    if count == 0:
        raise ValueError("data is empty: the posterior mean needs at least one data point")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    sigma = _per_sample(sigma, batch, x.ndim, x.device)
    xf = x.reshape(batch, N).to(torch.float64)
    x_sq = xf.square().sum(dim=1, keepdim=True)
    running_max = torch.full([batch], -math.inf, dtype=torch.float64, device=x.device)
    total = torch.zeros([batch], dtype=torch.float64, device=x.device)
    acc = torch.zeros([batch, N], dtype=torch.float64, device=x.device)
    for part in data.reshape(count, N).split(chunk):
        y = part.to(device=x.device, dtype=torch.float64)
        dist_sq = (x_sq + y.square().sum(dim=1)[None, :] - 2.0 * (xf @ y.T)).clamp_min(0.0)
        log_w = _log_weights(dist_sq, sigma, D, N)
        new_max = torch.maximum(running_max, log_w.amax(dim=1))
        decay = torch.exp(running_max - new_max)
        w = torch.exp(log_w - new_max[:, None])
        total = total * decay + w.sum(dim=1)
        acc = acc * decay[:, None] + w @ y
        running_max = new_max
    return (acc / total[:, None]).reshape(x.shape).to(x.dtype)
