"""PFGM (Xu et al. 2022), the D = 1 member of PFGM++: field target, perturbation, loss, hyper-parameters, sampler.

Data y in R^N sit at z = 0 of R^(N+1). For a set {y_i} the empirical Poisson field at x~ = (x, z), with the
coefficients normalised to sum to 1 (PFGM's c(x~)), is

    E(x~) = sum_i w_i (y~_i - x~),   w_i proportional to |x~ - y~_i|^-(N+1),

and the training target is v = sqrt(N + 1) E / (|E| + gamma), as specified for this project (PFGM's
reference code scales by sqrt(N); the two differ by a factor 1 + O(1/N), which the ODE, a function of
v_x / v_z only, does not see). Since every y~_i has z = 0, E = (E[y|x] - x, -z) exactly, where E[y|x] is
the PFGM++ posterior mean at D = 1 with r = z: `training.pfgmpp.posterior_mean` (chunked, float64) is the
one implementation of both. The same identity turns a PFGM network into a denoiser (`PFGMPrecond`), so its
backward ODE in t = ln z, dx/dt = z v_x / v_z, is `sampling.log_sigma_drift` of that denoiser.

    pfgmpp-pfgm-hparams --data_norm=32 --resolution=32     # CIFAR-10: M = 291
    python -m training.pfgm --data=datasets/cifar10-32x32.zip
"""

from __future__ import annotations

import json
import math

import click
import torch

from torch_utils import rng
from training import ode, pfgmpp, sampling

SOLVERS = ("rk45", "euler", "improved_euler")

# The reference code restricts m to [0, 0.7 M) where its Gaussian draw of z is below 0.005 (App. B.1.1).
_RESTRICT_Z, _RESTRICT_FRACTION = 0.005, 0.7
_Z_FLOOR = 1e-10  # as the reference clamps z: ln z stays finite for the network


