"""The PFGM++ paper's robustness study at CPU scale: sample quality against injected noise alpha, NFE and weight
bits, for several D, with networks trained here by the library's own kernel, loss and sampler.

(a) toy: two Gaussians (means +-2 e_1, std 0.5, in 10 dimensions) embedded by a fixed orthonormal map in
    N = 1000 dimensions (10 x 10 x 10) and scaled to EDM's sigma_data = 0.5 per value; an MLP denoiser with
    EDM's preconditioning and loss (PFGM++ kernel at D) for each D; quality: the MMD^2 (RBF kernel, median
    bandwidth) of 1,000 samples against 1,000 fresh data points.
(b) digits: the 1,797 scikit-learn digits (embedded, no download) at 16 x 16 and an MLP denoiser (a U-Net's
    convolutions train too slowly on 2 CPU cores for this budget) for D = 128 and inf;
    quality: the Frechet distance in pixel space (256 values) of 500 samples against the 1,797 digits: no download
    and no learned features. (A classifier trained on the same digits separates them perfectly, and the Frechet
    distance in its features ranked noisy 6-level samples above clean 18-level ones: its features of any new image
    lie off the clusters of the images it was trained on. Pixel space ranks them as one sees them.)

Each cell varies one axis from the base (Heun, 18 levels = 35 NFE, alpha 0, float32 weights). Everything is
seeded; the same command prints the same tables. Writes JSON, Markdown tables and plots into --out.

Run (about 7 minutes on 2 CPU cores):
    .venv/bin/python bench/robustness_cpu.py --out=docs/robustness
    .venv/bin/python bench/robustness_cpu.py --out=/tmp/robustness --part=toy      # (a) only
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click
import numpy as np
import PIL.Image
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from torch_utils import rng  # noqa: E402
from training import robustness  # noqa: E402
from training.datasets.embedded import digits_arrays  # noqa: E402
from training.generation import quantize  # noqa: E402
from training.pfgmpp import format_D  # noqa: E402
from training.losses.edm import EDMLoss  # noqa: E402
from training.preconditioners.edm import EDMPrecond  # noqa: E402
from training.samplers import SamplerSettings  # noqa: E402

ALPHAS = (0.0, 0.05, 0.1, 0.2, 0.4)
STEPS = (4, 6, 9, 13, 18)  # levels: NFE 7, 11, 17, 25, 35
BITS = (8, 6, 5, 4)
BASE_STEPS = 18


# ------------------------------------------------------------------------------------------------
# Models


class MLP(nn.Module):
    """F(x, c_noise) for flat data shaped [B, C, R, R]: three layers, the noise label added to both hidden ones."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.inp, self.noise = nn.Linear(dim, hidden), nn.Linear(1, 2 * hidden)
        self.mid, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, dim)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        first, second = self.noise(noise_labels.reshape(-1, 1).to(x.dtype)).chunk(2, dim=1)
        h = nn.functional.silu(self.inp(x.flatten(1)) + first)
        return self.out(nn.functional.silu(self.mid(h) + second)).reshape(x.shape)


def train(net, batches, steps: int, lr: float, D: float, seed: int, ema_halflife: float = 0.0) -> nn.Module:
    """Adam on the library's EDM / PFGM++ loss at D; returns the EMA of the weights (a copy) when asked for."""
    loss_fn = EDMLoss(D=D)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    ema = None
    if ema_halflife:
        import copy

        ema = copy.deepcopy(net).requires_grad_(False)
    for step in range(steps):
        images = batches(step)
        loss = loss_fn(net, images, generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / (steps / 10))
        optimizer.step()
        if ema is not None:
            beta = 0.5 ** (1 / ema_halflife)
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), net.parameters()):
                    p_ema.lerp_(p, 1 - beta)
    return (ema if ema is not None else net).eval().requires_grad_(False)


def sample(net, count: int, seed: int, axis: str, value) -> torch.Tensor:
    """`count` samples (seeds seed, seed + 1, ...) of one cell: Heun at the base with `axis` set to `value`."""
    options = {"num_steps": BASE_STEPS}
    if axis == "alpha":
        options["perturb_alpha"] = float(value)
    elif axis == "steps":
        options["num_steps"] = int(value)
    model = quantize.quantize(net, int(value)) if axis == "bits" else net
    settings = SamplerSettings("heun", options)
    generators = rng.seeded_generators(range(seed, seed + count))
    latents = settings.prior_latents(model, generators)
    with torch.no_grad():
        return settings.sample(model, latents, generator=generators)


