"""Train PFGM++ (any D > 0, or D = inf for diffusion) and the EDM / VP / VE baselines.

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \
        --data=datasets/cifar10-32x32.zip --cond=0 --arch=ncsnpp --pfgmpp=1 --batch=512 --aug_dim=2048
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import click

from dnnlib.util import EasyDict, atomic_write
from torch_utils import distributed


class _AugDim(click.ParamType):
    name = "D"

    def convert(self, value, param, ctx):
        try:
            D = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; give D > 0 such as 128, or 'inf'", param, ctx)
        if math.isnan(D) or D <= 0:
            self.fail(f"D must be > 0 (or 'inf'), got {value}", param, ctx)
        return D


def _run_dir(outdir: Path, desc: str, nosubdir: bool, resume: str | None) -> Path:
    """outdir itself (--nosubdir), the newest run of this description (--resume=auto), or a new NNNNN-desc."""
    if nosubdir:
        return outdir
    runs = sorted((int(m.group(1)), p) for p in outdir.glob("*") if (m := re.match(r"^(\d+)-", p.name)) and p.is_dir())
    if resume == "auto":
        for _, path in reversed(runs):
            if path.name.endswith(f"-{desc}") and any(path.glob("training-state-*.pt")):
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


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--outdir", help="Where to make the run directory", metavar="DIR", type=click.Path(file_okay=False), required=True)
@click.option("--data", help="Training data: a ZIP or folder made by dataset_tool.py", metavar="ZIP|DIR", type=str, required=True)
@click.option("--cond", help="Train class-conditional", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--arch", help="Network architecture", type=click.Choice(["ddpmpp", "ncsnpp", "adm"]), default="ddpmpp", show_default=True)
@click.option("--precond", help="Preconditioning and loss", type=click.Choice(["vp", "ve", "edm"]), default="edm", show_default=True)
@click.option("--pfgmpp", "pfgmpp_on", help="Train PFGM++ (needs --aug_dim)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--aug_dim", help="PFGM++ augmented dimension D > 0 ('inf' = diffusion)", type=_AugDim(), default=None)
@click.option("--duration", help="Training duration", metavar="MIMG", type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option("--batch", help="Total batch size", metavar="INT", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--batch-gpu", "--batch_gpu", "batch_gpu", help="Limit batch size per GPU (accumulate)", metavar="INT", type=click.IntRange(min=1))
@click.option("--cbase", help="Channel multiplier [default: preset]", metavar="INT", type=click.IntRange(min=1))
@click.option("--cres", help="Channels per resolution [default: preset]", metavar="LIST", type=str)
@click.option("--nblock", help="Blocks per resolution [default: preset]", metavar="INT", type=click.IntRange(min=1))
@click.option("--attn", help="Attention resolutions [default: preset]", metavar="LIST", type=str)
@click.option("--lr", help="Learning rate", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option("--lr_rampup", help="Learning-rate ramp-up", metavar="MIMG", type=click.FloatRange(min=0), default=10, show_default=True)
@click.option("--ema", help="EMA half-life", metavar="MIMG", type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option("--dropout", help="Dropout probability", metavar="FLOAT", type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option("--augment", help="Augment probability", metavar="FLOAT", type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option("--xflip", help="Enable dataset x-flips", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--P_mean", "P_mean", help="Mean of ln sigma in training (EDM)", type=float, default=-1.2, show_default=True)
@click.option("--P_std", "P_std", help="Std of ln sigma in training (EDM)", type=click.FloatRange(min=0, min_open=True), default=1.2, show_default=True)
@click.option("--sigma_scale", help="Scale training sigma (LSUN 256^2 in PFGM++: 380/80 = 4.75)", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--stf", help="Stable target field", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--rbatch", help="STF reference batch", metavar="INT", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--precision", help="Arithmetic", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="tf32", show_default=True)
@click.option("--fp16", help="EDM's fp16 network mode (same as --precision=fp16)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--ls", help="Loss scaling", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option("--compile", help="torch.compile the network", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--channels_last", help="channels_last memory format", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--bench", help="cuDNN benchmarking (on CUDA)", metavar="BOOL", type=bool, default=True, show_default=True)
@click.option("--cache", help="Cache decoded images in RAM", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--workers", help="DataLoader worker processes", metavar="INT", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--desc", help="String to add to the run directory name", metavar="STR", type=str)
@click.option("--nosubdir", help="Use --outdir itself as the run directory", is_flag=True)
@click.option("--tick", help="How often to print progress", metavar="KIMG", type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option("--snap", help="How often to save snapshots", metavar="TICKS", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--dump", help="How often to dump training state", metavar="TICKS", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--grid", help="Samples in the grid at each snapshot (0: none)", metavar="INT", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--seed", help="Random seed", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--transfer", help="Initialise from a network snapshot", metavar="PKL|PT|URL", type=str)
@click.option("--resume", help="Resume: 'auto' (newest state of this run) or a training-state file", metavar="auto|PT", type=str)
@click.option("-n", "--dry-run", "--dry_run", "dry_run", help="Print the configuration and exit", is_flag=True)
def main(outdir, data, desc, nosubdir, dry_run, transfer, resume, bench, **opts):
    """Train PFGM++ / diffusion models (single process, or torchrun for several GPUs and nodes)."""
    from training import config as config_lib
    from training.dataset import ImageFolderDataset

    if transfer and resume:
        raise click.UsageError("--transfer and --resume cannot be combined: --resume continues a run, --transfer starts one")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        c = config_lib.training_config(data=data, world_size=world, **opts)
        dataset = ImageFolderDataset(**c.dataset_kwargs)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise click.ClickException(f"--resume={resume}: no such training state")
    c.update(transfer=transfer, cudnn_benchmark=bench)
    name = desc or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(data).stem)
    run_desc = config_lib.describe(c, name, world)
    if dry_run:
        click.echo(json.dumps(c, indent=2))
        click.echo(f"run directory: {_run_dir(Path(outdir), run_desc, nosubdir, resume)} ({len(dataset)} images, "
                   f"{dataset.resolution}x{dataset.resolution}x{dataset.num_channels})")
        return
    _train(c, dataset, Path(outdir), run_desc, nosubdir, resume)


def _train(c: EasyDict, dataset, outdir: Path, run_desc: str, nosubdir: bool, resume: str | None) -> None:
    from training import loss
    from training.training_loop import find_resume_state, training_loop

    distributed.init()
    run_dir = Path(distributed.broadcast_object(str(_run_dir(outdir, run_desc, nosubdir, resume)) if distributed.is_main() else None))
    try:
        if distributed.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(run_dir / "training_options.json", "w") as f:
                json.dump(c, f, indent=2)
    except OSError as error:
        raise click.ClickException(f"cannot write to the run directory {run_dir}: {error}") from None
    distributed.barrier()
    log = _setup_logging(run_dir)
    state = find_resume_state(run_dir) if resume == "auto" else (Path(resume) if resume else None)
    if resume == "auto" and state is None:
        log.info(f"--resume=auto: no training state in {run_dir}; starting afresh")
    log.info(f"run directory: {run_dir}")
    loss_fn = getattr(loss, c.loss_class)(**c.loss_kwargs)
    pipe = None
    if c.augment_kwargs:
        from training.augment import AugmentPipe

        pipe = AugmentPipe(**c.augment_kwargs)
    try:
        training_loop(c, run_dir, dataset, loss_fn, pipe, resume=state)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    log.info(f"done: snapshots and sample grids are in {run_dir}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
