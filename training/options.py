"""Command-line options as data: one `Option` per option, from which a tool's click options, its configuration
keys and its checks are derived (the library describes them, `training.cli.options` makes the click options).

train.py's table is `training.train.options.OPTIONS`, the sampler's (generate.py, `fid.py gen`)
`training.samplers.options.OPTIONS`. An option's name is its keyword and its configuration key, and its flag is
`--name` unless `flag` says otherwise (the sampler keeps EDM's `--steps` and `--disc`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("bool", "int", "float", "D", "str", "choice", "flag", "dir")


@dataclass(frozen=True)
class Option:
    """One command-line option (module docstring).

    `default` None means unset: the tool's recipe or the component reading it decides (the help says what).
    `choices` of a "choice" option is a tuple, or a function of no arguments that reads a registry when the
    command is made (a name registered later counts). `low`/`high` bound numbers (`low_open`/`high_open`: the
    bound itself is excluded). `needs` names another option without which this one has no effect: setting this
    one while that one is off is an error (`why` says what it would do).

    The fields of train.py's options: `resume` (a resumed run may change it), `objective` (an option of one loss
    or another; a loss declares those it reads) and `saved` (part of the run's configuration; False for what
    only says how this process runs, such as --outdir or --dry-run).
    """

    name: str
    kind: str
    help: str
    default: Any = None
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    metavar: str | None = None
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    required: bool = False
    needs: str | None = None
    why: str = ""
    resume: bool = False
    objective: bool = False
    saved: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if (self.kind == "choice") != (self.choices is not None):
            raise ValueError(f"option {self.name}: choices go with kind 'choice', and only with it")

    @property
    def cli_flag(self) -> str:
        """The flag: '--name' unless `flag` says otherwise."""
        return self.flag or f"--{self.name}"

    def choice_list(self) -> list[str]:
        """The choices of a 'choice' option, read now."""
        return list(self.choices() if callable(self.choices) else self.choices)

    def is_set(self, value: Any) -> bool:
        """Whether `value` differs from this option's default (None counts as unset)."""
        return value is not None and value != self.default


def table(options: Sequence[Option]) -> dict[str, Option]:
    """The options by name; ValueError for a name or flag given twice."""
    found: dict[str, Option] = {}
    flags: set[str] = set()
    for option in options:
        names = {option.cli_flag, *option.aliases}
        if option.name in found or names & flags:
            raise ValueError(f"option {option.name} ({', '.join(sorted(names))}) is in the table twice")
        found[option.name] = option
        flags |= names
    return found


def check_needs(options: Mapping[str, Option], values: Mapping[str, Any]) -> None:
    """ValueError for an option that is set while the option it `needs` is off (0, empty or unset)."""
    for option in options.values():
        if option.needs is None or not option.is_set(values.get(option.name)) or values.get(option.needs):
            continue
        needed = options[option.needs]
        hint = "=1" if needed.kind == "bool" else ""
        why = f" ({option.why})" if option.why else ""
        raise ValueError(f"{option.cli_flag} has no effect without {needed.cli_flag}{hint}{why}; add {needed.cli_flag}"
                         f"{hint or '=...'} or leave {option.cli_flag} out")


def check_range(option: Option, value: Any) -> None:
    """ValueError, naming the flag, for a number outside the option's bounds (or not finite)."""
    if option.kind not in ("int", "float") or value is None:
        return
    if option.kind == "float" and not math.isfinite(value):
        raise ValueError(f"{option.cli_flag} must be a finite number, got {value}")
    bounds = []
    if option.low is not None and not (value > option.low if option.low_open else value >= option.low):
        bounds.append(f"{'>' if option.low_open else '>='} {option.low:g}")
    if option.high is not None and not (value < option.high if option.high_open else value <= option.high):
        bounds.append(f"{'<' if option.high_open else '<='} {option.high:g}")
    if bounds:
        raise ValueError(f"{option.cli_flag} must be {' and '.join(bounds)}, got {value}")
