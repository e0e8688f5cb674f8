"""Train PFGM++ (any D > 0, or D = inf for diffusion) and the EDM / VP / VE baselines.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \
        --data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp --pfgmpp=1 --batch=512 --aug_dim=2048
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import click
import torch

from dnnlib.util import DirectoryLock, EasyDict, atomic_write
from torch_utils import distributed
from training import checkpoint
from training.cli import error_message, user_errors
from training.cli.options import click_options
from training.train import config
from training.train.options import OPTIONS


def _run_dir(outdir: Path, desc: str, nosubdir: bool, resume: str | None, name: str | None = None) -> Path:
    """outdir itself (--nosubdir), outdir/NAME (--name), the newest run of this description (--resume=auto), or a new
    NNNNN-desc."""
    if nosubdir:
        return outdir
    if name is not None:
        return outdir / name
    runs = sorted((int(m.group(1)), p) for p in outdir.glob("*") if (m := re.match(r"^(\d+)-", p.name)) and p.is_dir())
    if resume == "auto":
        restarted = distributed.restart_count() > 0  # torchrun restarted us: our run, with or without a state
        for _, path in reversed(runs):
            if path.name.endswith(f"-{desc}") and (restarted or any(path.glob("training-state-*.pt"))):
                return path
    return outdir / f"{(runs[-1][0] + 1) if runs else 0:05d}-{desc}"


def _setup_logging(run_dir: Path | None) -> logging.Logger:
    log = logging.getLogger("pfgmpp.train")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if distributed.is_main():
        log.addHandler(logging.StreamHandler(sys.stdout))
        if run_dir is not None:
            log.addHandler(logging.FileHandler(run_dir / "log.txt"))
    return log


def _main(outdir, desc, nosubdir, dry_run, resume, name, **opts):
    """Train PFGM++ / diffusion models (single process, or torchrun for several GPUs and nodes)."""
    from training.datasets import ImageFolderDataset

    if opts.get("transfer") and resume:
        raise click.UsageError("--transfer and --resume cannot be combined: --resume continues a run, --transfer starts one")
    if name is not None and (nosubdir or desc):
        raise click.UsageError("--name names the run directory (--outdir/NAME): it cannot be combined with --nosubdir or --desc")
    if name is not None and (not name.strip() or name in (".", "..") or "/" in name or "\\" in name):
        raise click.UsageError(f"--name={name!r} must be a plain directory name (no '/'); --outdir says where it goes")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with user_errors():
        c = config.training_config(world_size=world, **opts)
        dataset = ImageFolderDataset(**config.dataset_kwargs(c))
        c = config.complete(c, dataset, world)
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise click.ClickException(f"--resume={resume}: no such training state")
    dataset_name = desc or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(c.data).stem)
    run_desc = config.run_description(c, dataset_name, world, "cuda" if torch.cuda.is_available() else "cpu")
    if dry_run:
        with user_errors():
            dataset.check_images()
        click.echo(json.dumps(c, indent=2))
        click.echo(f"run directory: {_run_dir(Path(outdir), run_desc, nosubdir, resume, name)} ({len(dataset)} images, "
                   f"{dataset.resolution}x{dataset.resolution}x{dataset.num_channels})")
        return
    _train(c, dataset, Path(outdir), run_desc, nosubdir, resume, name)


def command() -> click.Command:
    """train.py's command, one click option per entry of `OPTIONS` (an entry added before this call counts)."""

    def main(**opts):
        return _main(**opts)

    main.__doc__ = _main.__doc__
    return click.command(context_settings=dict(help_option_names=["-h", "--help"]))(click_options(OPTIONS.values())(main))


main = command()


RUN_OUTPUTS = ("training-state-*.pt", "network-snapshot-*", "training_options.json", "stats.jsonl", "log.txt",
               "samples-*.png", "metric-*.jsonl")  # what a run writes into its directory


def run_outputs(run_dir: Path) -> list[str]:
    """The names of a run's outputs already in `run_dir` (empty when it is new or holds other files only)."""
    if not run_dir.is_dir():
        return []
    return sorted({p.name for pattern in RUN_OUTPUTS for p in run_dir.glob(pattern)})


