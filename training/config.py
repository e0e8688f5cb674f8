"""train.py's options -> the training configuration, as pure functions (no I/O, testable).

`training_config` checks the options and builds the configuration; `complete` adds what depends on the
data once it is open. What an objective reads and how its options map to its preconditioner and loss, the
preconditioner declares (training/preconditioners/base.py); nothing here names a preconditioner.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence

from dnnlib.util import EasyDict
from torch_utils.precision import effective as effective_precision
from training import divergence, evaluation, networks, pfgmpp, phema, preconditioners
from training import metrics as metrics_lib
from training.augment import AugmentPipe
from training.preconditioners import fp_regularizer

# Options of one objective or another (`Precond.training_options`); the others are every run's.
OBJECTIVE_OPTIONS = ("stf", "fp_reg", "P_mean", "P_std", "sigma_scale", "pfgm_M", "tau", "gamma", "sigma_end", "z_max",
                     "z_min", "upper_norm", "z_exp", "restrict_M")

# The defaults of an option left unset (None), per recipe. EDM's (Karras et al. 2022, CIFAR-10 32x32) for
# the ddpmpp / ncsnpp / adm networks: constant learning rate after a ramp-up, Adam beta2 0.999, EMA with a
# half-life, augmentation. EDM2's (Karras et al. 2024, ImageNet-64 presets edm2-img64-*) for the edm2-*
# networks: learning rate lr / sqrt(max(t / lr_decay, 1)) for t training steps, Adam beta2 0.99, the
# learned loss weighting of --precond=edm2, no augmentation, power-function EMA (--ema_std) and no classic
# EMA; the 32x32 runs keep the 64x64 values. The preset's dropout comes with the network preset.
RECIPES = {
    "edm": dict(precond="edm", lr=10e-4, lr_rampup=10.0, lr_decay=0.0, beta2=0.999, ema=0.5, ema_std="", dropout=0.13,
                augment=0.12, P_mean=-1.2, P_std=1.2),
    "edm2": dict(precond="edm2", lr=None, lr_rampup=10.0, lr_decay=35000.0, beta2=0.99, ema=0.0, ema_std="0.050,0.100",
                 dropout=None, augment=0.0, P_mean=-0.8, P_std=1.6),
}
EDM2_LR = {"xs": 0.0120, "s": 0.0100, "m": 0.0090, "l": 0.0080, "xl": 0.0070, "xxl": 0.0065}  # EDM2's ref_lr per size


def recipe_of(arch: str) -> str:
    """The recipe whose defaults a network preset trains with: edm2 for EDM2's networks, edm otherwise."""
    return "edm2" if arch.startswith("edm2") or arch == "EDM2UNet" else "edm"


def recipe_defaults(arch: str) -> dict:
    """The values of train.py's recipe options left unset, for an arch (`RECIPES`); None: the preset's own."""
    name = recipe_of(arch)
    values = dict(RECIPES[name])
    if name == "edm2":
        values["lr"] = EDM2_LR.get(arch.removeprefix("edm2-"), EDM2_LR["s"])
    return values


