"""Benchmark: the fast solvers (DPM-Solver++(2M/3M), UniPC) against EDM's Heun at 35 NFE, and adaptive RK45 against
Heun (and PFGM's uniform ln-z improved Euler) at matched quality.

The toy: K points in N dimensions, and the exact denoiser E[y|x] of that set as the network (tests/oracles.py),
so the only error is the solver's. Every solver integrates the same probability-flow ODE
dx/dsigma = (x - D(x, sigma)) / sigma from sigma_max = 80 to sigma_min = 0.002 and ends with the same
Euler step to sigma = 0 (= D(x, sigma_min)); the reference is RK45 at rtol = atol = 1e-9. Quality is the RMS
error per value of x(sigma_min) against the reference (the last step snaps samples onto data points, so
its output is either exact or on another point: that share is reported as "moved"). First, per D, the fewest
NFE at which each fast solver's median per-image error is at most Heun's with 18 levels (35 NFE), and a
Markdown table of that
(Restart is stochastic and leaves the ODE's path by design, so this error is not its measure). Then, for each
quality level the table gives, per solver, the fewest network evaluations (NFE) that reach it and the wall
time per image of that run. The oracle costs about as much as a tiny network: on real networks the wall
time is NFE x the network's time per evaluation (plus one host sync per RK45 step).

Run:
    .venv/bin/python bench/bench_solvers.py                       # cuda if available, else cpu
    .venv/bin/python bench/bench_solvers.py --device=cpu --D=inf,128,1 --count=512
    .venv/bin/python bench/bench_solvers.py --device=cpu --D=inf,2048,128,2,1 --fast-only

Prints figures only; not a test, asserts nothing.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tests.oracles import AnalyticDenoiser  # noqa: E402
from torch_utils import rng  # noqa: E402
from training import ode, samplers  # noqa: E402
from training.samplers import rk45  # noqa: E402
from training.samplers.base import log_sigma_drift  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
HEUN_STEPS = (4, 6, 8, 10, 13, 18, 25, 35, 50, 70)
LOG_EULER_STEPS = (8, 12, 18, 25, 35, 50, 70, 100, 140)
RK45_TOLS = (1e-1, 5e-2, 2e-2, 1e-2, 5e-3, 2e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)
QUALITY = (1e-2, 1e-3, 1e-4)
QUANTILE = 0.5
FAST_SOLVERS = ("dpmpp-2m", "dpmpp-3m", "unipc")
FAST_STEPS = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 22, 25, 30, 35, 40, 50, 60, 70)


def _timed(device, fn):
    """(result, seconds) with the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _log_euler(net, latents, steps):
    """Improved Euler on a uniform grid in ln(sigma) (PFGM's grid in ln z), then the Euler step to 0."""
    drift = log_sigma_drift(net)
    t = torch.linspace(math.log(SIGMA_MAX), math.log(SIGMA_MIN), steps + 1, dtype=torch.float64).tolist()
    solution = ode.fixed_step(drift, latents.to(torch.float64), t, "improved_euler")
    return solution.y, solution.y - drift(t[-1], solution.y), solution.nfe + 1


def _heun(net, latents, steps):
    """EDM's sampler; also returns x at sigma_min (the state before its last step, to sigma = 0)."""
    states = {}
    record = lambda i, a, b, x, d: states.update({i: x})  # noqa: E731
    out = samplers.sample(net, latents, num_steps=steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, callback=record)
    return states[steps - 2], out, 2 * steps - 1


def _fast(solver):
    """A multistep solver (dpmpp-2m, dpmpp-3m, unipc) at `steps` levels: x at sigma_min, the sample, NFE."""

    def run(net, latents, steps):
        states = {}
        record = lambda i, sigma, x, denoised: states.update(x=x)  # noqa: E731  (the last: the point at sigma_min)
        out = samplers.sample(net, latents, solver=solver, num_steps=steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                              callback=record)
        return states["x"], out, steps

    return run


def _rk45(net, latents, tol):
    x_min, nfe = rk45.sample(net, latents, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rtol=tol, atol=tol, denoise=False)
    return x_min, net(x_min, SIGMA_MIN).to(x_min.dtype), nfe  # the denoise step is free inside the rk45 solver


def _runs(net, latents, device):
    """Every solver setting: {solver: [(nfe, seconds, x at sigma_min, x at 0), ...]}."""
    runs = {}
    for name, fn, settings in (("heun (EDM steps)", _heun, HEUN_STEPS), ("rk45", _rk45, RK45_TOLS),
                               ("improved euler (uniform ln sigma)", _log_euler, LOG_EULER_STEPS)):
        runs[name] = []
        for setting in settings:
            (x_min, x_0, nfe), seconds = _timed(device, lambda fn=fn, setting=setting: fn(net, latents, setting))
            runs[name].append((nfe, seconds, x_min, x_0))
    return runs


