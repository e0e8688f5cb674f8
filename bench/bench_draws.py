"""Benchmark: the per-rank cost of a training step's random draws at 1, 8 and 64 (simulated) ranks.

A step of PFGM++ training draws, per sample, a noise level, the kernel noise (a Gaussian image and a Gamma
variate) and the augmentation parameters. Before, every rank drew them for the whole global batch and kept its
rows: a per-rank cost that does not shrink with more ranks (1.6 GB of random numbers per rank per step at 256²
with a global batch of 2,048). Now each rank draws its own rows from per-sample counter-based streams
(`torch_utils.rng.sample_streams`), the same numbers whatever the split. This times one rank's draws of the
EDM loss (D = 128) for both ways, and prints milliseconds and megabytes per rank.

    .venv/bin/python bench/bench_draws.py --device=cpu --batch=512 --resolution=32
    .venv/bin/python bench/bench_draws.py --device=cuda --batch=2048 --resolution=256

Prints figures only; asserts nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_perturbation import device_name, resolve_device, time_cases  # noqa: E402
from torch_utils import rng  # noqa: E402
from training.losses import EDMLoss  # noqa: E402

RANKS = (1, 8, 64)


def per_rank_costs(device: torch.device, batch: int, resolution: int, ranks=RANKS, repeats: int = 5) -> list[dict]:
    """One row per rank count: rows per rank, and ms and MB per rank for the global draw and the per-rank streams."""
    loss = EDMLoss(D=128.0)
    shape = [3, resolution, resolution]
    rows_out = []
    for world in ranks:
        rows = batch // world
        generator = torch.Generator(device).manual_seed(0)

        def whole(generator=generator):  # the former way: the global batch, on every rank
            return loss.draw([batch, *shape], device, generator)

        def own(rows=rows):  # this rank's rows of the global batch, from their streams
            return loss.draw([rows, *shape], device, rng.sample_streams((0, 1, 0), range(rows), device))

        old_ms, new_ms = time_cases([whole, own], device, warmup=1, repeats=repeats, number=1)
        values = rows * (1 + 3 * resolution**2)
        rows_out.append(dict(ranks=world, rows_per_rank=rows, global_ms=old_ms, own_rows_ms=new_ms,
                             global_mb=batch * (1 + 3 * resolution**2) * 4 / 2**20, own_rows_mb=values * 4 / 2**20))
    return rows_out


@click.command()
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto")
@click.option("--batch", type=click.IntRange(min=64), default=512, show_default=True, help="Global batch")
@click.option("--resolution", type=click.IntRange(min=4), default=32, show_default=True, help="Image side")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed rounds")
def main(device: str, batch: int, resolution: int, repeats: int) -> None:
    """Print the per-rank cost of the draws at 1, 8 and 64 ranks, both ways."""
    resolved = resolve_device(device)
    print(f"device: {resolved} ({device_name(resolved)}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"global batch {batch} of 3x{resolution}x{resolution}, EDM loss at D = 128 (sigma, Gaussian image, Gamma)")
    print(f"{'ranks':>5} {'rows/rank':>9} {'global draw ms':>15} {'own rows ms':>12} {'global MB':>10} {'own rows MB':>12}")
    for row in per_rank_costs(resolved, batch, resolution, repeats=repeats):
        print(f"{row['ranks']:>5} {row['rows_per_rank']:>9} {row['global_ms']:>15.2f} {row['own_rows_ms']:>12.2f} "
              f"{row['global_mb']:>10.1f} {row['own_rows_mb']:>12.2f}")


if __name__ == "__main__":
    main()