# ------------------------------------------------------------------------------------------------
# Quality


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with an RBF kernel of bandwidth the median distance between y's points."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    dyy = torch.cdist(y, y)
    bandwidth = dyy[~torch.eye(len(y), dtype=torch.bool)].median()
    k = lambda d: torch.exp(-(d**2) / (2 * bandwidth**2))  # noqa: E731
    kxx, kyy, kxy = k(torch.cdist(x, x)), k(dyy), k(torch.cdist(x, y))
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1)) - 2 * kxy.mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to the rows of a and b."""
    import scipy.linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# ------------------------------------------------------------------------------------------------
# The parts


def run_cells(nets: dict, quality, count: int, log) -> dict:
    """{label: {axis: {value (NFE for steps): quality}}} over every cell."""
    values = {}
    for label, net in nets.items():
        values[label] = {}
        for axis, grid in (("alpha", ALPHAS), ("steps", STEPS), ("bits", BITS)):
            for value in grid:
                start = time.time()
                q = quality(sample(net, count, 10**6, axis, value))
                key = 2 * value - 1 if axis == "steps" else value
                values[label].setdefault(axis, {})[key] = q
                log(f"  {label} {axis}={value}: {q:.4g} ({time.time() - start:.1f} s)")
    return values


def toy(log, quick: bool) -> dict:
    """(a): D in {1, 10, 100, 1000, inf}."""
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(1000, 10, generator=g, dtype=torch.float64))
    centre = torch.zeros(10, dtype=torch.float64)
    centre[0] = 2.0
    scale = 0.5 / math.sqrt((4.0 + 10 * 0.25) / 1000)  # per-value RMS of the embedded data -> 0.5

    def draw(count, generator):
        sign = torch.randint(0, 2, [count, 1], generator=generator).double() * 2 - 1
        z = sign * centre + 0.5 * torch.randn(count, 10, generator=generator, dtype=torch.float64)
        return (scale * z @ basis.T).float().reshape(count, 10, 10, 10)

    data_gen = torch.Generator().manual_seed(1)
    steps = 100 if quick else 1500
    nets = {}
    for D in (1.0, 10.0, 100.0, 1000.0, math.inf):
        start = time.time()
        with rng.network_draws(torch.Generator().manual_seed(2)):
            net = EDMPrecond(MLP(1000, hidden=256), img_resolution=10, img_channels=10, D=D)
        nets[f"D = {format_D(D)}"] = train(net, lambda step: draw(256, data_gen), steps, 2e-3, D, seed=3)
        log(f"toy D = {D:g}: trained {steps} steps in {time.time() - start:.0f} s")
    reference = draw(1000, torch.Generator().manual_seed(4))
    return run_cells(nets, lambda x: mmd2(x, reference), 200 if quick else 1000, log)


def digits(log, quick: bool) -> dict:
    """(b): D in {128, inf} on the embedded digits at 16 x 16."""
    images, _ = digits_arrays()
    big = np.stack([np.asarray(PIL.Image.fromarray(im).resize((16, 16), PIL.Image.BICUBIC)) for im in images])
    data = torch.from_numpy(big).float().div(127.5).sub(1).unsqueeze(1)  # [1797, 1, 16, 16] in [-1, 1]
    real = data.flatten(1).double().numpy()

    steps = 150 if quick else 8000
    nets = {}
    for D in (128.0, math.inf):
        start = time.time()
        with rng.network_draws(torch.Generator().manual_seed(7)):
            net = EDMPrecond(MLP(256, hidden=512), img_resolution=16, img_channels=1, D=D)
        g = torch.Generator().manual_seed(8)
        batches = lambda step: data[torch.randint(0, len(data), [128], generator=g)]  # noqa: E731
        nets[f"D = {format_D(D)}"] = train(net, batches, steps, 1e-3, D, seed=9, ema_halflife=steps / 20)
        log(f"digits D = {D:g}: trained {steps} steps in {time.time() - start:.0f} s")

    def quality(x):
        return frechet(x.clamp(-1, 1).flatten(1).double().numpy(), real)

    return run_cells(nets, quality, 100 if quick else 500, log)


@click.command()
@click.option("--out", help="Folder for the JSON, tables and plots", metavar="DIR", type=click.Path(file_okay=False),
              required=True)
@click.option("--part", type=click.Choice(["all", "toy", "digits"]), default="all", show_default=True)
@click.option("--quick", is_flag=True, help="Tiny training and few samples: checks the script runs (figures meaningless)")
def main(out, part, quick):
    """The robustness study on 2 CPU cores: tables and plots of quality against alpha, NFE and bits, per D."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = click.echo
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    begin = time.time()
    results = {}
    for name, fn, metric in (("toy", toy, "MMD²"), ("digits", digits, "pixel FD")):
        if part in ("all", name):
            start = time.time()
            values = fn(log, quick)
            results[name] = {"metric": metric, "values": values, "seconds": round(time.time() - start, 1)}
            table = robustness.markdown_table(metric, values, digits=4 if name == "toy" else 2)
            robustness.write_text(out / f"{name}.md", table)
            robustness.plot(out / f"{name}.png", metric, values, title=f"{name}: {metric} (lower is better)")
            log("\n" + table)
    payload = {"command": " ".join(sys.argv), "torch": torch.__version__, "seconds": round(time.time() - begin, 1),
               "alphas": ALPHAS, "steps": STEPS, "bits": BITS, "results": results}
    robustness.write_text(out / "robustness.json", json.dumps(payload, indent=1, default=str))
    log(f"wrote {out} in {time.time() - begin:.0f} s")


if __name__ == "__main__":
    main()