def normalized_field(x: torch.Tensor, z, data: torch.Tensor, gamma: float = 5.0,
                     chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """PFGM's target sqrt(N + 1) E / (|E| + gamma) at (x, z) for the set `data`: (v_x like x, v_z [B]), float64.

    Memory is bounded by `chunk` data points at a time (B * chunk distances); z is a scalar or [B].
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a batched tensor [B, ...]")
    batch, N = x.shape[0], math.prod(x.shape[1:])
    x64 = x.to(torch.float64)
    z = torch.as_tensor(z, dtype=torch.float64, device=x.device).reshape(-1).expand(batch)
    E_x = pfgmpp.posterior_mean(x64, z, 1, data, chunk=chunk) - x64  # E[y|x] at D = 1, r = z
    E_z = -z
    norm = (E_x.flatten(1).square().sum(dim=1) + E_z.square()).sqrt()
    scale = math.sqrt(N + 1) / (norm + gamma)  # the field lives in N + 1 dimensions
    return E_x * scale.reshape(-1, *([1] * (x.ndim - 1))), E_z * scale


def perturb(shape, M: float, tau: float = 0.03, sigma_end: float = 0.01, restrict_M: bool = True,
            generator: rng.Generators = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PFGM's perturbation (Alg. 2): (z [B], n [B, ...]) with m ~ U(0, M), z = |eps_z| (1 + tau)^m, n = eps_x (1 + tau)^m.

    eps_z ~ N(0, sigma_end^2) and eps_x ~ N(0, sigma_end^2 I): the reference draws |eps_x| and a uniform
    direction separately, which is the same distribution. With `restrict_M`, m ~ U(0, int(0.7 M)) where
    eps_z < 0.005, as the reference code does (on the signed draw: about 69% of them at sigma_end = 0.01).
    Draw order, from `generator`: m, eps_z, restricted m, eps_x. z is floored at 1e-10, as in the reference.
    """
    if not (M > 0 and tau > 0 and sigma_end > 0):
        raise ValueError(f"need M > 0, tau > 0 and sigma_end > 0, got {M}, {tau}, {sigma_end}")
    shape = [int(s) for s in shape]
    batch, f64 = shape[0], torch.float64
    if device is None:
        device = rng.device_of(generator)
    m = rng.rand([batch], generator, device=device, dtype=f64) * M
    eps_z = rng.randn([batch], generator, device=device, dtype=f64) * sigma_end
    if restrict_M:
        m_restricted = rng.rand([batch], generator, device=device, dtype=f64) * int(M * _RESTRICT_FRACTION)
        m = torch.where(eps_z < _RESTRICT_Z, m_restricted, m)
    multiplier = (1 + tau) ** m
    n = rng.randn(shape, generator, device=device, dtype=torch.float32)
    n = n * (sigma_end * multiplier).to(torch.float32).reshape(-1, *([1] * (len(shape) - 1)))
    return (eps_z.abs() * multiplier).to(torch.float32).clamp_min(_Z_FLOOR), n


class PFGMLoss:
    """PFGM's objective: |v_theta(x, z) - v(x, z)|^2 over N + 1 components, v the normalised field of the
    training batch and a reference batch (PFGM puts its mini-batch inside the large batch; `reference` is
    the gathered reference batch of the training loop). Returns the per-element loss [B, N + 1]."""

    def __init__(self, M: float = 291, tau: float = 0.03, sigma_end: float = 0.01, gamma: float = 5.0,
                 restrict_M: bool = True, chunk: int = 1024):
        if not (M > 0 and tau > 0 and sigma_end > 0 and gamma >= 0 and chunk >= 1):
            raise ValueError(f"need M, tau, sigma_end > 0, gamma >= 0, chunk >= 1; got {M}, {tau}, {sigma_end}, {gamma}, {chunk}")
        self.M, self.tau, self.sigma_end, self.gamma = float(M), float(tau), float(sigma_end), float(gamma)
        self.restrict_M, self.chunk = bool(restrict_M), int(chunk)

    def draw(self, shape, device, generator: rng.Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B], noise n [B, ...]) for a batch of `shape` (the training loop draws the global batch)."""
        return perturb(shape, self.M, self.tau, self.sigma_end, self.restrict_M, generator, device)

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None, reference=None, draws=None):
        """Per-element squared error [B, N + 1] of the predicted field; `draws` = (z, n) from `draw`."""
        if labels is not None:
            raise ValueError("the PFGM field is computed over an unlabelled reference batch: train unconditional models")
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        z, n = draws if draws is not None else self.draw(y.shape, y.device, generator)
        x = y + n.to(y.dtype)
        with torch.no_grad():
            data = y if reference is None else torch.cat([y, reference.to(y.dtype)])
            target_x, target_z = normalized_field(x, z, data, self.gamma, self.chunk)
        v_x, v_z = net(x, z, None, augment_labels=augment_labels, return_field=True)
        error_x = (v_x - target_x.to(v_x.dtype)).flatten(1).square()
        error_z = (v_z - target_z.to(v_z.dtype)).square()[:, None]
        return torch.cat([error_x, error_z], dim=1)


# ----------------------------------------------------------------------------------------------
# Hyper-parameters (PFGM App. B.1.1 and B.2.1, as computed by the reference's hyperparam_calculator.py)


def derive_hparams(data_norm: float, N: int, sigma_end: float = 0.01, tau: float = 0.03) -> dict:
    """M, z_max and upper_norm from the average data norm and the data dimension N.

    With N~ = N + 1 and the largest perturbation scale s = sigma_end (1 + tau)^M:
    M = floor(0.75 ln(data_norm^2 / (2 sqrt(N~) sigma_end^2)) / ln(1 + tau)) + 1, z_max = sqrt(2 / pi) s (the
    mean of |eps_z| (1 + tau)^M) and upper_norm = sqrt(N~) s (the typical norm of the largest perturbation).
    """
    if not (data_norm > 0 and sigma_end > 0 and tau > 0) or int(N) < 1:
        raise ValueError(f"need data_norm > 0, N >= 1, sigma_end > 0, tau > 0; got {data_norm}, {N}, {sigma_end}, {tau}")
    n_aug = int(N) + 1
    ratio = data_norm**2 / (2 * math.sqrt(n_aug) * sigma_end**2)
    if ratio <= 1:
        raise ValueError(f"data_norm {data_norm} is too small for sigma_end {sigma_end}: lower sigma_end")
    M = int(0.75 * math.log(ratio) / math.log1p(tau)) + 1
    scale = sigma_end * (1 + tau) ** M
    return {"M": M, "z_max": math.sqrt(2 / math.pi) * scale, "upper_norm": math.sqrt(n_aug) * scale,
            "N": int(N), "data_norm": float(data_norm), "sigma_end": float(sigma_end), "tau": float(tau)}


def average_norm(dataset, max_images: int = 10000) -> float:
    """Mean |y| of up to `max_images` evenly spaced images of a dataset, scaled to [-1, 1] as in training."""
    count = len(dataset)
    if count == 0:
        raise ValueError("the dataset is empty: cannot measure its average norm")
    indices = torch.linspace(0, count - 1, min(count, int(max_images))).round().long().unique().tolist()
    norms = [(torch.as_tensor(dataset[i][0], dtype=torch.float64) / 127.5 - 1).norm().item() for i in indices]
    return sum(norms) / len(norms)


# ----------------------------------------------------------------------------------------------
# Sampling: the backward ODE in t = ln z, from z_max to z_min.


def prior_latents(net, generator: rng.Generators, batch: int | None = None, device=None,
                  z_max: float | None = None) -> torch.Tensor:
    """PFGM's prior for `sample`: the D = 1 kernel at z_max (default: the network's), norm clipped by upper_norm."""
    z_max = float(net.sigma_max if z_max is None else z_max)
    return sampling.prior_latents(net, generator, batch, device, sigma_min=min(float(net.sigma_min), z_max / 2), sigma_max=z_max)


def sample(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, solver: str = "rk45",
           num_steps: int = 100, z_min: float | None = None, z_max: float | None = None, rtol: float = 1e-4,
           atol: float = 1e-4, denoise: bool = False) -> tuple[torch.Tensor, int]:
    """PFGM's sampler for a `PFGMPrecond` network (or any denoiser): (x, network evaluations).

    dx/dt = z v_x / v_z = x - D(x, z) in t = ln z from z_max to z_min (default: the network's range),
    with RK45 (PFGM's default, rtol = atol = 1e-4) or `num_steps` uniform steps of forward or improved
    Euler. `latents`: `prior_latents(net, generators, z_max=z_max)` (the prior at z_max, its norm clipped
    by the network's upper_norm). PFGM returns x at z_min; `denoise`
    takes the Euler step on to z = 0 instead (x = D(x, z_min); free with rk45, one evaluation otherwise).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    z_min = float(net.sigma_min if z_min is None else z_min)
    z_max = float(net.sigma_max if z_max is None else z_max)
    if not 0 < z_min < z_max < math.inf:
        raise ValueError(f"need 0 < z_min < z_max < inf, got {z_min} and {z_max}")
    if solver == "rk45":
        return sampling.sample_rk45(net, latents, class_labels, z_min, z_max, rtol, atol, denoise)
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    drift = sampling.log_sigma_drift(net, class_labels)
    t = torch.linspace(math.log(z_max), math.log(z_min), int(num_steps) + 1, dtype=torch.float64).tolist()
    solution = ode.fixed_step(drift, latents.to(torch.float64), t, solver)
    x, nfe = solution.y, solution.nfe
    if denoise:
        x, nfe = x - drift(t[-1], x), nfe + 1
    return x.to(latents.dtype), nfe


# ----------------------------------------------------------------------------------------------
# Command line


@click.command()
@click.option("--data", help="Measure the average norm on this dataset (ZIP or folder)", metavar="ZIP|DIR", type=str)
@click.option("--data_norm", help="Average data norm |y| (y in [-1, 1]) [default: measured on --data]", type=click.FloatRange(min=0, min_open=True))
@click.option("--resolution", help="Image resolution (without --data)", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--channels", help="Image channels (without --data)", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--sigma_end", help="Smallest perturbation scale", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--tau", help="Growth of the perturbation scale per unit of m", type=click.FloatRange(min=0, min_open=True), default=0.03, show_default=True)
@click.option("--max_images", help="Images measured with --data", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--json", "as_json", help="Print JSON", is_flag=True)
def main(data, data_norm, resolution, channels, sigma_end, tau, max_images, as_json) -> None:
    """PFGM's hyper-parameter helper: M, z_max and upper_norm from the average data norm and N."""
    try:
        N = channels * resolution**2
        if data is not None:
            from training.dataset import ImageFolderDataset

            dataset = ImageFolderDataset(path=data)
            N = dataset.num_channels * dataset.resolution**2
            data_norm = data_norm or average_norm(dataset, max_images)
        if data_norm is None:
            raise ValueError("give --data_norm (CIFAR-10: 32) or --data to measure it")
        report = derive_hparams(data_norm, N, sigma_end, tau)
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"PFGM hyper-parameters for N = {N}, average data norm {report['data_norm']:.4g}, "
               f"sigma_end = {sigma_end:g}, tau = {tau:g}:")
    click.echo(f"  M          = {report['M']}      (train.py --pfgm_M)")
    click.echo(f"  z_max      = {report['z_max']:.4g}  (train.py --z_max)")
    click.echo(f"  upper_norm = {report['upper_norm']:.4g}  (train.py --upper_norm)")


if __name__ == "__main__":
    main()
