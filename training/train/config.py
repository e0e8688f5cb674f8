"""train.py's options -> a run's configuration, as pure functions (no I/O, testable).

A configuration holds every saved option of `training.train.options.OPTIONS` under its own name, with the
recipe's value where the user left it unset, and what follows from them: D, and the keyword arguments of the
network (`network_kwargs`, with its `class_name`), of the preconditioner (`precond_kwargs`) and of the loss
(`loss_kwargs`). `training_config` checks the options and builds it; `complete` adds what depends on the data
once it is open. What an objective reads and how its options become keyword arguments, the loss declares
(training/losses); what a network's presets are and which recipe they train with, the network declares
(training/networks); nothing here names either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from dnnlib.util import EasyDict
from torch_utils.precision import effective as effective_precision
from training import evaluation, losses, networks, pfgmpp, phema, preconditioners, samplers
from training import metrics as metrics_lib
from training.augment import AugmentPipe
from training.options import check_needs, check_range
from training.train.options import OPTIONS, RECIPES, objective, resumable, saved

# What the configuration derives from the options, checked on resume like the options that define the model.
DERIVED = ("D", "network_kwargs", "precond_kwargs", "loss_kwargs")
LSUN_SIGMA_SCALE = 380 / 80  # the PFGM++ reference's --lsun: sigma_max 380 instead of 80 for LSUN 256x256


def recipe_defaults(arch: str) -> dict:
    """The values of the options left unset for a network (its class's recipe, then its preset's own values)."""
    return {**RECIPES[networks.network_class(arch).recipe], **networks.preset(arch).training}


def _resolve(given: dict, world_size: int) -> EasyDict:
    """Every saved option by name: the given value, else the recipe's, else the table's default; ranges checked."""
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown train option(s) {', '.join(unknown)}; see train.py --help")
    for name in saved():
        if OPTIONS[name].required and given.get(name) is None:
            raise ValueError(f"{OPTIONS[name].cli_flag} is required")
    recipe = recipe_defaults(given.get("arch") or OPTIONS["arch"].default)
    o = EasyDict()
    for name in saved():
        value = given.get(name)
        o[name] = value if value is not None else recipe.get(name, OPTIONS[name].default)
        check_range(OPTIONS[name], o[name])
    for name in saved():
        if OPTIONS[name].kind in ("bool", "flag") and o[name] is not None:
            o[name] = bool(o[name])
    o.batch_gpu = o.batch_gpu or o.batch // max(world_size, 1)
    return o


def training_config(*, world_size: int = 1, **given) -> EasyDict:
    """The configuration of a run from train.py's options by name (module docstring); ValueError naming the flag."""
    o = _resolve(_reference_flags(dict(given)), world_size)
    check_needs(OPTIONS, o)
    o.ema_std = phema_profiles(o.ema_std)
    o.metrics = _metric_names(o.metrics)
    if o.metrics:
        evaluation.check_reference(o.metrics, o.metrics_ref, "--metrics_ref")
        metrics_sampler(o)  # a solver that does not read --metrics_steps / --metrics_alpha is refused now
    if o.pfgmpp and o.aug_dim is None:
        raise ValueError("--pfgmpp=1 needs --aug_dim=D (e.g. 128 or 2048; 'inf' is the diffusion limit)")
    D = pfgmpp.check_D(o.aug_dim) if o.pfgmpp else math.inf
    precond = preconditioners.get(o.precond)
    if precond.default_loss is None:
        raise ValueError(f"--precond must be one of {', '.join(preconditioners.trainable())}, got {o.precond!r}")
    loss = losses.get(o.loss or precond.default_loss)
    if not loss.compatible(precond):
        outputs = " and ".join(precond.outputs) or "nothing but the denoised image"
        fits = [name for name, cls in losses.LOSSES.items() if cls.compatible(precond)]
        raise ValueError(f"--loss={o.loss} does not train what --precond={o.precond} computes ({outputs}); use "
                         f"--loss={' or '.join(fits) or '...'} with it, or another --precond")
    if o.batch % (world_size * o.batch_gpu):
        raise ValueError(f"--batch={o.batch} is not divisible by {world_size} ranks x --batch-gpu={o.batch_gpu}")
    if o.precision not in OPTIONS["precision"].choice_list():
        raise ValueError(f"--precision must be one of {', '.join(OPTIONS['precision'].choice_list())}, got {o.precision!r}")
    _check_objective(o, loss)
    D, precond_kwargs, loss_kwargs = loss.configure({k: o[k] for k in objective()}, D=D, cond=o.cond, pfgmpp_on=o.pfgmpp)
    augment_dim = AugmentPipe(p=o.augment).label_dim if o.augment > 0 else 0
    extra = dict(label_dropout=float(o.label_dropout)) if o.label_dropout else {}
    network_kwargs = networks.network_kwargs(o.arch, cbase=o.cbase, cres=o.cres, nblock=o.nblock, attn=o.attn,
                                             dropout=o.dropout, augment_dim=augment_dim, **extra)
    o.update(loss=o.loss or precond.default_loss, D=D, network_kwargs=network_kwargs, precond_kwargs=precond_kwargs,
             loss_kwargs=loss_kwargs)
    return o


