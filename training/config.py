"""train.py's options -> the training configuration, as a pure function (no I/O, testable)."""

from __future__ import annotations

import math

from dnnlib.util import EasyDict
from training import networks, pfgmpp
from training.augment import AugmentPipe

# The objective of each --precond: the preconditioner and its loss (EDM Table 1).
PRECOND = {"edm": ("EDMPrecond", "EDMLoss"), "vp": ("VPPrecond", "VPLoss"), "ve": ("VEPrecond", "VELoss"),
           "pfgm": ("PFGMPrecond", "PFGMLoss")}

# --precond=pfgm: the paper's settings (PFGM, Xu et al. 2022, CIFAR-10). M, z_max and upper_norm left unset
# are derived from the data by PFGM's helper (`complete_pfgm`).
PFGM_DEFAULTS = dict(tau=0.03, gamma=5.0, sigma_end=0.01, z_min=1e-3, z_exp=5.0, restrict_M=True)


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
    pfgm_M: float | None = None,
    tau: float | None = None,
    gamma: float | None = None,
    sigma_end: float | None = None,
    z_max: float | None = None,
    z_min: float | None = None,
    upper_norm: float | None = None,
    z_exp: float | None = None,
    restrict_M: bool | None = None,
    fp_reg: bool = False,
    fp_alpha: float = 0.15,
    fp_beta: float = 0.01,
    fp_order: float = 2.0,
    fp_weighting: str = "ll",
    fp_probe: str = "rademacher",
    fp_probes: int = 1,
    fp_step: float = 1e-2,
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
    pfgm = dict(M=pfgm_M, tau=tau, gamma=gamma, sigma_end=sigma_end, z_max=z_max, z_min=z_min, upper_norm=upper_norm,
                z_exp=z_exp, restrict_M=restrict_M)
    if precond == "pfgm":
        D = _check_pfgm(pfgm, pfgmpp_on, cond)
    elif any(v is not None for v in pfgm.values()):
        given = ", ".join(f"--{'pfgm_M' if k == 'M' else k}" for k, v in pfgm.items() if v is not None)
        raise ValueError(f"{given} only apply to --precond=pfgm")
    if (stf or precond == "pfgm") and rbatch % world_size:
        raise ValueError(f"--rbatch={rbatch} must be divisible by the {world_size} ranks (each loads its share)")
    augment_kwargs = dict(p=augment) if augment > 0 else None
    augment_dim = AugmentPipe(**augment_kwargs).label_dim if augment_kwargs else 0
    net = networks.network_kwargs(arch, cbase=cbase, cres=cres, nblock=nblock, attn=attn, dropout=dropout,
                                  augment_dim=augment_dim)
    precond_class, loss_class = PRECOND[precond]
    loss_kwargs = dict(D=D, stf=stf)
    precond_kwargs = dict(D=D, use_fp16=bool(fp16) or precision == "fp16")
    if precond == "edm":
        loss_kwargs.update(P_mean=P_mean, P_std=P_std, sigma_scale=sigma_scale)
    if fp_reg:
        loss_kwargs["fp"] = fp_kwargs(precond, fp_alpha, fp_beta, fp_order, fp_weighting, fp_probe, fp_probes, fp_step)
    if precond == "pfgm":
        pfgm = {k: PFGM_DEFAULTS[k] if v is None and k in PFGM_DEFAULTS else v for k, v in pfgm.items()}
        loss_kwargs = {k: pfgm[k] for k in ("M", "tau", "sigma_end", "gamma", "restrict_M")}
        precond_kwargs.update(sigma_min=pfgm["z_min"], sigma_max=pfgm["z_max"], upper_norm=pfgm["upper_norm"],
                              gamma=pfgm["gamma"], z_exp=pfgm["z_exp"])
    return EasyDict(
        dataset_kwargs=dict(path=data, use_labels=bool(cond), xflip=bool(xflip), cache=bool(cache)),
        network_class=net.pop("class_name"),
        network_kwargs=net,
        precond_class=precond_class,
        precond_kwargs=precond_kwargs,
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


def fp_kwargs(precond: str, alpha: float, beta: float, order: float, weighting: str, probe: str, probes: int,
              step: float) -> dict:
    """The FP-Diffusion regulariser's options (training/fp_regularizer.py), checked; ValueError naming the flag."""
    from training import fp_regularizer, likelihood

    if precond not in ("edm", "vp", "ve"):
        raise ValueError(f"--fp_reg=1 regularises a denoiser's score: use --precond=edm, vp or ve, not {precond}")
    if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
        raise ValueError(f"--fp_alpha and --fp_beta must be >= 0 and not both 0 (or use --fp_reg=0), got {alpha}, {beta}")
    if not (order > 0 and step > 0 and probes >= 1):
        raise ValueError(f"--fp_order and --fp_step must be > 0 and --fp_probes >= 1, got {order}, {step}, {probes}")
    if weighting not in fp_regularizer.WEIGHTINGS or probe not in likelihood.PROBE_KINDS:
        raise ValueError(f"--fp_weighting must be one of {', '.join(fp_regularizer.WEIGHTINGS)} and --fp_probe one of "
                         f"{', '.join(likelihood.PROBE_KINDS)}, got {weighting!r}, {probe!r}")
    return dict(alpha=float(alpha), beta=float(beta), m=float(order), weighting=weighting, probe=probe,
                num_probes=int(probes), fd_step=float(step))


def _check_pfgm(options: dict, pfgmpp_on: bool, cond: bool) -> float:
    """ValueError for PFGM options that cannot work; returns D = 1."""
    if pfgmpp_on:
        raise ValueError("--precond=pfgm is PFGM (D = 1) with its own objective: drop --pfgmpp/--aug_dim "
                         "(for the PFGM++ objective at D = 1 use --precond=edm --pfgmpp=1 --aug_dim=1)")
    if cond:
        raise ValueError("--precond=pfgm computes its field over an unlabelled reference batch: it cannot be combined with --cond=1")
    for name in ("M", "tau", "sigma_end", "z_max", "z_min", "upper_norm"):
        if options[name] is not None and not options[name] > 0:
            raise ValueError(f"--{'pfgm_M' if name == 'M' else name} must be > 0, got {options[name]}")
    for name in ("gamma", "z_exp"):
        if options[name] is not None and not options[name] >= 0:
            raise ValueError(f"--{name} must be >= 0, got {options[name]}")
    z_min = PFGM_DEFAULTS["z_min"] if options["z_min"] is None else options["z_min"]
    if options["z_max"] is not None and not z_min < options["z_max"]:
        raise ValueError(f"--z_min ({z_min}) must be smaller than --z_max ({options['z_max']})")
    return 1.0


def complete_pfgm(c: EasyDict, N: int, data_norm) -> EasyDict:
    """Fill the PFGM M, z_max and upper_norm left unset with the paper's helper for N values per sample.

    `data_norm` is a callable returning the average data norm, called only when something is missing.
    """
    from training import pfgm  # noqa: PLC0415 (the loss module, needed only for PFGM runs)

    missing = c.loss_kwargs["M"] is None or c.precond_kwargs["sigma_max"] is None or c.precond_kwargs["upper_norm"] is None
    if c.precond_class != "PFGMPrecond" or not missing:
        return c
    derived = pfgm.derive_hparams(float(data_norm()), N, c.loss_kwargs["sigma_end"], c.loss_kwargs["tau"])
    for kwargs, key, name in ((c.loss_kwargs, "M", "M"), (c.precond_kwargs, "sigma_max", "z_max"),
                              (c.precond_kwargs, "upper_norm", "upper_norm")):
        if kwargs[key] is None:
            kwargs[key] = derived[name]
    if not c.precond_kwargs["sigma_min"] < c.precond_kwargs["sigma_max"]:
        raise ValueError(f"--z_min ({c.precond_kwargs['sigma_min']}) must be smaller than z_max ({c.precond_kwargs['sigma_max']})")
    c.pfgm_data_norm = derived["data_norm"]
    return c


def describe(c: EasyDict, dataset_name: str, world_size: int) -> str:
    """The run directory's description, EDM-style: data-cond-arch-precond-gpus-batch-precision[-D]."""
    arch = {"SongUNet": "song", "DhariwalUNet": "adm"}.get(c.network_class, c.network_class)
    kind = c.precond_class.replace("Precond", "").lower()
    D = "" if math.isinf(c.D) else f"-D{c.D:g}"
    return f"{dataset_name}-{'cond' if c.dataset_kwargs['use_labels'] else 'uncond'}-{arch}-{kind}{D}-gpus{world_size}-batch{c.batch_size}-{c.precision}"
