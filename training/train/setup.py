"""Setting up a training run: its network (seeded initial weights, --transfer), DDP and torch.compile, precision,
and the run directory's leftovers (temporaries of killed writers, statistics written after the state resumed)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from dnnlib.util import atomic_write
from torch_utils import distributed, precision, rng
from torch_utils.rng import mixed_seed
from training import checkpoint, networks, preconditioners

INIT_SEED = 5  # the purpose of the initial weights' generator in `mixed_seed(seed, ...)`


def set_precision(c: dict, device: torch.device) -> None:
    """TF32 unless --precision=fp32; cuDNN autotuning on CUDA unless --bench=0."""
    precision.set_tf32(c["precision"] != "fp32")
    torch.backends.cudnn.benchmark = device.type == "cuda" and c["bench"]


def build_denoiser(c: dict, dataset, device, seed: int | None = None) -> torch.nn.Module:
    """The preconditioned network D_theta (train mode) a configuration describes, for the dataset's shape.

    Its initial weights are drawn on the CPU from a generator seeded by (--seed, INIT_SEED) (`rng.network_draws`):
    the same on every rank and in every run with that seed. `seed` overrides --seed.
    """
    precond = preconditioners.get(c["precond"])
    kwargs = dict(c["network_kwargs"])
    generator = torch.Generator().manual_seed(mixed_seed(c["seed"] if seed is None else seed, INIT_SEED))
    with rng.network_draws(generator):
        model = networks.build_network(kwargs.pop("class_name"), dataset.resolution, dataset.num_channels,
                                       precond.out_channels(dataset.num_channels), label_dim=dataset.label_dim, **kwargs)
        net = precond(model, img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                      label_dim=dataset.label_dim, use_fp16=c["fp16"] or c["precision"] == "fp16", **c["precond_kwargs"])
    net.train().requires_grad_(True).to(device)
    if c["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    return net


def transfer_weights(source: str, *modules: torch.nn.Module) -> None:
    """Load the weights of a snapshot or checkpoint (ours, EDM's, PFGM++'s) into `modules` of the same architecture."""
    weights = checkpoint.read_checkpoint(source)[1]
    for module in modules:
        checkpoint.load_weights(module, weights, f"--transfer={source}")


def check_transfer(c: dict, dataset) -> None:
    """ValueError, before any run directory exists, unless --transfer's weights fit the network of `c`."""
    transfer_weights(c["transfer"], build_denoiser(c, dataset, torch.device("cpu")))


def distributed_model(net: torch.nn.Module, c: dict, device: torch.device) -> torch.nn.Module:
    """What the loss calls: `net` under DDP with several ranks, under torch.compile with --compile=1."""
    ddp = net
    if distributed.get_world_size() > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(ddp) if c["compile"] else ddp


def stale_outputs(run_dir: Path) -> list[Path]:
    """Temporary files a killed writer of this run left behind (`dnnlib.util.temporary_path` names).

    Only this run writes into its directory, so at its start every temporary of a run output is stale, also
    those written before temporaries carried their writer's process id.
    """
    names = ("training-state-", "network-snapshot-", "samples-", "stats.jsonl", "metric-", "training_options.json", "log.txt")
    return [p for p in Path(run_dir).glob(".tmp-*") if p.name[len(".tmp-"):].startswith(names)]


def rewind_stats(run_dir: Path, step: int) -> int:
    """Drop the lines after `step` from stats.jsonl and the metric-*.jsonl files (written before a crash, redone
    after resuming); return the number of ticks kept, where the tick count continues."""
    ticks = 0
    for path in [Path(run_dir) / "stats.jsonl", *sorted(Path(run_dir).glob("metric-*.jsonl"))]:
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                if json.loads(line)["step"] <= step:
                    kept.append(line)
        with atomic_write(path, "w") as f:
            f.write("".join(f"{line}\n" for line in kept))
        ticks = len(kept) if path.name == "stats.jsonl" else ticks
    return ticks
