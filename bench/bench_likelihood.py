"""Benchmark: the FP-Diffusion regulariser's cost per training step, and bits/dim's cost per image.

Training step: DDPM++ (random weights; the cost does not depend on them) under EDM preconditioning, the
EDM loss with and without `--fp_reg` (alpha 0.15, beta 0.01, m 2, one Rademacher probe), forward and
backward, seconds per step after one warm-up step. The regulariser adds two network calls (the finite
difference), one vector-Jacobian product with create_graph, one double backward, and the backward of
all of it.

Likelihood: `likelihood.image_bpd` (RK45 at rtol = atol = 1e-5, one Rademacher probe, one dequantisation)
on random uint8 images: network evaluations per solve and seconds per image.

Run:
    .venv/bin/python bench/bench_likelihood.py --device=cpu --resolution=8 --cbase=16 --batch=8
    .venv/bin/python bench/bench_likelihood.py --device=cuda --resolution=32 --batch=64

This prints figures only; it asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_perturbation import device_name, resolve_device  # noqa: E402
from torch_utils import rng  # noqa: E402
from training import losses, networks, preconditioners  # noqa: E402
from training.generation import likelihood  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network(resolution: int, cbase: int | None, device: torch.device) -> torch.nn.Module:
    kwargs = {} if cbase is None else dict(model_channels=cbase)
    if resolution <= 16:
        kwargs.update(channel_mult=[1, 2], attn_resolutions=[])
    model = networks.build_network("ddpmpp", resolution, 3, 3, **kwargs)
    return preconditioners.EDMPrecond(model, img_resolution=resolution, img_channels=3, D=float("inf")).to(device)


def time_step(net, loss_fn, images, device, repeats: int) -> float:
    """Seconds per loss + backward over the batch (after one warm-up)."""
    g = torch.Generator(device).manual_seed(0)
    times = []
    for _ in range(repeats + 1):
        draws = loss_fn.draw(images.shape, device, g)
        _sync(device)
        start = time.perf_counter()
        loss_fn(net, images, draws=draws).sum().backward()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


@click.command()
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto")
@click.option("--resolution", type=click.IntRange(min=8), default=32, show_default=True)
@click.option("--cbase", type=click.IntRange(min=1), default=None, help="Channel multiplier [default: the preset]")
@click.option("--batch", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def main(device, resolution, cbase, batch, repeats):
    """Print the regulariser's and the likelihood's costs."""
    device = resolve_device(device)
    with rng.network_draws(torch.Generator().manual_seed(0)):  # seeded weights, without reseeding torch
        net = network(resolution, cbase, device).train()
    g = torch.Generator(device).manual_seed(1)
    images = torch.rand([batch, 3, resolution, resolution], device=device, generator=g) * 2 - 1
    plain = time_step(net, losses.EDMLoss(), images, device, repeats)
    regularised = time_step(net, losses.EDMLoss(fp=dict(alpha=0.15, beta=0.01)), images, device, repeats)
    print(f"{device_name(device)}: DDPM++ {resolution}x{resolution}, batch {batch}")
    print(f"  training step: {plain:.3f} s plain, {regularised:.3f} s with the FP regulariser ({regularised / plain:.1f}x)")
    net.eval().requires_grad_(False)
    pixels = torch.randint(0, 256, [batch, 3, resolution, resolution], dtype=torch.uint8, device=device, generator=g)
    generators = rng.seeded_generators(range(batch), device)
    _sync(device)
    start = time.perf_counter()
    _, nfe = likelihood.image_bpd(net, pixels, generators)
    _sync(device)
    seconds = time.perf_counter() - start
    print(f"  bits/dim: {nfe} network evaluations (+ as many VJPs) per solve, {seconds / batch:.3f} s per image")


if __name__ == "__main__":
    main()