def _reference_flags(given: dict) -> dict:
    """The PFGM++ reference's --lsun, as the option it stands for (--sigma_scale=4.75, PFGM++ runs only, as there)."""
    if given.pop("lsun", False):
        if not given.get("pfgmpp"):
            raise ValueError("--lsun has no effect without --pfgmpp=1 (the reference scales sigma for PFGM++ only); add "
                             "--pfgmpp=1, or --sigma_scale=4.75 to scale a diffusion model's sigma")
        if given.get("sigma_scale") not in (None, 1.0, LSUN_SIGMA_SCALE):
            raise ValueError(f"--lsun=1 is --sigma_scale={LSUN_SIGMA_SCALE:g}, but --sigma_scale={given['sigma_scale']:g} "
                             "was given too; give one of them")
        given["sigma_scale"] = LSUN_SIGMA_SCALE
    return given


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
        if not value:  # ',,': separators only would silently track nothing
            raise ValueError(f"--ema_std lists no number ({text!r}); give e.g. 0.050,0.100, or 'none' for no profile")
    try:
        return phema.check_profiles(value) if value else []
    except ValueError as error:
        raise ValueError(f"--ema_std: {error}") from None


METRICS_SAMPLER = {"metrics_steps": "num_steps", "metrics_alpha": "perturb_alpha"}  # option -> solver keyword


def metrics_sampler(c: dict) -> samplers.SamplerSettings:
    """The sampler of --metrics: --metrics_solver (default heun) with --metrics_steps and --metrics_alpha when set;
    ValueError naming the flag a solver does not read."""
    options = {keyword: c.get(name) for name, keyword in METRICS_SAMPLER.items()}
    try:
        return samplers.SamplerSettings(c.get("metrics_solver") or "heun", options)
    except samplers.UnknownOptions as error:
        flags = [OPTIONS[n].cli_flag for n, k in METRICS_SAMPLER.items() if k in error.foreign]
        raise ValueError(f"{', '.join(flags)} does not apply to --metrics_solver={error.solver}") from None


def _metric_names(value: str | Sequence[str] | None) -> list[str]:
    if value is None or value == "" or value == []:
        return []
    try:
        return metrics_lib.parse(value if isinstance(value, str) else ",".join(value))
    except ValueError as error:
        raise ValueError(f"--metrics: {error}") from None


