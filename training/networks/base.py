"""What a network class of the registry declares besides its constructor (training/networks/__init__.py).

A network F_theta is an `nn.Module` taking EDM's keywords (`img_resolution`, `in_channels`, `out_channels`,
`label_dim`, `augment_dim`, ...), called as `model(x, noise_labels, class_labels=None, augment_labels=None)`,
and decorated with `@records_init_kwargs` so that a snapshot can rebuild it. Its initial weights and its dropout
may come from torch's ordinary functions and layers: training runs the constructor and each step's forward under
`torch_utils.rng.network_draws` with generators seeded from --seed, so they are a function of the seed. Its class
declares, as class attributes:

- `presets`: the `--arch` names it offers, each a `Preset` (constructor keywords, and the train options whose
  recipe default the preset changes, such as EDM2's learning rate per size);
- `recipe`: the name of the training recipe its presets train with (`training.train.options.RECIPES`);
- `short_name`: how a run directory names it (`run_name`, which a class may refine, as EDM2's does by width);
- `head_channels(config)`: the channels of one attention head for a configuration (None: heads are not sized
  in channels), which the registry's validation checks against each attended level's width;
- `check(config)`: its own validation of a configuration (ValueError), beyond what every network shares.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """A named configuration of a network class (train.py --arch)."""

    kwargs: dict
    training: dict = field(default_factory=dict)  # train options the preset sets where the user leaves them unset
    resolution: int | None = None  # the resolution of the published configuration (benchmarks use it)


class Network:
    """The declarations of a registered network class (module docstring), with their defaults; a mixin."""

    presets: dict[str, Preset] = {}
    recipe: str = "edm"
    short_name: str = ""

    @classmethod
    def run_name(cls, kwargs: dict) -> str:
        """The network's part of a run directory's name, for its constructor keywords `kwargs`."""
        return cls.short_name or cls.__name__

    @classmethod
    def head_channels(cls, config: dict) -> int | None:
        """Channels per attention head of the configuration `config` (every keyword, defaults included)."""
        return None

    @classmethod
    def check(cls, config: dict) -> None:
        """ValueError for a configuration (every keyword, defaults included) this class cannot build as asked."""
