"""Benchmark: image generation (generate.py's path) and detector feature extraction (fid.py's path).

Generation: DDPM++ at its CIFAR-10 configuration (32x32, random weights: the cost does not depend on
them), EDM's deterministic Heun sampler with 18 noise levels = 35 network evaluations, one generator
per seed, uint8 quantisation included; images per second after one warm-up batch, and the
projected time for 50,000 images. With --guidance=W (W != 1) each case also runs guided by a second network of the
same size (autoguidance's cost: two forward passes per evaluation, counted as such). Feature extraction: uint8 32x32 images through the detector
(resized inside it), images per second, when a detector is available (--detector=PATH, the
$PFGMPP_DETECTOR variable, or the download cache).

Run:
    .venv/bin/python bench/bench_generate.py --device=cuda --batch=512 --images=4096 --precisions=tf32,bf16
    .venv/bin/python bench/bench_generate.py --device=cpu --batch=2 --images=4 --arch=ddpmpp

Goal (issue 5): 50k images at 35 evaluations in under 4 minutes on one H100; their FID in under 1 minute.
This prints figures only; it asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_perturbation import resolve_device, device_name  # noqa: E402
from dnnlib.util import DownloadError  # noqa: E402
from training import generation, metrics, networks, preconditioners, samplers  # noqa: E402
from training.samplers.guidance import guided  # noqa: E402
from training.metrics import detector as detectors  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cifar_network(arch: str, device: torch.device) -> torch.nn.Module:
    """The published CIFAR-10 configuration of `arch` (unconditional, 9 augmentation labels) under EDM preconditioning."""
    model = networks.build_network(arch, 32, 3, 3, augment_dim=9)
    net = preconditioners.PRECONDITIONERS["edm"](model, img_resolution=32, img_channels=3, D=128.0)
    return net.eval().requires_grad_(False).to(device)


def time_generation(net, device, batch: int, count: int, steps: int, precision: str) -> float:
    """Images per second of `generation.generate` for `count` images after one warm-up batch."""
    settings = samplers.SamplerSettings("heun", dict(num_steps=steps))
    for _ in generation.generate(net, range(batch), batch, device, settings, precision=precision):
        pass
    _sync(device)
    start = time.perf_counter()
    for b in generation.generate(net, range(batch, batch + count), batch, device, settings, precision=precision):
        last = b.images
    last.cpu()  # waits for the device
    return count / (time.perf_counter() - start)


def time_features(det, device, batch: int, count: int) -> float:
    """Images per second of the detector's features on uint8 32x32 images, with the float64 statistics."""
    images = torch.randint(0, 256, [batch, 3, 32, 32], dtype=torch.uint8, device=device)
    batches = [(list(range(i, i + batch)), images) for i in range(0, count, batch)]
    metrics.compute_stats(batches[:1], det, batch, device)
    _sync(device)
    start = time.perf_counter()
    stats = metrics.compute_stats(batches, det, len(batches) * batch, device)
    stats.count.item()
    return len(batches) * batch / (time.perf_counter() - start)


@click.command()
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto")
@click.option("--arch", type=click.Choice(["ddpmpp", "ncsnpp"]), default="ddpmpp", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--images", "count", type=click.IntRange(min=1), default=1024, show_default=True, help="Images timed per case")
@click.option("--steps", type=click.IntRange(min=2), default=18, show_default=True, help="Noise levels (2 steps - 1 evaluations)")
@click.option("--precisions", default=None, help="Comma-separated: fp32, tf32, bf16 [default: tf32,bf16 on cuda; fp32 on cpu]")
@click.option("--detector", "detector_source", default=None, help="Detector path or URL [default: $PFGMPP_DETECTOR or the cache]")
@click.option("--skip-generation", is_flag=True, help="Only time the detector")
@click.option("--guidance", type=float, default=None, help="Also time guided generation with this weight (a second network guides)")
def main(device, arch, batch, count, steps, precisions, detector_source, skip_generation, guidance):
    """Print generation and feature-extraction throughput."""
    device = resolve_device(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    precisions = (precisions or ("tf32,bf16" if device.type == "cuda" else "fp32")).split(",")
    print(f"device: {device_name(device)}; torch {torch.__version__}; batch {batch}; {count} images per case")
    if not skip_generation:
        net = cifar_network(arch, device)
        print(f"| {arch} 32x32, {2 * steps - 1} evaluations | img/s | 50k images |")
        print("|---|---|---|")
        cases = [(precision, net) for precision in precisions]
        if guidance is not None and guidance != 1:
            pair = guided(net, cifar_network(arch, device), guidance)
            cases += [(f"{precision}, guided (w={guidance:g}, {2 * (2 * steps - 1)} evaluations)", pair) for precision in precisions]
        for name, model in cases:
            rate = time_generation(model, device, batch, count, steps, precision=name.split(",")[0])
            print(f"| {name} | {rate:.3g} | {50000 / rate / 60:.4g} min |", flush=True)
        del net
    try:
        det = detectors.load_detector(detector_source, device=device, progress=False)
    except (ValueError, DownloadError, OSError) as error:
        print(f"feature extraction: not measured, no detector here ({error})")
        return
    rate = time_features(det, device, batch, count)
    print(f"feature extraction (detector + float64 statistics): {rate:.1f} img/s; 50k images in {50000 / rate:.0f} s")


if __name__ == "__main__":
    main()