def _or_list(names: Sequence[str]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _check_objective(o: EasyDict, loss: type[losses.Loss]) -> None:
    """ValueError naming the objective options set (changed from their default) that the run's loss does not read,
    and the preconditioners (or, with --loss, the losses) whose loss does."""
    foreign = [k for k in objective() if OPTIONS[k].is_set(o[k]) and k not in loss.options]
    if not foreign:
        return
    flags = ", ".join(OPTIONS[k].cli_flag for k in foreign)
    verb = "applies" if len(foreign) == 1 else "apply"
    readers = [name for name, cls in losses.LOSSES.items() if set(foreign) <= set(cls.options)]
    if o.loss is not None:
        where = f"--loss={_or_list(readers)}" if readers else "different losses"
        raise ValueError(f"{flags} {verb} only to {where}, not to --loss={o.loss}")
    preconds = [kind for kind in preconditioners.trainable() if preconditioners.get(kind).default_loss in readers]
    where = f"--precond={_or_list(preconds)}" if preconds else \
        f"--loss={_or_list(readers)}" if readers else "different preconditioners"
    raise ValueError(f"{flags} {verb} only to {where}, not to --precond={o.precond}")


def dataset_kwargs(c: dict) -> dict:
    """The keyword arguments of the run's `ImageFolderDataset`."""
    return dict(path=c["data"], use_labels=bool(c["cond"]), xflip=bool(c["xflip"]), cache=bool(c["cache"]))


def augment_pipe(c: dict) -> AugmentPipe | None:
    """The run's augmentation pipeline (EDM's, with probability --augment), or None."""
    return AugmentPipe(p=c["augment"]) if c["augment"] > 0 else None


def build_loss(c: dict) -> losses.Loss:
    """The loss of a configuration, with the run's loss options."""
    return losses.get(c["loss"])(**c["loss_kwargs"])


def complete(c: EasyDict, dataset, world_size: int = 1) -> EasyDict:
    """What depends on the data, filled in and checked once `dataset` is open (before any run directory exists).

    The loss completes its own options (PFGM's M, z_max, upper_norm from the data); the network's options are
    checked against the data's shape; the loss is built once to check its options, and its reference batch must
    split over the ranks.
    """
    losses.get(c.loss).complete(c, dataset)
    precond = preconditioners.get(c.precond)
    kwargs = dict(c.network_kwargs)
    networks.check_network(kwargs.pop("class_name"), dataset.resolution, dataset.num_channels,  # e.g. attention levels
                           precond.out_channels(dataset.num_channels), label_dim=dataset.label_dim, **kwargs)
    if build_loss(c).needs_reference and c.rbatch % world_size:
        raise ValueError(f"--rbatch={c.rbatch} must be divisible by the {world_size} ranks (each loads its share)")
    return c


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


def resume_mismatches(saved_config: dict, current: dict) -> list[str]:
    """What differs between a training state's saved configuration and this run's, other than the options a resumed
    run may change, as 'flag state-value in the state, value now' phrases (the options by their flag, what is
    derived from them, compared when the options agree, by its key; keys only one side has are skipped)."""
    found = []
    for keys in ([k for k in saved() if k not in resumable()], DERIVED):  # what is derived: if the options agree
        a = _flatten(json.loads(json.dumps({k: saved_config[k] for k in keys if k in saved_config})))
        b = _flatten(json.loads(json.dumps({k: current[k] for k in keys if k in current})))  # the state's JSON round trip
        for key in (k for k in a if k in b and a[k] != b[k]):
            name = OPTIONS[key].cli_flag if key in OPTIONS else key
            found.append(f"{name} {_text(a[key])} in the state, {_text(b[key])} now")
        if found:
            break
    return found


def run_description(c: dict, dataset_name: str, world_size: int, device_type: str = "cuda") -> str:
    """The run directory's name after its number, EDM-style: data-cond-arch-precond[-D]-gpus-batch-precision, with the
    precision the device actually computes in (a CPU run with the default tf32 is named fp32)."""
    kwargs = dict(c["network_kwargs"])
    arch = networks.network_class(kwargs.pop("class_name")).run_name(kwargs)
    D = "" if math.isinf(c["D"]) else f"-D{pfgmpp.format_D(c['D'])}"
    cond = "cond" if c["cond"] else "uncond"
    precision = effective_precision(c["precision"], device_type)
    return f"{dataset_name}-{cond}-{arch}-{c['precond']}{D}-gpus{world_size}-batch{c['batch']}-{precision}"
