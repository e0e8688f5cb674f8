"""Latents of the invertible map for any D: encode data to the prior at sigma_max, decode, interpolate, temperature.

The probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (every D) is a bijection between the data at
sigma_min and the prior p_{r_max} at sigma_max (Score SDE sec. 4.3, PFGM++ sec. 3). `encode` integrates it
upwards with the adaptive Dormand-Prince solver, `decode` downwards (the `rk45` solver), so decode(encode(x))
returns x to the solver's tolerance. A latent is a radius R = |x| and a direction x / R; for finite D the
prior's radius is heavy-tailed (R^2 / r_max^2 ~ BetaPrime(N/2, D/2)), so interpolation slerps the direction
and interpolates the radius geometrically (at D = inf the radii concentrate and this is the usual slerp).
Temperature scales the prior radius, as in PFGM's experiments (tau < 1: smoother, tau > 1: more diverse).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import tqdm

from dnnlib import util
from torch_utils import distributed, rng
from training import ode
from training.generation import images, seeded
from training.samplers import SamplerSettings, rk45
from training.samplers.base import log_sigma_drift
from training.samplers.levels import flow_range

LATENT_FORMATS = ("npy", "pt")


def encode(net, x: torch.Tensor, class_labels: torch.Tensor | None = None, sigma_min: float | None = None,
           sigma_max: float | None = None, rtol: float = 1e-5, atol: float = 1e-5) -> tuple[torch.Tensor, int]:
    """Data x [B, C, H, W] (model units, at sigma_min) to latents at sigma_max, float64; (latents, evaluations)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty batch of images [B, C, H, W] in the model's units (about [-1, 1])")
    lo, hi = flow_range(net, sigma_min, sigma_max)
    drift = log_sigma_drift(net, class_labels)
    with torch.no_grad():
        solution = ode.rk45(drift, x.to(torch.float64), math.log(lo), math.log(hi), rtol=rtol, atol=atol)
    return solution.y, solution.nfe


def decode(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, sigma_min: float | None = None,
           sigma_max: float | None = None, rtol: float = 1e-5, atol: float = 1e-5,
           denoise: bool = False) -> tuple[torch.Tensor, int]:
    """Latents at sigma_max back to x at sigma_min (the inverse of `encode`), or to sigma = 0 with `denoise`."""
    with torch.no_grad():
        return rk45.sample(net, latents.to(torch.float64), class_labels, sigma_min=sigma_min, sigma_max=sigma_max,
                           rtol=rtol, atol=atol, denoise=denoise)