def _matching_heun(net, latents, reference, device, count):
    """Per fast solver, the fewest NFE whose error at sigma_min is at most Heun's at 35 NFE (18 levels).

    The error: the median over the images of each image's RMS error, robust to the few images whose path crosses
    into another data point's basin at the end (those flip whole-sample errors in and out of an RMS over all)."""
    flat = lambda x: x.reshape(len(x), -1).to(torch.float64)  # noqa: E731
    rms = lambda x: (flat(x) - flat(reference[0])).square().mean(dim=1).sqrt().quantile(QUANTILE).item()  # noqa: E731
    target = rms(_heun(net, latents, 18)[0])
    cells, curves = [], []
    for solver in FAST_SOLVERS:
        errors = {}
        for steps in FAST_STEPS:
            errors[steps] = rms(_fast(solver)(net, latents, steps)[0])
            if errors[steps] <= target:
                break
        hit = [n for n, e in errors.items() if e <= target]
        cells.append(f"{hit[0]}" if hit else f"> {max(errors)}")
        curves.append(f"    {solver}: " + ", ".join(f"{n}: {e:.1e}" for n, e in errors.items()))
    click.echo(f"  Heun-35 median RMS error {target:.2e}; NFE to match it: "
               + ", ".join(f"{solver} {cell}" for solver, cell in zip(FAST_SOLVERS, cells)))
    click.echo("\n".join(curves))
    return target, cells


def _report(runs, reference, data, count):
    """Print, per quality level, the cheapest run of each solver that reaches it."""
    flat = lambda x: x.reshape(len(x), -1).to(torch.float64)  # noqa: E731
    reference_min, reference_0 = reference
    ref_index = torch.cdist(flat(reference_0), flat(data)).argmin(dim=1)
    header = f"  {'quality (RMS err)':>18} | " + " | ".join(f"{name:>34}" for name in runs)
    click.echo(header)
    click.echo("  " + "-" * (len(header) - 2))
    measured = {}
    for name, rows in runs.items():
        measured[name] = []
        for nfe, seconds, x_min, x_0 in rows:
            rms = (flat(x_min) - flat(reference_min)).square().mean().sqrt().item()
            moved = (torch.cdist(flat(x_0), flat(data)).argmin(dim=1) != ref_index).float().mean().item()
            measured[name].append((nfe, seconds, rms, moved))
    for quality in QUALITY:
        cells = []
        for name in runs:
            ok = [row for row in measured[name] if row[2] <= quality]
            if ok:
                nfe, seconds, rms, moved = min(ok, key=lambda row: row[0])
                cells.append(f"NFE {nfe:4d}, {1e3 * seconds / count:7.3f} ms/img, {100 * moved:4.1f}% moved")
            else:
                cells.append("not reached")
        click.echo(f"  {quality:>18g} | " + " | ".join(f"{cell:>34}" for cell in cells))
    click.echo("  all runs (NFE: RMS error):")
    for name, rows in measured.items():
        click.echo(f"    {name}: " + ", ".join(f"{nfe}: {rms:.1e}" for nfe, _, rms, _ in rows))


@click.command()
@click.option("--device", type=str, default=None, help="cuda or cpu [default: cuda if available]")
@click.option("--D", "D_list", type=str, default="inf,128,1", show_default=True, help="Comma-separated D values")
@click.option("--count", type=click.IntRange(min=1), default=128, show_default=True, help="Images per run")
@click.option("--points", type=click.IntRange(min=1), default=64, show_default=True, help="Data points K")
@click.option("--channels", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--resolution", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--fast-only", "fast_only", is_flag=True, help="Only the fast solvers against Heun-35")
def main(device, D_list, count, points, channels, resolution, fast_only):
    """Fast solvers against Heun-35, and RK45 vs Heun vs uniform ln-sigma improved Euler, on the analytic toy."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    click.echo(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
               f"{count} images, K = {points} points, N = {channels * resolution**2}")
    data = torch.randn([points, channels, resolution, resolution], generator=torch.Generator().manual_seed(0)) * 0.5
    summary = []
    for D in (float(v) for v in D_list.split(",")):
        net = AnalyticDenoiser(data.to(device), D).to(device)
        generators = rng.seeded_generators(range(count), device=device)
        latents = samplers.prior_latents(net, generators, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX).to(torch.float64)
        reference = _rk45(net, latents, 1e-9)[:2]
        click.echo(f"\nD = {D:g}")
        summary.append((D, *_matching_heun(net, latents, reference, device, count)))
        if not fast_only:
            _report(_runs(net, latents, device), reference, data.to(device), count)
    click.echo("\n| D | Heun-35 median error | " + " | ".join(f"{s} NFE" for s in FAST_SOLVERS) + " |")
    click.echo("|---|---|" + "---|" * len(FAST_SOLVERS))
    for D, target, cells in summary:
        click.echo(f"| {'∞' if math.isinf(D) else f'{D:g}'} | {target:.1e} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