def training_config(
    *,
    data: str,
    cond: bool = False,
    arch: str = "ddpmpp",
    precond: str | None = None,
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
    lr: float | None = None,
    lr_rampup: float | None = None,
    lr_decay: float | None = None,
    ema: float | None = None,
    ema_std: str | Sequence[float] | None = None,
    dropout: float | None = None,
    label_dropout: float = 0.0,
    augment: float | None = None,
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
    P_mean: float | None = None,
    P_std: float | None = None,
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
    metrics: str | Sequence[str] | None = None,
    metrics_ref: str | None = None,
    metrics_num: int = 50000,
    detector: str | None = None,
) -> EasyDict:
    """The configuration of a run; ValueError for inconsistent options, naming the flag.

    An option left None takes its recipe's default (`RECIPES`: EDM's, or EDM2's for the edm2-* networks).
    """
    given_objective = dict(P_mean=P_mean, P_std=P_std)  # as given: another objective's option is refused below
    recipe = recipe_defaults(arch)
    precond = precond if precond is not None else recipe["precond"]
    lr, lr_rampup, lr_decay, ema, augment, P_mean, P_std = (
        value if value is not None else recipe[name] for name, value in
        (("lr", lr), ("lr_rampup", lr_rampup), ("lr_decay", lr_decay), ("ema", ema), ("augment", augment),
         ("P_mean", P_mean), ("P_std", P_std)))
    dropout = dropout if dropout is not None else recipe["dropout"]  # None: the network preset's
    if precond == "edm2":  # EDM2's loss samples sigma as EDM2 does, whatever the network
        P_mean, P_std = (value if value is not None else RECIPES["edm2"][name] for name, value in
                         (("P_mean", given_objective["P_mean"]), ("P_std", given_objective["P_std"])))
    ema_std = phema_profiles(ema_std if ema_std is not None else recipe["ema_std"])
    metric_names = _metric_names(metrics)
    if metric_names:
        evaluation.check_reference(metric_names, metrics_ref, "--metrics_ref")
        if metrics_num < 2:
            raise ValueError(f"--metrics_num must be >= 2, got {metrics_num}")
    elif metrics_ref is not None:
        raise ValueError("--metrics_ref has no effect without --metrics (e.g. --metrics=fid)")
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
    if label_dropout and not cond:
        raise ValueError(f"--label_dropout={label_dropout} drops class labels, which an unconditional run has none of; "
                         "add --cond=1 or leave --label_dropout out")
    if stf and cond:
        raise ValueError("--stf averages over an unlabelled reference batch: it cannot be combined with --cond=1")
    if precision not in ("fp32", "tf32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, tf32, bf16 or fp16, got {precision!r}")
    objective = dict(stf=stf, fp_reg=fp_reg, P_mean=P_mean, P_std=P_std, sigma_scale=sigma_scale, pfgm_M=pfgm_M, tau=tau,
                     gamma=gamma, sigma_end=sigma_end, z_max=z_max, z_min=z_min, upper_norm=upper_norm, z_exp=z_exp,
                     restrict_M=restrict_M)
    _check_objective_options(precond, {**objective, **given_objective})
    cls = preconditioners.get(precond)
    if fp_reg:
        objective["fp_reg"] = fp_kwargs(fp_alpha, fp_beta, fp_order, fp_weighting, fp_probe, fp_probes, fp_step)
    D, precond_kwargs, loss_kwargs = cls.training_kwargs(D=D, cond=bool(cond), pfgmpp_on=bool(pfgmpp_on), options=objective)
    precond_kwargs["use_fp16"] = bool(fp16) or precision == "fp16"
    augment_kwargs = dict(p=augment) if augment > 0 else None
    augment_dim = AugmentPipe(**augment_kwargs).label_dim if augment_kwargs else 0
    extra = dict(label_dropout=float(label_dropout)) if label_dropout else {}
    net = networks.network_kwargs(arch, cbase=cbase, cres=cres, nblock=nblock, attn=attn, dropout=dropout,
                                  augment_dim=augment_dim, **extra)
    return EasyDict(
        dataset_kwargs=dict(path=data, use_labels=bool(cond), xflip=bool(xflip), cache=bool(cache)),
        network_class=net.pop("class_name"),
        network_kwargs=net,
        precond=precond,
        precond_kwargs=precond_kwargs,
        loss_kwargs=loss_kwargs,
        augment_kwargs=augment_kwargs,
        D=D, lr=lr, betas=[0.9, recipe["beta2"]], eps=1e-8, lr_rampup_kimg=lr_rampup * 1000, lr_ref_batches=lr_decay,
        batch_size=batch, batch_gpu=batch_gpu, total_kimg=duration * 1000,
        ema_halflife_kimg=ema * 1000, ema_rampup_ratio=0.05, ema_std=ema_std, loss_scaling=ls,
        kimg_per_tick=tick, snapshot_ticks=snap, state_dump_ticks=dump, seed=seed,
        stf=stf, rbatch=rbatch, precision=precision, compile=compile, channels_last=channels_last,
        workers=workers, grid_count=grid, grid_steps=grid_steps, stop_check_steps=16,
        metrics=metric_names, metrics_ref=metrics_ref, metrics_num=int(metrics_num), detector=detector,
    )


def phema_profiles(value: str | Sequence[float]) -> list[float]:
    """--ema_std '0.050,0.100' -> [0.05, 0.1] (checked by `training.phema.check_profiles`); '' or 'none' -> []."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none"):
            return []
        try:
            value = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--ema_std must be comma-separated numbers such as 0.050,0.100, got {text!r}") from None
    try:
        return phema.check_profiles(value) if value else []
    except ValueError as error:
        raise ValueError(f"--ema_std: {error}") from None


def _metric_names(value: str | Sequence[str] | None) -> list[str]:
    if value is None or value == "" or value == []:
        return []
    try:
        return metrics_lib.parse(value if isinstance(value, str) else ",".join(value))
    except ValueError as error:
        raise ValueError(f"--metrics: {error}") from None


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
RESUMABLE = ("metrics", "metrics_ref", "metrics_num", "detector", "total_kimg", "kimg_per_tick", "snapshot_ticks", "state_dump_ticks", "workers", "dataset_kwargs.path",
             "dataset_kwargs.cache", "batch_gpu", "precision", "precond_kwargs.use_fp16", "compile", "channels_last",
             "grid_count", "grid_steps", "stop_check_steps", "transfer", "cudnn_benchmark", "dist_timeout",
             "pfgm_data_norm")
# The train.py option behind a configuration key, for messages.
FLAGS = {"D": "--pfgmpp/--aug_dim", "precond": "--precond", "network_class": "--arch", "batch_size": "--batch",
         "network_kwargs.model_channels": "--cbase", "network_kwargs.channel_mult": "--cres",
         "network_kwargs.num_blocks": "--nblock", "network_kwargs.attn_resolutions": "--attn",
         "network_kwargs.dropout": "--dropout", "network_kwargs.augment_dim": "--augment", "augment_kwargs": "--augment",
         "augment_kwargs.p": "--augment", "dataset_kwargs.use_labels": "--cond", "dataset_kwargs.xflip": "--xflip",
         "network_kwargs.label_dropout": "--label_dropout", "betas": "--arch (its recipe's Adam betas)",
         "lr": "--lr", "lr_rampup_kimg": "--lr_rampup", "lr_ref_batches": "--lr_decay", "ema_halflife_kimg": "--ema", "ema_std": "--ema_std", "loss_scaling": "--ls",
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
    if c.network_class == "EDM2UNet":  # edm2-s etc. by its width, or edm2 for a width of no preset
        arch = next((name for name, preset in networks.ARCH_PRESETS.items() if preset["class_name"] == "EDM2UNet"
                     and preset["model_channels"] == c.network_kwargs.get("model_channels")), "edm2")
    D = "" if math.isinf(c.D) else f"-D{pfgmpp.format_D(c.D)}"
    return f"{dataset_name}-{'cond' if c.dataset_kwargs['use_labels'] else 'uncond'}-{arch}-{c.precond}{D}-gpus{world_size}-batch{c.batch_size}-{effective_precision(c.precision, device_type)}"