def interpolate(a: torch.Tensor, b: torch.Tensor, weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Latents [F, ...] between a and b ([...] or [1, ...]): slerp of the direction, geometric mean of the radius."""
    a, b = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"the two latents differ in size ({a.numel()} and {b.numel()}): encode both with one network")
    w = torch.as_tensor(weights, dtype=torch.float64, device=a.device).reshape(-1, 1)
    r_a, r_b = a.norm(), b.norm()
    if not (r_a > 0 and r_b > 0):
        raise ValueError("a latent is zero: it has no direction to interpolate")
    u_a, u_b = a / r_a, b / r_b
    theta = torch.arccos((u_a @ u_b).clamp(-1, 1))
    if theta < 1e-6:  # (nearly) the same direction: slerp's limit is the linear path
        direction = (1 - w) * u_a + w * u_b
    else:
        direction = (torch.sin((1 - w) * theta) * u_a + torch.sin(w * theta) * u_b) / torch.sin(theta)
    direction = direction / direction.norm(dim=1, keepdim=True)
    radius = torch.exp((1 - w) * r_a.log() + w * r_b.log())
    return radius * direction


def temperature(latents: torch.Tensor, tau: float) -> torch.Tensor:
    """Scale the prior radius by tau > 0 (the direction is kept)."""
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"the temperature must be a finite number > 0, got {tau!r}")
    return latents * tau


# ----------------------------------------------------------------------------------------------
# Files: latents as .npy (no pickle) or .pt (a bare tensor, read with weights_only=True).


def save_latent(path: str | os.PathLike, latent: torch.Tensor) -> None:
    """Write one latent [C, H, W] as float32 .npy or .pt (by the suffix), atomically, creating its folder."""
    path = Path(path)
    if path.suffix not in (".npy", ".pt"):
        raise ValueError(f"{path}: latents are written as .npy or .pt")
    array = latent.detach().to(torch.float32).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    with util.atomic_write(path) as f:
        if path.suffix == ".npy":
            np.save(f, array.numpy(), allow_pickle=False)
        else:
            torch.save(array.clone(), f)


def load_latent(path: str | os.PathLike, shape: Sequence[int]) -> torch.Tensor:
    """Read a latent written by `save_latent` (or any float array of `shape`), without running code from it."""
    path = Path(path)
    if path.suffix not in (".npy", ".pt"):
        raise ValueError(f"{path}: a latent must be a .npy or .pt file")
    try:
        if path.suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, ValueError, pickle.UnpicklingError, RuntimeError, EOFError) as error:  # damaged, or code refused
        raise ValueError(f"cannot read the latent {path}: {error}") from None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() != math.prod(shape):
        raise ValueError(f"{path} is not a latent of shape {list(shape)}: encode images with this network's generate.py --encode")
    return value.reshape(*shape).to(torch.float64)


# ----------------------------------------------------------------------------------------------
# Grids for generate.py.


def _seed_latents(net, seeds: Sequence[int], device, settings: SamplerSettings, class_idx):
    generators = rng.seeded_generators(seeds, device)
    latents = settings.prior_latents(net, generators, device=device)
    return latents, seeded.class_labels(net, generators, class_idx, device)


def _render(net, latents, labels, settings: SamplerSettings) -> torch.Tensor:
    """uint8 images [B, H, W, C] from latents at the sampler's first noise level, with any solver.

    A stochastic sampler draws frame i's noise from a generator seeded with i, so a grid is reproducible.
    """
    generators = rng.seeded_generators(range(len(latents)), latents.device)
    return images.to_uint8(settings.sample(net, latents.to(torch.float32), labels, generator=generators))


def interpolation_grid(net, a: torch.Tensor, b: torch.Tensor, frames: int, device, settings=None,
                       labels: torch.Tensor | None = None):
    """A one-row PNG grid of `frames` images along the interpolation from latent a to latent b."""
    if int(frames) < 2:
        raise ValueError(f"frames must be >= 2 (the two ends included), got {frames}")
    settings = settings or SamplerSettings()
    path = interpolate(a.to(device), b.to(device), torch.linspace(0, 1, int(frames)))
    path = path.reshape(int(frames), net.img_channels, net.img_resolution, net.img_resolution)
    labels = None if labels is None else labels.reshape(1, -1).expand(int(frames), -1)
    return images.grid(_render(net, path, labels, settings).cpu().numpy(), cols=int(frames))


def seed_latent(net, seed: int, device, settings=None, class_idx: int | None = None):
    """(latent [1, C, H, W], class label or None) of one seed, as generate.py draws them."""
    return _seed_latents(net, [int(seed)], device, settings or SamplerSettings(), class_idx)


def temperature_grid(net, seeds: Sequence[int], temperatures: Sequence[float], device, settings=None,
                     class_idx: int | None = None):
    """A PNG grid: one row per temperature, one column per seed (the same prior draws, radius scaled)."""
    settings = settings or SamplerSettings()
    latents, labels = _seed_latents(net, seeds, device, settings, class_idx)
    rows = [_render(net, temperature(latents, float(tau)), labels, settings) for tau in temperatures]
    return images.grid(torch.cat(rows).cpu().numpy(), cols=len(seeds))


def endpoint(net, text: str, device, settings=None, class_idx: int | None = None):
    """(latent [1, C, H, W], label or None) of one end of an interpolation: a seed, or a latent file."""
    text = text.strip()
    shape = [1, net.img_channels, net.img_resolution, net.img_resolution]
    if text.isdigit():
        return seed_latent(net, int(text), device, settings, class_idx)
    label_dim = getattr(net, "label_dim", 0)
    if label_dim and class_idx is None:
        raise ValueError(f"the network is conditional: give --class to decode the latent file {text}")
    label = None if not label_dim else torch.eye(label_dim, device=device)[[int(class_idx)]]
    return load_latent(text, shape).to(device), label


# ----------------------------------------------------------------------------------------------
# A dataset to latent files, with the decode check.


def encode_dataset(net, dataset, batch_size: int, device, outdir: str | os.PathLike, fmt: str = "npy",
                   sigma_min: float | None = None, sigma_max: float | None = None, progress: bool = False,
                   keep: int = 0) -> dict:
    """Encode this rank's share of `dataset` to outdir/NNNNNN.<fmt>, decode each batch back and compare.

    Returns the number of images, the largest decode error in 8-bit levels (model units x 127.5) and
    how many images came back bit-exact in uint8, over all ranks; plus up to `keep` (input, decoded)
    uint8 pairs [keep, H, W, C] of this rank for a grid.
    """
    if fmt not in LATENT_FORMATS:
        raise ValueError(f"latent format must be one of {', '.join(LATENT_FORMATS)}, got {fmt!r}")
    batches = [list(b) for b in distributed.rank_batches(len(dataset), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=0)
    totals = torch.zeros([3], dtype=torch.float64, device=device)  # images, max error, exact images
    inputs, decoded = [], []
    bar = tqdm.tqdm(total=len(batches), unit="batch", disable=not (progress and distributed.is_main()))
    for positions, (pixels, labels) in zip(batches, loader):
        pixels = torch.as_tensor(pixels).to(device)
        labels = torch.as_tensor(labels).to(device, torch.float32) if getattr(net, "label_dim", 0) else None
        x = pixels.to(torch.float64) / 127.5 - 1
        z, _ = encode(net, x, labels, sigma_min, sigma_max)
        for position, latent in zip(positions, z):
            save_latent(Path(outdir) / f"{position:06d}.{fmt}", latent)
        back, _ = decode(net, z, labels, sigma_min, sigma_max)
        error = (back - x).flatten(1).abs().amax(dim=1) * 127.5
        exact = (images.to_uint8(back) == pixels.permute(0, 2, 3, 1)).flatten(1).all(dim=1)
        totals[0] += len(positions)
        totals[1] = torch.maximum(totals[1], error.max())
        totals[2] += exact.sum()
        if len(inputs) * batch_size < keep:
            inputs.append(pixels.permute(0, 2, 3, 1))
            decoded.append(images.to_uint8(back))
        bar.update(1)
    bar.close()
    count = distributed.all_reduce_sum(totals[[0, 2]].clone()).tolist()
    worst = distributed.all_gather(totals[1:2].clone()).max().item()
    pairs = (torch.cat(inputs)[:keep], torch.cat(decoded)[:keep]) if inputs else None
    return dict(num_images=int(count[0]), max_error_levels=worst, exact_images=int(count[1]), pairs=pairs)
