"""click options made from a table of `training.options.Option`s (train.py's, the sampler's): the one place where
an option's kind becomes a click type."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import click

from training.cli import AugDim, Float
from training.options import Option


def _choice(option: Option):
    """A click parameter callback checking a registry-backed choice when the command runs (a later entry counts)."""

    def check(ctx, param, value):
        if value is not None and value not in option.choice_list():
            raise click.BadParameter(f"choose one of {', '.join(option.choice_list())}; got {value!r}")
        return value

    return check


def click_option(option: Option) -> Callable:
    """The click option of one table entry."""
    names = [option.cli_flag, *option.aliases, option.name]
    kwargs = dict(help=option.help, required=option.required)
    if option.default is not None and not option.required:
        kwargs.update(default=option.default, show_default=option.kind not in ("flag",))
    kind = option.kind
    if kind == "flag":
        kwargs.update(is_flag=True, default=bool(option.default))
        kwargs.pop("show_default", None)
    elif kind == "bool":
        kwargs.update(type=bool, metavar="BOOL")
    elif kind == "int":
        kwargs.update(type=click.IntRange(min=option.low, max=option.high, min_open=option.low_open,
                                          max_open=option.high_open), metavar="INT")
    elif kind == "float":
        kwargs.update(type=Float(min=option.low, max=option.high, min_open=option.low_open, max_open=option.high_open),
                      metavar="FLOAT")
    elif kind == "D":
        kwargs.update(type=AugDim())
    elif kind == "dir":
        kwargs.update(type=click.Path(file_okay=False))
    elif kind == "choice":
        if callable(option.choices):  # checked when the command runs: a name registered after import counts
            kwargs.update(type=str, callback=_choice(option), metavar=f"[{'|'.join(option.choice_list())}]")
        else:
            kwargs.update(type=click.Choice(list(option.choices)))
    else:
        kwargs.update(type=str)
    if option.metavar is not None:
        kwargs["metavar"] = option.metavar
    return click.option(*names, **kwargs)


def click_options(options: Iterable[Option]) -> Callable:
    """A decorator adding the click option of every entry, in table order."""
    options = list(options)

    def decorate(command):
        for option in reversed(options):
            command = click_option(option)(command)
        return command

    return decorate
