"""train.py's options -> the training configuration, as pure functions (no I/O, testable).

`training_config` checks the options and builds the configuration; `complete` adds what depends on the
data once it is open. What an objective reads and how its options map to its preconditioner and loss, the
preconditioner declares (training/preconditioners/base.py); nothing here names a preconditioner.
"""

from __future__ import annotations

import inspect
import json
import math

from dnnlib.util import EasyDict
from torch_utils.precision import effective as effective_precision
from training import divergence, networks, pfgmpp, preconditioners
from training.augment import AugmentPipe
from training.preconditioners import fp_regularizer

# Options of one objective or another (`Precond.training_options`); the others are every run's.
OBJECTIVE_OPTIONS = ("stf", "fp_reg", "P_mean", "P_std", "sigma_scale", "pfgm_M", "tau", "gamma", "sigma_end", "z_max",
                     "z_min", "upper_norm", "z_exp", "restrict_M")


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
    if precond not in preconditioners.trainable():
        raise ValueError(f"--precond must be one of {', '.join(preconditioners.trainable())}, got {precond!r}")
    batch_gpu = batch_gpu or batch // max(world_size, 1)
    if batch % (world_size * batch_gpu):
        raise ValueError(f"--batch={batch} is not divisible by {world_size} ranks x --batch-gpu={batch_gpu}")
    if stf and cond:
        raise ValueError("--stf averages over an unlabelled reference batch: it cannot be combined with --cond=1")
    if precision not in ("fp32", "tf32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, tf32, bf16 or fp16, got {precision!r}")
    objective = dict(stf=stf, fp_reg=fp_reg, P_mean=P_mean, P_std=P_std, sigma_scale=sigma_scale, pfgm_M=pfgm_M, tau=tau,
                     gamma=gamma, sigma_end=sigma_end, z_max=z_max, z_min=z_min, upper_norm=upper_norm, z_exp=z_exp,
                     restrict_M=restrict_M)
    _check_objective_options(precond, objective)
    cls = preconditioners.get(precond)
    if fp_reg:
        objective["fp_reg"] = fp_kwargs(fp_alpha, fp_beta, fp_order, fp_weighting, fp_probe, fp_probes, fp_step)
    D, precond_kwargs, loss_kwargs = cls.training_kwargs(D=D, cond=bool(cond), pfgmpp_on=bool(pfgmpp_on), options=objective)
    precond_kwargs["use_fp16"] = bool(fp16) or precision == "fp16"
    augment_kwargs = dict(p=augment) if augment > 0 else None
    augment_dim = AugmentPipe(**augment_kwargs).label_dim if augment_kwargs else 0
    net = networks.network_kwargs(arch, cbase=cbase, cres=cres, nblock=nblock, attn=attn, dropout=dropout,
                                  augment_dim=augment_dim)
    return EasyDict(
        dataset_kwargs=dict(path=data, use_labels=bool(cond), xflip=bool(xflip), cache=bool(cache)),
        network_class=net.pop("class_name"),
        network_kwargs=net,
        precond=precond,
        precond_kwargs=precond_kwargs,
        loss_kwargs=loss_kwargs,
        augment_kwargs=augment_kwargs,
        D=D, lr=lr, betas=[0.9, 0.999], eps=1e-8, lr_rampup_kimg=lr_rampup * 1000,
        batch_size=batch, batch_gpu=batch_gpu, total_kimg=duration * 1000,
        ema_halflife_kimg=ema * 1000, ema_rampup_ratio=0.05, loss_scaling=ls,
        kimg_per_tick=tick, snapshot_ticks=snap, state_dump_ticks=dump, seed=seed,
        stf=stf, rbatch=rbatch, precision=precision, compile=compile, channels_last=channels_last,
        workers=workers, grid_count=grid, grid_steps=grid_steps, stop_check_steps=16,
    )


def _check_objective_options(kind: str, objective: dict) -> None:
    """ValueError naming the flags of objective options that were changed from their default but that the
    chosen preconditioner does not read, and the preconditioners that do."""
    defaults = {k: p.default for k, p in inspect.signature(training_config).parameters.items()}
    cls = preconditioners.get(kind)
    foreign = [k for k, v in objective.items() if v != defaults[k] and k not in cls.training_options]
    if foreign:
        readers = [kind for kind, c in preconditioners.PRECONDITIONERS.items() if set(foreign) <= set(c.training_options)]
        where = f"--precond={', '.join(readers[:-1])} or {readers[-1]}" if len(readers) > 1 else \
            f"--precond={readers[0]}" if readers else "different preconditioners"
        flags = ", ".join(f"--{k}" for k in foreign)
        raise ValueError(f"{flags} {'applies' if len(foreign) == 1 else 'apply'} only to {where}, not to --precond={kind}")


def fp_kwargs(alpha: float, beta: float, order: float, weighting: str, probe: str, probes: int, step: float) -> dict:
    """The FP-Diffusion regulariser's options (training/preconditioners/fp_regularizer.py), checked; ValueError naming the flag."""
    if not (alpha >= 0 and beta >= 0 and alpha + beta > 0):
        raise ValueError(f"--fp_alpha and --fp_beta must be >= 0 and not both 0 (or use --fp_reg=0), got {alpha}, {beta}")
    if not (order > 0 and step > 0 and probes >= 1):
        raise ValueError(f"--fp_order and --fp_step must be > 0 and --fp_probes >= 1, got {order}, {step}, {probes}")
    if weighting not in fp_regularizer.WEIGHTINGS or probe not in divergence.PROBE_KINDS:
        raise ValueError(f"--fp_weighting must be one of {', '.join(fp_regularizer.WEIGHTINGS)} and --fp_probe one of "
                         f"{', '.join(divergence.PROBE_KINDS)}, got {weighting!r}, {probe!r}")
    return dict(alpha=float(alpha), beta=float(beta), m=float(order), weighting=weighting, probe=probe,
                num_probes=int(probes), fd_step=float(step))