def _preflight(c: EasyDict, dataset, run_dir: Path, resume: str | None) -> Path | None:
    """Rank 0's checks before anything is written; returns the training state to resume from, if any.

    Every image of the dataset must have its shape (headers only are read); --metrics' detector must load and its
    reference fit. A state must load and have been trained with this run's options (`config.resume_mismatches`); without
    --resume, a run directory that already holds a run is refused rather than overwritten; --transfer's
    weights must fit the network.
    """
    from training.train import setup

    dataset.check_images(progress=True)  # a wrong image found mid-training would cost the run
    if c.wandb:  # a missing package found at the first tick would too
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError("--wandb needs the wandb package: pip install wandb (or pip install 'pfgmpp[wandb]')")
    if c.metrics:  # a missing detector or reference found at the first snapshot would too
        from training import evaluation

        evaluation.check_setup(c.metrics, c.metrics_ref, c.detector, "--metrics_ref")
    state = Path(resume) if resume not in (None, "auto") else None
    if resume == "auto" and run_dir.is_dir():
        state = checkpoint.find_resume_state(run_dir)
    if state is not None:
        mismatches = config.resume_mismatches(json.loads(checkpoint.read_state(state)["config"]), c)
        if mismatches:
            raise ValueError(f"--resume: {state.name} was trained with other options ({'; '.join(mismatches)}); resume "
                             f"with the options of its training_options.json, or start a new run from its weights with "
                             f"--transfer={state}")
    outputs = run_outputs(run_dir)
    if state is None and resume is None and outputs:
        raise ValueError(f"{run_dir} already holds a run ({', '.join(outputs[:3])}{', ...' if len(outputs) > 3 else ''}) "
                         "that this one would overwrite: continue it with --resume=auto, or give another --outdir")
    if state is None and resume == "auto" and outputs and distributed.restart_count() == 0:
        raise ValueError(f"--resume=auto: {run_dir} holds an earlier run's outputs ({', '.join(outputs[:3])}"
                         f"{', ...' if len(outputs) > 3 else ''}) but no training state to continue it from; this run "
                         "would overwrite them: give another --outdir")
    if c.transfer:
        setup.check_transfer(c, dataset)
    return state


def _train(c: EasyDict, dataset, outdir: Path, run_desc: str, nosubdir: bool, resume: str | None,
           name: str | None = None) -> None:
    from training.datasets.format import DatasetError
    from training.samplers import PlanError
    from training.train import training_loop
    from training.train.stats import Diverged

    with user_errors():
        distributed.init(timeout_s=c.dist_timeout)
    run_dir = Path(distributed.broadcast_object(str(_run_dir(outdir, run_desc, nosubdir, resume, name))
                                                if distributed.is_main() else None))
    with user_errors():
        state = distributed.main_only(lambda: _preflight(c, dataset, run_dir, resume))
    lock = DirectoryLock(run_dir)
    try:
        if distributed.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            with user_errors():
                lock.acquire()  # one run per directory, until this process ends
            with atomic_write(run_dir / "training_options.json", "w") as f:
                json.dump(c, f, indent=2)
    except OSError as error:
        raise click.ClickException(f"cannot write to the run directory {run_dir}: {error}") from None
    distributed.barrier()
    log = _setup_logging(run_dir)
    if resume == "auto" and state is None:
        log.info(f"--resume=auto: no training state in {run_dir}; starting afresh")
    if resume is None and distributed.restart_count() > 0:
        log.warning(f"torchrun restarted the workers (restart {distributed.restart_count()}) but --resume is not set: "
                    "this run starts from scratch; launch with --resume=auto to continue instead")
    log.info(f"run directory: {run_dir}")
    try:
        training_loop(c, run_dir, dataset, config.build_loss(c), config.augment_pipe(c), resume=state)
    except (OSError, distributed.DistributedFailure, Diverged, DatasetError, PlanError) as error:
        message = error_message(error)
        if distributed.is_main():  # where a batch job's user looks, beside the run's other lines
            with open(run_dir / "log.txt", "a") as f:
                f.write(f"Error: {message}\n")
        raise click.ClickException(message) from None
    log.info(f"done: snapshots and sample grids are in {run_dir}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
