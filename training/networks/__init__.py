"""Denoiser networks F_theta: DDPM++ / NCSN++ (SongUNet), ADM (DhariwalUNet) and EDM2's magnitude-preserving
U-Net (EDM2UNet), each with its presets.

`NETWORKS` is the registry: the allow-list of class names that configurations and checkpoints may name. Each
class declares its presets (train.py --arch), the recipe they train with, its short name and its own checks
(training/networks/base.py); `presets()` gathers the presets of all. `network_kwargs(arch, ...)` turns
train.py's options into a `{"class_name": ..., **kwargs}` dict; `build_network(...)` validates a configuration
and constructs the module. A new network is one module here plus one line in `NETWORKS`; nothing else in the
project switches on its name or class.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

from torch import nn

from training.networks.base import Network, Preset
from training.networks.dhariwal import DhariwalUNet
from training.networks.edm2 import EDM2UNet
from training.networks.songunet import SongUNet

__all__ = ["NETWORKS", "Network", "Preset", "DhariwalUNet", "EDM2UNet", "SongUNet", "build_network",
           "check_network", "network_class", "network_kwargs", "preset", "presets"]

NETWORKS: dict[str, type[Network]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "EDM2UNet": EDM2UNet}


def presets() -> dict[str, tuple[type[Network], Preset]]:
    """Every --arch name of the registered networks, with its class and preset, in registry order."""
    found = {}
    for cls in NETWORKS.values():
        for name, entry in cls.presets.items():
            if name in found or name in NETWORKS:
                raise ValueError(f"the preset name {name!r} of {cls.__name__} is taken; give it another")
            found[name] = (cls, entry)
    return found


def preset(arch: str) -> Preset:
    """The preset `arch` (an empty one for a class name)."""
    _resolve_class(arch)  # ValueError for an unknown name
    entry = presets().get(arch)
    return entry[1] if entry is not None else Preset({})


def network_class(class_name_or_arch: str) -> type[Network]:
    """The network class of an arch or a class name."""
    return _resolve_class(class_name_or_arch)[0]


MIN_RESOLUTION, MAX_RESOLUTION = 8, 512
_GIVEN_BY_BUILD = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim")


def _int_list(value: str | int | Sequence[int], name: str) -> list[int]:
    """A list of ints from a sequence, a single int, or a comma-separated string such as '1,2,2,2'."""
    if isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of integers, got {value!r}") from None


def _resolve_class(name: str) -> tuple[type[Network], dict]:
    """The network class and preset keyword arguments for an arch name or a class name."""
    found = presets().get(name)
    if found is not None:
        return found[0], copy.deepcopy(found[1].kwargs)
    if name in NETWORKS:
        return NETWORKS[name], {}
    raise ValueError(
        f"unknown network {name!r}; choose an arch ({', '.join(presets())}) "
        f"or a class name ({', '.join(NETWORKS)})"
    )


def _check_keywords(cls: type[Network], kwargs: dict) -> None:
    """Reject keyword arguments the class does not take, listing those it does."""
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{cls.__name__} does not take {', '.join(unknown)}; it takes {', '.join(accepted)}")


def network_kwargs(
    arch: str,
    cbase: int | None = None,
    cres: str | Sequence[int] | None = None,
    nblock: int | None = None,
    attn: str | Sequence[int] | None = None,
    dropout: float | None = None,
    **extra,
) -> dict:
    """`{"class_name": ..., **kwargs}` for an arch preset with train.py's overrides applied.

    cbase -> model_channels, cres -> channel_mult, nblock -> num_blocks, attn -> attn_resolutions;
    `extra` may set any other constructor keyword of the class.
    """
    cls, kwargs = _resolve_class(arch)
    if cbase is not None:
        kwargs["model_channels"] = int(cbase)
    if cres is not None:
        kwargs["channel_mult"] = _int_list(cres, "cres")
    if nblock is not None:
        kwargs["num_blocks"] = int(nblock)
    if attn is not None:
        kwargs["attn_resolutions"] = _int_list(attn, "attn")
    if dropout is not None:
        kwargs["dropout"] = float(dropout)
    kwargs.update(extra)
    _check_keywords(cls, {k: v for k, v in kwargs.items() if k not in _GIVEN_BY_BUILD})
    return {"class_name": cls.__name__, **kwargs}


def _validate(cls: type[Network], config: dict) -> None:
    """ValueError for a configuration that cannot be built or silently differs from what was asked."""
    res = config["img_resolution"]
    if not isinstance(res, int) or res < MIN_RESOLUTION or res > MAX_RESOLUTION or res & (res - 1):
        raise ValueError(
            f"img_resolution must be a power of two from {MIN_RESOLUTION} to {MAX_RESOLUTION}, got {res!r}"
        )
    positive = ("in_channels", "out_channels", "model_channels", "channel_mult_emb", "channel_mult_noise", "num_blocks",
                "channels_per_head")  # fmt: skip
    optional = {name for name, p in inspect.signature(cls.__init__).parameters.items() if p.default is None}
    for name in positive:
        if name in config and not (isinstance(config[name], int) and config[name] >= 1):
            if config[name] is None and name in optional:  # EDM2UNet: None = derived from channel_mult
                continue
            raise ValueError(f"{name} must be an integer >= 1, got {config[name]!r}")
    for name in ("label_dim", "augment_dim"):
        if not (isinstance(config[name], int) and config[name] >= 0):
            raise ValueError(f"{name} must be an integer >= 0, got {config[name]!r}")
    if "channel_mult" in config:
        _check_levels(cls, config)
    dropout, label_dropout = config.get("dropout", 0.0), config.get("label_dropout", 0.0)
    if not 0 <= dropout < 1 or not 0 <= label_dropout <= 1:
        raise ValueError(f"dropout must be in [0, 1) and label_dropout in [0, 1], got {dropout}, {label_dropout}")
    cls.check(config)


def _check_levels(cls: type[Network], config: dict) -> None:
    """A U-Net's levels (`channel_mult`): the resolution halves at each, and attention sits at levels that exist and
    are wide enough for its heads."""
    res = config["img_resolution"]
    mult = config["channel_mult"]
    if not mult or any(m < 1 for m in mult):
        raise ValueError(f"channel_mult must be a non-empty list of integers >= 1, got {mult!r}")
    levels = len(mult)
    if res % 2 ** (levels - 1):
        raise ValueError(
            f"img_resolution {res} is not divisible by 2**(len(channel_mult) - 1) = {2 ** (levels - 1)}: "
            f"channel_mult {mult} has {levels} levels, each halving the resolution; use at most "
            f"{res.bit_length()} levels at {res}x{res}"
        )
    resolutions = [res >> level for level in range(levels)]
    attn_resolutions = config.get("attn_resolutions", [])
    absent = sorted(set(attn_resolutions) - set(resolutions))
    if absent:
        raise ValueError(
            f"attn_resolutions {absent} do not occur in this network; its resolutions are {resolutions}"
        )
    # Heads sized in channels (ADM's 64, EDM2's channels_per_head): a narrower level would silently lose its attention.
    per_head = cls.head_channels(config)
    if per_head is not None:
        attn = sorted(attn_resolutions)
        widths = [(r, config["model_channels"] * mult[resolutions.index(r)]) for r in attn]
        narrow = [(r, width) for r, width in widths if width < per_head]
        if narrow:
            where = ", ".join(f"{r}x{r} has {width}" for r, width in narrow)
            lower = " (or lower channels_per_head)" if "channels_per_head" in config else ""
            raise ValueError(
                f"{cls.__name__} attends with {per_head} channels per head, so attention needs >= {per_head} "
                f"channels ({where}); raise model_channels{lower} or leave these resolutions out of attn_resolutions"
            )


def _resolved(class_name_or_arch: str, given: dict, kwargs: dict) -> tuple[type[Network], dict]:
    """The class and its keyword arguments for a configuration, validated (ValueError otherwise)."""
    cls, config = _resolve_class(class_name_or_arch)
    class_name = kwargs.pop("class_name", cls.__name__)
    if class_name != cls.__name__:
        raise ValueError(f"class_name {class_name!r} contradicts {class_name_or_arch!r} ({cls.__name__})")
    config.update(kwargs)
    _check_keywords(cls, config)
    for key in ("channel_mult", "attn_resolutions"):
        if key in config:
            config[key] = _int_list(config[key], key)
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    _validate(cls, {**defaults, **config, **given})
    return cls, config


def check_network(class_name_or_arch: str, img_resolution: int, in_channels: int, out_channels: int,
                  label_dim: int = 0, augment_dim: int = 0, **kwargs) -> None:
    """ValueError unless `build_network` with these arguments would build a network (nothing is built)."""
    given = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                 label_dim=label_dim, augment_dim=augment_dim)  # fmt: skip
    _resolved(class_name_or_arch, given, dict(kwargs))


def build_network(
    class_name_or_arch: str,
    img_resolution: int,
    in_channels: int,
    out_channels: int,
    label_dim: int = 0,
    augment_dim: int = 0,
    **kwargs,
) -> nn.Module:
    """Validate a configuration and construct the network (an arch preset, overridden by kwargs, or a class)."""
    given = dict(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                 label_dim=label_dim, augment_dim=augment_dim)  # fmt: skip
    cls, config = _resolved(class_name_or_arch, given, kwargs)
    return cls(**given, **config)
