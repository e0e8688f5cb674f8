"""Benchmark: the PFGM++ perturbation sampler against plain Gaussian noise (torch.randn).

`training.pfgmpp.sample_perturbation(x, sigma, D, generator)` draws the exact Student-t kernel noise
(Gaussian noise times a per-sample Gamma-based scale); this script times it against `torch.randn` and
`torch.randn_like` for a CIFAR-10 training batch x of shape [512, 3, 32, 32] float32 with one sigma per
sample (ln sigma ~ N(-1.2, 1.2^2)), for D in {1, 128, 2048, inf}. A secondary row times the
per-sample-generator path (a list of 512 generators: a Python loop over seeds, used for generation
only, expected to be much slower).

Run:
    .venv/bin/python bench/bench_perturbation.py                  # cuda if available, else cpu
    .venv/bin/python bench/bench_perturbation.py --device=cpu --repeats=50

Targets (single generator): <= 3x torch.randn on CPU, <= 2x on GPU. This prints figures only; it is
not a test and asserts nothing.
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.pfgmpp import sample_perturbation  # noqa: E402

SHAPE = (512, 3, 32, 32)
D_VALUES = (1.0, 128.0, 2048.0, math.inf)
TARGET = {"cpu": 3.0, "cuda": 2.0}


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(
    calls: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int, number: int
) -> list[float]:
    """Median over `repeats` rounds of the mean time of `number` calls of each fn, in milliseconds.

    The calls are timed round-robin (every call once per round, in a shuffled order), so drift in the
    machine's speed (shared or throttled CPUs) affects all rows alike and the ratios stay meaningful.
    """
    for fn in calls:
        for _ in range(warmup):
            fn()
    samples: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)  # no row always follows the same one (allocator and cache state)
        for fn, times in ((calls[i], samples[i]) for i in order):
            _sync(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device)
            times.append((time.perf_counter() - start) / number)
    return [1e3 * statistics.median(times) for times in samples]


def device_name(device: torch.device) -> str:
    """A readable name for the device the benchmark runs on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; reject devices that are not usable here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise click.BadParameter(str(error), param_hint="--device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine: use --device=cpu", param_hint="--device")
    if resolved.type not in TARGET:
        raise click.BadParameter(f"only cpu and cuda are benchmarked, got {device!r}", param_hint="--device")
    return resolved


def _cases(device: torch.device, seed: int) -> list[tuple[str, Callable[[], object], bool]]:
    """(label, call, secondary) for every row of the table; the first row is the randn reference."""
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.zeros(SHAPE, device=device)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn([SHAPE[0]], generator=generator, device=device))
    cases: list[tuple[str, Callable[[], object], bool]] = [
        ("torch.randn(x.shape, generator=g)", lambda: torch.randn(x.shape, generator=generator, device=device), False),
        ("torch.randn_like(x)  (global RNG)", lambda: torch.randn_like(x), False),
    ]
    for D in D_VALUES:
        label = f"sample_perturbation D={'inf' if math.isinf(D) else f'{D:g}'}"
        cases.append((label, lambda D=D: sample_perturbation(x, sigma, D, generator), False))
    per_sample = [torch.Generator(device).manual_seed(seed + i) for i in range(SHAPE[0])]
    label = f"sample_perturbation D=128, {SHAPE[0]} per-sample generators (generation only)"
    cases.append((label, lambda: sample_perturbation(x, sigma, 128.0, per_sample), True))
    return cases


def _print_header(device: torch.device, warmup: int, repeats: int, number: int) -> None:
    """Print the environment the figures were taken in."""
    print(f"device:  {device} ({device_name(device)})")
    print(f"torch:   {torch.__version__}, threads: {torch.get_num_threads()}")
    if hasattr(os, "getloadavg"):  # other processes on the CPU make the figures noisy: show how busy it was
        print(f"load:    {os.getloadavg()[0]:.2f} (1-minute average) on {os.cpu_count()} logical CPUs")
    print(f"x:       {list(SHAPE)} float32, sigma: per-sample [{SHAPE[0]}], ln sigma ~ N(-1.2, 1.2^2)")
    print(f"timing:  median of {repeats} shuffled round-robin repeats x {number} calls, after {warmup} warm-up calls")
    print()


@click.command()
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Warm-up calls per row")
@click.option("--repeats", type=click.IntRange(min=1), default=31, show_default=True, help="Timed rounds, all rows")
@click.option("--number", type=click.IntRange(min=1), default=None, help="Calls per repeat  [default: 1 cpu, 20 cuda]")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Random seed")
def main(device: str, warmup: int, repeats: int, number: int | None, seed: int) -> None:
    """Time sample_perturbation against torch.randn and print a table (ms per call, ratio to randn)."""
    resolved = resolve_device(device)
    number = number or (20 if resolved.type == "cuda" else 1)
    _print_header(resolved, warmup, repeats, number)
    target = TARGET[resolved.type]
    cases = _cases(resolved, seed)
    timings = time_cases([fn for _, fn, _ in cases], resolved, warmup, repeats, number)
    print(f"{'case':<74} {'ms/call':>9} {'x randn':>8}")
    for (label, _, secondary), ms in zip(cases, timings):
        if secondary:
            print("secondary (Python loop over seeds, expected slower):")
        print(f"{label:<74} {ms:>9.3f} {ms / timings[0]:>7.2f}x")
    print(f"\ntarget: sample_perturbation (one generator) <= {target:g}x torch.randn on {resolved.type}")


if __name__ == "__main__":
    main()
