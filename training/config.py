"""train.py's options -> the training configuration, as a pure function (no I/O, testable)."""

from __future__ import annotations

import math

from dnnlib.util import EasyDict
from training import networks, pfgmpp
from training.augment import AugmentPipe

# The objective of each --precond: the preconditioner and its loss (EDM Table 1).
PRECOND = {"edm": ("EDMPrecond", "EDMLoss"), "vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss")}


def training_config(
    *,
    data: str,
    cond: bool = False,
    arch: str = "ddpmpp",
    precond: str = "edm",
    pfgmpp_on: bool = False,
    aug_dim: float | None = None,
    duration: float = 200.0,
    batch: int = 512,
    batch_gpu: int | None = None,
    world_size: int = 1,
    cbase: int | None = None,
    cres: str | None = None,
    nblock: int | None = None,
    attn: str | None = None,
    lr: float = 10e-4,
    lr_rampup: float = 10.0,
    ema: float = 0.5,
    dropout: float = 0.13,
    augment: float = 0.12,
    xflip: bool = False,
    fp16: bool = False,
    ls: float = 1.0,
    cache: bool = False,
    workers: int = 1,
    tick: float = 50.0,
    snap: int = 50,
    dump: int = 500,
    seed: int = 0,
    stf: bool = False,
    rbatch: int = 4096,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    sigma_scale: float = 1.0,
    precision: str = "tf32",
    compile: bool = False,
    channels_last: bool = False,
    grid: int = 64,
    grid_steps: int = 18,
) -> EasyDict:
    """The configuration of a run; ValueError for inconsistent options, naming the flag."""
    if aug_dim is not None and not pfgmpp_on:
        raise ValueError("--aug_dim has no effect without --pfgmpp=1 (the reference silently trains a diffusion model); add --pfgmpp=1")
    D = pfgmpp.check_D(aug_dim) if pfgmpp_on and aug_dim is not None else math.inf
    if pfgmpp_on and aug_dim is None:
        raise ValueError("--pfgmpp=1 needs --aug_dim=D (e.g. 128 or 2048; 'inf' is the diffusion limit)")
    if precond not in PRECOND:
        raise ValueError(f"--precond must be one of {', '.join(PRECOND)}, got {precond!r}")
    batch_gpu = batch_gpu or batch // max(world_size, 1)
    if batch % (world_size * batch_gpu):
        raise ValueError(f"--batch={batch} is not divisible by {world_size} ranks x --batch-gpu={batch_gpu}")
    if stf and cond:
        raise ValueError("--stf averages over an unlabelled reference batch: it cannot be combined with --cond=1")
    if stf and precond != "edm":
        raise ValueError("--stf is defined for --precond=edm")
    if precision not in ("fp32", "tf32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, tf32, bf16 or fp16, got {precision!r}")
    augment_kwargs = dict(p=augment) if augment > 0 else None
    augment_dim = AugmentPipe(**augment_kwargs).label_dim if augment_kwargs else 0
    net = networks.network_kwargs(arch, cbase=cbase, cres=cres, nblock=nblock, attn=attn, dropout=dropout,
                                  augment_dim=augment_dim)
    precond_class, loss_class = PRECOND[precond]
    loss_kwargs = dict(D=D, stf=stf)
    if precond == "edm":
        loss_kwargs.update(P_mean=P_mean, P_std=P_std, sigma_scale=sigma_scale)
    return EasyDict(
        dataset_kwargs=dict(path=data, use_labels=bool(cond), xflip=bool(xflip), cache=bool(cache)),
        network_class=net.pop("class_name"),
        network_kwargs=net,
        precond_class=precond_class,
        precond_kwargs=dict(D=D, use_fp16=bool(fp16) or precision == "fp16"),
        loss_class=loss_class,
        loss_kwargs=loss_kwargs,
        augment_kwargs=augment_kwargs,
        D=D, lr=lr, betas=[0.9, 0.999], eps=1e-8, lr_rampup_kimg=lr_rampup * 1000,
        batch_size=batch, batch_gpu=batch_gpu, total_kimg=duration * 1000,
        ema_halflife_kimg=ema * 1000, ema_rampup_ratio=0.05, loss_scaling=ls,
        kimg_per_tick=tick, snapshot_ticks=snap, state_dump_ticks=dump, seed=seed,
        stf=stf, rbatch=rbatch, precision=precision, compile=compile, channels_last=channels_last,
        workers=workers, grid_count=grid, grid_steps=grid_steps, stop_check_steps=16,
    )


def describe(c: EasyDict, dataset_name: str, world_size: int) -> str:
    """The run directory's description, EDM-style: data-cond-arch-precond-gpus-batch-precision[-D]."""
    arch = {"SongUNet": "song", "DhariwalUNet": "adm"}.get(c.network_class, c.network_class)
    kind = c.precond_class.replace("Precond", "").lower()
    D = "" if math.isinf(c.D) else f"-D{c.D:g}"
    return f"{dataset_name}-{'cond' if c.dataset_kwargs['use_labels'] else 'uncond'}-{arch}-{kind}{D}-gpus{world_size}-batch{c.batch_size}-{c.precision}"