def complete(c: EasyDict, dataset, world_size: int = 1) -> EasyDict:
    """What depends on the data, filled in and checked once `dataset` is open (before any run directory exists).

    The preconditioner completes its own options (PFGM's M, z_max, upper_norm from the data); the network's
    options are checked against the data's shape; the loss is built once to check its options, and its
    reference batch must split over the ranks.
    """
    precond = preconditioners.get(c.precond)
    precond.complete_config(c, dataset)
    networks.check_network(c.network_class, dataset.resolution, dataset.num_channels,  # e.g. attention resolutions
                           precond.out_channels(dataset.num_channels), label_dim=dataset.label_dim, **c.network_kwargs)
    if c.loss_kwargs.get("fp"):  # the score FPE needs D = inf or D >> N
        fp_regularizer.check_D(c.D, dataset.num_channels * dataset.resolution**2)
    if build_loss(c).needs_reference and c.rbatch % world_size:
        raise ValueError(f"--rbatch={c.rbatch} must be divisible by the {world_size} ranks (each loads its share)")
    return c


def build_loss(c: EasyDict):
    """The loss of a configuration (its preconditioner's loss class with the run's loss options)."""
    return preconditioners.get(c.precond).loss_class(**c.loss_kwargs)


# What a resumed run may change: how long, how often it reports and saves, how it reads the data and how it
# computes (docs/errors.md). Everything else of the configuration defines the model, the objective, the data
# order or the optimisation, and must equal the training state's.
RESUMABLE = ("total_kimg", "kimg_per_tick", "snapshot_ticks", "state_dump_ticks", "workers", "dataset_kwargs.path",
             "dataset_kwargs.cache", "batch_gpu", "precision", "precond_kwargs.use_fp16", "compile", "channels_last",
             "grid_count", "grid_steps", "stop_check_steps", "transfer", "cudnn_benchmark", "dist_timeout",
             "pfgm_data_norm")
# The train.py option behind a configuration key, for messages.
FLAGS = {"D": "--pfgmpp/--aug_dim", "precond": "--precond", "network_class": "--arch", "batch_size": "--batch",
         "network_kwargs.model_channels": "--cbase", "network_kwargs.channel_mult": "--cres",
         "network_kwargs.num_blocks": "--nblock", "network_kwargs.attn_resolutions": "--attn",
         "network_kwargs.dropout": "--dropout", "network_kwargs.augment_dim": "--augment", "augment_kwargs": "--augment",
         "augment_kwargs.p": "--augment", "dataset_kwargs.use_labels": "--cond", "dataset_kwargs.xflip": "--xflip",
         "lr": "--lr", "lr_rampup_kimg": "--lr_rampup", "ema_halflife_kimg": "--ema", "loss_scaling": "--ls",
         "seed": "--seed", "stf": "--stf", "rbatch": "--rbatch", "loss_kwargs.P_mean": "--P_mean",
         "loss_kwargs.P_std": "--P_std", "loss_kwargs.sigma_scale": "--sigma_scale", "loss_kwargs.M": "--pfgm_M",
         "loss_kwargs.fp": "--fp_reg/--fp_*", "precond_kwargs.sigma_max": "--z_max", "precond_kwargs.sigma_min": "--z_min",
         "precond_kwargs.upper_norm": "--upper_norm"}


def _flatten(value, prefix: str = "") -> dict:
    """{'a.b': leaf} for nested dicts; other values (lists too) are leaves."""
    if not isinstance(value, dict) or not value:
        return {prefix: value}
    out = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value)


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """What differs, other than `RESUMABLE`, between a training state's saved configuration and this run's, as
    'flag: state value vs now' phrases (keys only one side has are skipped: another version wrote them)."""
    a = _flatten(json.loads(json.dumps(saved)))
    b = _flatten(json.loads(json.dumps(current)))  # the same JSON round trip as the state's copy (inf, tuples)
    found = []
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key] and not any(key == r or key.startswith(f"{r}.") for r in RESUMABLE):
            name = next((FLAGS[k] for k in (key, key.rpartition(".")[0], key.rpartition(".")[2]) if k in FLAGS), key)
            phrase = f"{name} {_text(a[key])} in the state, {_text(b[key])} now"
            if phrase not in found:  # D appears three times (run, preconditioner, loss)
                found.append(phrase)
    return found


def describe(c: EasyDict, dataset_name: str, world_size: int, device_type: str = "cuda") -> str:
    """The run directory's description, EDM-style: data-cond-arch-precond[-D]-gpus-batch-precision, with the
    precision the device actually computes in (a CPU run with the default tf32 is named fp32)."""
    arch = {"SongUNet": "song", "DhariwalUNet": "adm"}.get(c.network_class, c.network_class)
    D = "" if math.isinf(c.D) else f"-D{pfgmpp.format_D(c.D)}"
    return f"{dataset_name}-{'cond' if c.dataset_kwargs['use_labels'] else 'uncond'}-{arch}-{c.precond}{D}-gpus{world_size}-batch{c.batch_size}-{effective_precision(c.precision, device_type)}"
