"""Likelihood in bits/dim for any D: the probability-flow ODE and the instantaneous change of variables.

With t = ln(sigma) the PFGM++ ODE is dx/dt = f(x, t) = x - D(x, sigma) for every D (PFGM++ eq. 7 with
r = sigma sqrt(D)). The model is the pushforward of the prior p_{r_max} (the kernel at sigma_max centred
at 0) along this flow, so for data x at sigma_min (Score SDE App. D.2, Chen et al. 2018):

    log p(x) = log p_{r_max}(x_T) + int_{ln sigma_min}^{ln sigma_max} div f(x_t, t) dt,   div f = N - div D,

x_T the end of the flow, integrated together with the log-determinant by the adaptive Dormand-Prince
solver of `training.ode`. The prior term is the exact kernel log-density `pfgmpp.log_prob` in float64.
div D is exact (N vector-Jacobian products; small N) or Hutchinson's estimate v^T J v with Rademacher or
Gaussian probes (`training.divergence`), fixed along each trajectory, several averaged.

Bits/dim of 8-bit images (docs/likelihood.md): pixel values k in {0..255} are the training points
x = k / 127.5 - 1; uniform dequantisation x = (k + u - 1/2) / 127.5 - 1, u ~ U[0, 1)^N, gives
    bpd = -E_u[log p(x)] / (N ln 2) + log2(127.5),
the same bound on the discrete NLL as Score SDE's -log p(z) / (N ln 2) + 8 for z = (k + u) / 256 in [0, 1).

    torchrun --standalone --nproc_per_node=8 -m training.cli.likelihood --network=net.pt \\
        --data=datasets/cifar10-32x32-test.zip --out=bpd.json      # also installed as pfgmpp-likelihood
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import tqdm

from torch_utils import distributed, rng
from training import ode, pfgmpp
from training.divergence import PROBE_KINDS, divergence, draw_probes
from training.samplers.base import log_sigma_drift
from training.samplers.levels import flow_range

ESTIMATORS = (*PROBE_KINDS, "exact")
BIN_WIDTH = 1 / 127.5  # one 8-bit level in the model's units, x = k / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# The ODE with its log-determinant.


@dataclass
class Likelihood:
    """log p(x) per sample (nats, float64, in the model's units), its two terms, the latents and the cost."""

    log_p: torch.Tensor
    prior_log_p: torch.Tensor
    delta_log_p: torch.Tensor
    latents: torch.Tensor
    nfe: int
    sigma_min: float
    sigma_max: float


def check_prior(net) -> None:
    """ValueError for networks whose prior has no density (PFGM's clipped norm)."""
    if getattr(net, "upper_norm", None) is not None:
        raise ValueError("this network clips its prior's norm (PFGM's upper_norm): its prior has no kernel density, "
                         "so the likelihood is undefined; use a PFGM++ / diffusion network")


def _augmented_drift(net, class_labels, shape, probes):
    """d[x, delta]/dt = [f, div f] in t = ln sigma, on a flat float64 state [B, N + 1]."""
    base = log_sigma_drift(net, class_labels)
    batch, N = shape[0], math.prod(shape[1:])

    def drift(t: float, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = y[:, :N].reshape(shape).detach().requires_grad_(True)
            f = base(t, x)
            div_D = divergence(x - f, x, probes)  # D = x - f: Hutchinson on D avoids the variance of |v|^2
        div_f = N - div_D.detach().to(y.dtype)
        return torch.cat([f.detach().reshape(batch, N).to(y.dtype), div_f[:, None]], dim=1)

    return drift


def log_likelihood(
    net,
    x: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    probes: torch.Tensor | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Likelihood:
    """log p(x) under the network's model: the flow from sigma_min to sigma_max with RK45, then the exact prior.

    `x` [B, C, H, W] are data in the model's units (about [-1, 1]) at sigma_min. `probes` [B, K, C, H, W]
    from `draw_probes` give Hutchinson's estimate (unbiased for p's log, fixed along the trajectory);
    None computes div D exactly (N network backward passes per evaluation: small N only).
    """
    check_prior(net)
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty batch [B, ...]")
    lo, hi = flow_range(net, sigma_min, sigma_max)
    batch, N = x.shape[0], math.prod(x.shape[1:])
    y0 = torch.cat([x.detach().reshape(batch, N).to(torch.float64),
                    torch.zeros([batch, 1], dtype=torch.float64, device=x.device)], dim=1)
    drift = _augmented_drift(net, class_labels, x.shape, probes)
    solution = ode.rk45(drift, y0, math.log(lo), math.log(hi), rtol=rtol, atol=atol)
    latents = solution.y[:, :N].reshape(x.shape)
    delta = solution.y[:, N]
    prior = pfgmpp.log_prob(latents, hi, net.D)
    return Likelihood(prior + delta, prior, delta, latents, solution.nfe, lo, hi)


# ----------------------------------------------------------------------------------------------
# Bits/dim of 8-bit images.


def dequantize(images: torch.Tensor, generator: rng.Generators = None) -> torch.Tensor:
    """uint8 images [B, C, H, W] to float64 x = (k + u - 1/2) / 127.5 - 1, u ~ U[0, 1): bins centred on k / 127.5 - 1."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [B, C, H, W] pixel values, got {images.dtype}")
    u = rng.rand(images.shape, generator, device=images.device, dtype=torch.float64)
    return (images.to(torch.float64) + u - 0.5) * BIN_WIDTH - 1


def bits_per_dim(log_p: torch.Tensor, N: int) -> torch.Tensor:
    """bpd = -log p(x) / (N ln 2) + log2(127.5) for log p of dequantised x in the model's units (module docstring)."""
    return -log_p / (N * math.log(2)) + math.log2(127.5)


def image_bpd(
    net,
    images: torch.Tensor,
    generators: Sequence[torch.Generator],
    class_labels: torch.Tensor | None = None,
    dequant: int = 1,
    estimator: str = "rademacher",
    num_probes: int = 1,
    **flow_options,
) -> tuple[torch.Tensor, int]:
    """(bpd per image [B] averaged over `dequant` draws, network evaluations) for uint8 images [B, C, H, W].

    Image i's draws come from generators[i] alone, in the order (u_1, v_1, u_2, v_2, ...), so its result
    does not depend on the batch it is in beyond the solver's tolerance. `flow_options` go to `log_likelihood`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if int(dequant) < 1:
        raise ValueError(f"dequant (uniform dequantisation draws) must be >= 1, got {dequant}")
    N = math.prod(images.shape[1:])
    total, nfe = torch.zeros([images.shape[0]], dtype=torch.float64, device=images.device), 0
    for _ in range(int(dequant)):
        x = dequantize(images, generators)
        probes = None
        if estimator != "exact":
            probes = draw_probes(images.shape, estimator, num_probes, generators, device=images.device)
        result = log_likelihood(net, x, class_labels, probes, **flow_options)
        total += bits_per_dim(result.log_p, N)
        nfe += result.nfe
    return total / int(dequant), nfe


# ----------------------------------------------------------------------------------------------
# A dataset on one or many ranks.


def image_generators(seed: int, positions: Sequence[int], device) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, position in the dataset): independent of batch and ranks."""
    return rng.seeded_generators([rng.mixed_seed(seed, p, 9) for p in positions], device)


def dataset_bpd(net, dataset, batch_size: int, device, seed: int = 0, workers: int = 1, progress: bool = False,
                **options) -> dict:
    """bits/dim of every image of `dataset` (uint8 [C, H, W] items), this rank's share, gathered on every rank.

    Returns the mean, its standard error over images (Hutchinson and dequantisation noise included), the
    per-image values in dataset order and the mean network evaluations per ODE solve. `options` go to `image_bpd`.
    """
    count = len(dataset)
    if count == 0:
        raise ValueError("the dataset is empty")
    batches = [list(b) for b in distributed.rank_batches(count, batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    values = torch.zeros([count], dtype=torch.float64, device=device)
    nfe = torch.zeros([2], dtype=torch.float64, device=device)
    bar = tqdm.tqdm(total=count, unit="img", disable=not (progress and distributed.is_main()), dynamic_ncols=True)
    for positions, (images, labels) in zip(batches, loader):
        images = torch.as_tensor(images).to(device)
        labels = torch.as_tensor(labels).to(device, torch.float32) if getattr(net, "label_dim", 0) else None
        bpd, evals = image_bpd(net, images, image_generators(seed, positions, device), labels, **options)
        values[positions] = bpd
        nfe += torch.tensor([evals, options.get("dequant", 1)], dtype=torch.float64, device=device)
        bar.update(len(positions) * distributed.get_world_size())
    bar.close()
    values = distributed.all_reduce_sum(values)  # each position is filled by exactly one rank
    nfe = distributed.all_reduce_sum(nfe)
    mean = float(values.mean())
    se = float(values.std(unbiased=True) / math.sqrt(count)) if count > 1 else math.nan
    return dict(bpd=mean, bpd_se=se, num_images=count, nfe_per_solve=float(nfe[0] / max(float(nfe[1]), 1.0)),
                per_image=values.cpu().tolist())
