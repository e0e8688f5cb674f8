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

from dnnlib.util import EasyDict, atomic_write
from torch_utils import distributed
from training import preconditioners
from training.cli import AugDim, Float, user_errors
from training.metrics import METRICS
from training.networks import ARCH_PRESETS

def _run_dir(outdir: Path, desc: str, nosubdir: bool, resume: str | None) -> Path:
    """outdir itself (--nosubdir), the newest run of this description (--resume=auto), or a new NNNNN-desc."""
    if nosubdir:
        return outdir
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


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--outdir", help="Where to make the run directory", metavar="DIR", type=click.Path(file_okay=False), required=True)
@click.option("--data", help="Training data: a ZIP or folder made by dataset_tool.py", metavar="ZIP|DIR", type=str, required=True)
@click.option("--cond", help="Train class-conditional", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--arch", help="Network: EDM's (recipe edm) or EDM2's sizes (recipe edm2: docs/edm2.md)", type=click.Choice(list(ARCH_PRESETS)), default="ddpmpp", show_default=True)
@click.option("--precond", help="Preconditioning and loss (pfgm: PFGM, D = 1) [default: edm; edm2-*: edm2]", type=click.Choice(preconditioners.trainable()))
@click.option("--pfgmpp", "pfgmpp_on", help="Train PFGM++ (needs --aug_dim)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--aug_dim", help="PFGM++ augmented dimension D > 0 ('inf' = diffusion)", type=AugDim(), default=None)
@click.option("--duration", help="Training duration", metavar="MIMG", type=Float(min=0, min_open=True), default=200, show_default=True)
@click.option("--batch", help="Total batch size", metavar="INT", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--batch-gpu", "--batch_gpu", "batch_gpu", help="Limit batch size per GPU (accumulate)", metavar="INT", type=click.IntRange(min=1))
@click.option("--cbase", help="Channel multiplier [default: preset]", metavar="INT", type=click.IntRange(min=1))
@click.option("--cres", help="Channels per resolution [default: preset]", metavar="LIST", type=str)
@click.option("--nblock", help="Blocks per resolution [default: preset]", metavar="INT", type=click.IntRange(min=1))
@click.option("--attn", help="Attention resolutions [default: preset]", metavar="LIST", type=str)
@click.option("--lr", help="Learning rate (edm2: before the decay) [default: 10e-4; edm2-*: EDM2's per size]", metavar="FLOAT", type=Float(min=0, min_open=True))
@click.option("--lr_rampup", help="Learning-rate ramp-up [default: 10]", metavar="MIMG", type=Float(min=0))
@click.option("--lr_decay", help="EDM2's decay lr/sqrt(t/t_ref) after t_ref steps; 0: none [default: 0; edm2-*: 35000]", metavar="BATCHES", type=Float(min=0))
@click.option("--ema", help="EMA half-life; 0: none [default: 0.5; edm2-*: 0]", metavar="MIMG", type=Float(min=0))
@click.option("--ema_std", help="Power-function EMAs to track, by sigma_rel (docs/phema.md); none: off [default: none; edm2-*: 0.050,0.100]", metavar="LIST", type=str)
@click.option("--dropout", help="Dropout probability [default: 0.13; edm2-*: the preset's]", metavar="FLOAT", type=Float(min=0, max=1, max_open=True))
@click.option("--label_dropout", help="Drop class labels with this probability (classifier-free guidance)", metavar="FLOAT", type=Float(min=0, max=1, max_open=True), default=0, show_default=True)
@click.option("--augment", help="Augment probability [default: 0.12; edm2-*: 0]", metavar="FLOAT", type=Float(min=0, max=1))
@click.option("--xflip", help="Enable dataset x-flips", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--P_mean", "P_mean", help="Mean of ln sigma in training [default: -1.2; edm2-*: -0.8]", type=Float())
@click.option("--P_std", "P_std", help="Std of ln sigma in training [default: 1.2; edm2-*: 1.6]", type=Float(min=0, min_open=True))
@click.option("--sigma_scale", help="Scale training sigma (LSUN 256^2 in PFGM++: 380/80 = 4.75)", type=Float(min=0, min_open=True), default=1.0, show_default=True)
@click.option("--stf", help="Stable target field", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--rbatch", help="Reference batch of --stf and --precond=pfgm", metavar="INT", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--pfgm_M", "pfgm_M", help="PFGM: perturbation range m in (0, M) [default: derived from the data]", type=Float(min=0, min_open=True))
@click.option("--tau", help="PFGM: growth of the perturbation per unit of m  [default: 0.03]", type=Float(min=0, min_open=True))
@click.option("--gamma", help="PFGM: field normalisation E/(|E|+gamma)  [default: 5]", type=Float(min=0))
@click.option("--sigma_end", help="PFGM: smallest perturbation scale  [default: 0.01]", type=Float(min=0, min_open=True))
@click.option("--z_max", help="PFGM: starting z of sampling [default: derived from the data]", type=Float(min=0, min_open=True))
@click.option("--z_min", help="PFGM: final z of sampling  [default: 0.001]", type=Float(min=0, min_open=True))
@click.option("--upper_norm", help="PFGM: the prior's norm is clipped here [default: derived from the data]", type=Float(min=0, min_open=True))
@click.option("--z_exp", help="PFGM: below this z, v_z is derived from |v_x|  [default: 5]", type=Float(min=0))
@click.option("--restrict_M", "restrict_M", help="PFGM: m < 0.7 M for small z draws  [default: 1]", metavar="BOOL", type=bool)
@click.option("--fp_reg", help="FP-Diffusion score Fokker-Planck regulariser (docs/likelihood.md)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--fp_alpha", help="FP: weight of the vector (score FPE) residual", metavar="FLOAT", type=Float(min=0), default=0.15, show_default=True)
@click.option("--fp_beta", help="FP: weight of the scalar (log-density FPE) residual", metavar="FLOAT", type=Float(min=0), default=0.01, show_default=True)
@click.option("--fp_order", help="FP: order m of the residual norms", metavar="FLOAT", type=Float(min=0, min_open=True), default=2, show_default=True)
@click.option("--fp_weighting", help="FP: time weighting g^2 (ll), g (convention) or 1", type=click.Choice(["ll", "convention", "constant"]), default="ll", show_default=True)
@click.option("--fp_probe", help="FP: Hutchinson probes of the divergence", type=click.Choice(["rademacher", "gaussian"]), default="rademacher", show_default=True)
@click.option("--fp_probes", help="FP: probes per sample", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--fp_step", help="FP: finite-difference step in ln(sigma)", metavar="FLOAT", type=Float(min=0, min_open=True), default=1e-2, show_default=True)
@click.option("--precision", help="Arithmetic", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="tf32", show_default=True)
@click.option("--fp16", help="EDM's fp16 network mode (same as --precision=fp16)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--ls", help="Loss scaling", metavar="FLOAT", type=Float(min=0, min_open=True), default=1, show_default=True)
@click.option("--compile", help="torch.compile the network", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--channels_last", help="channels_last memory format", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--bench", help="cuDNN benchmarking (on CUDA)", metavar="BOOL", type=bool, default=True, show_default=True)
@click.option("--cache", help="Cache decoded images in RAM", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--workers", help="DataLoader worker processes", metavar="INT", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--desc", help="String to add to the run directory name", metavar="STR", type=str)
@click.option("--nosubdir", help="Use --outdir itself as the run directory", is_flag=True)
@click.option("--tick", help="How often to print progress", metavar="KIMG", type=Float(min=0, min_open=True), default=50, show_default=True)
@click.option("--snap", help="How often to save snapshots", metavar="TICKS", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--dump", help="How often to dump training state", metavar="TICKS", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--grid", help="Samples in the grid at each snapshot (0: none)", metavar="INT", type=click.IntRange(min=0), default=64, show_default=True)
@click.option("--metrics", help="Evaluate each snapshot's networks: " + ", ".join(METRICS) + " (comma-separated) [default: none]", metavar="LIST", type=str)
@click.option("--metrics_ref", help="Reference statistics of --metrics (npz path or URL), or a dataset folder/ZIP", metavar="NPZ|URL|DIR")
@click.option("--metrics_num", help="Images per evaluation of --metrics (seeds 0 to N-1)", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--detector", help="Detector of --metrics [default: $PFGMPP_DETECTOR, else the Inception-v3 URL]", metavar="PATH|URL")
@click.option("--seed", help="Random seed", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--transfer", help="Initialise from a network snapshot", metavar="PKL|PT|URL", type=str)
@click.option("--resume", help="Resume: 'auto' (newest state of this run) or a training-state file", metavar="auto|PT", type=str)
@click.option("--dist_timeout", help="Seconds a collective waits for the other ranks before failing", metavar="SEC", type=Float(min=1), default=600, show_default=True)
@click.option("-n", "--dry-run", "--dry_run", "dry_run", help="Print the configuration and exit", is_flag=True)
def main(outdir, data, desc, nosubdir, dry_run, transfer, resume, bench, **opts):
    """Train PFGM++ / diffusion models (single process, or torchrun for several GPUs and nodes)."""
    from training import config as config_lib
    from training.datasets import ImageFolderDataset

    if transfer and resume:
        raise click.UsageError("--transfer and --resume cannot be combined: --resume continues a run, --transfer starts one")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist_timeout = opts.pop("dist_timeout")
    with user_errors():
        c = config_lib.training_config(data=data, world_size=world, **opts)
        dataset = ImageFolderDataset(**c.dataset_kwargs)
        c = config_lib.complete(c, dataset, world)
    if resume not in (None, "auto") and not Path(resume).is_file():
        raise click.ClickException(f"--resume={resume}: no such training state")
    c.update(transfer=transfer, cudnn_benchmark=bench, dist_timeout=dist_timeout)
    name = desc or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(data).stem)
    run_desc = config_lib.describe(c, name, world, "cuda" if torch.cuda.is_available() else "cpu")
    if dry_run:
        with user_errors():
            dataset.check_images()
        click.echo(json.dumps(c, indent=2))
        click.echo(f"run directory: {_run_dir(Path(outdir), run_desc, nosubdir, resume)} ({len(dataset)} images, "
                   f"{dataset.resolution}x{dataset.resolution}x{dataset.num_channels})")
        return
    _train(c, dataset, Path(outdir), run_desc, nosubdir, resume)


def _preflight(c: EasyDict, dataset, run_dir: Path, resume: str | None) -> Path | None:
    """Rank 0's checks before anything is written; returns the training state to resume from, if any.

    Every image of the dataset must have its shape (headers only are read); --metrics' detector must load and its
    reference fit. A state must load and have been trained with this run's options (`config.resume_mismatches`); without
    --resume, a run directory that already holds a run is refused rather than overwritten; --transfer's
    weights must fit the network.
    """
    from training import config as config_lib
    from training import training_loop

    dataset.check_images(progress=True)  # a wrong image found mid-training would cost the run
    if c.metrics:  # a missing detector or reference found at the first snapshot would too
        from training import evaluation

        evaluation.check_setup(c.metrics, c.metrics_ref, c.detector, "--metrics_ref")
    state = Path(resume) if resume not in (None, "auto") else None
    if resume == "auto" and run_dir.is_dir():
        state = training_loop.find_resume_state(run_dir)
    if state is not None:
        mismatches = config_lib.resume_mismatches(json.loads(training_loop.read_state(state)["config"]), c)
        if mismatches:
            raise ValueError(f"--resume: {state.name} was trained with other options ({'; '.join(mismatches)}); resume "
                             f"with the options of its training_options.json, or start a new run from its weights with "
                             f"--transfer={state}")
    elif resume is None and run_dir.is_dir() and any(run_dir.glob("training-state-*.pt")):
        raise ValueError(f"{run_dir} already holds a run that this one would overwrite: continue it with --resume=auto, "
                         "or give another --outdir")
    if c.transfer:
        training_loop.check_transfer(c, dataset)
    return state


def _train(c: EasyDict, dataset, outdir: Path, run_desc: str, nosubdir: bool, resume: str | None) -> None:
    from training.config import build_loss
    from training.training_loop import training_loop

    with user_errors():
        distributed.init(timeout_s=c.dist_timeout)
    run_dir = Path(distributed.broadcast_object(str(_run_dir(outdir, run_desc, nosubdir, resume)) if distributed.is_main() else None))
    with user_errors():
        state = distributed.main_only(lambda: _preflight(c, dataset, run_dir, resume))
    try:
        if distributed.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
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
    loss_fn = build_loss(c)
    pipe = None
    if c.augment_kwargs:
        from training.augment import AugmentPipe

        pipe = AugmentPipe(**c.augment_kwargs)
    try:
        training_loop(c, run_dir, dataset, loss_fn, pipe, resume=state)
    except (OSError, distributed.DistributedFailure) as error:
        raise click.ClickException(str(error)) from None
    log.info(f"done: snapshots and sample grids are in {run_dir}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
