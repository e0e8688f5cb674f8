"""The command-line layer: click types and option groups shared by the tools, and the console scripts.

The only home of click besides the top-level scripts (train.py, generate.py, fid.py, dataset_tool.py) and
bench/. Library functions raise ValueError / OSError with actionable text; `user_errors` turns those into
one-line click errors (set PFGMPP_DEBUG=1 to see the traceback instead), and `exit_on_signals` turns SIGTERM
and SIGHUP into an exit that runs the writers' clean-up, so an interrupted tool leaves no partial output.
training/cli/options.py makes click options from the tables of `training.options.Option`s (train.py's and the
sampler's); training/cli/sampler.py holds the sampler's options of generate.py and `fid.py gen`. The console scripts
of pyproject.toml live beside this module:

    pfgmpp-hparams        training/cli/hparams.py         PFGM++ hyper-parameter transfer
    pfgmpp-pfgm-hparams   training/cli/pfgm_hparams.py    PFGM's M, z_max, upper_norm
    pfgmpp-convert        training/cli/convert.py         any checkpoint -> safe snapshot
    pfgmpp-likelihood     training/cli/likelihood.py      bits/dim (runs under torchrun too)
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator
from typing import Any

import click  # this package imports no torch: dataset_tool.py starts fast

DEBUG_ENV = "PFGMPP_DEBUG"


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):"  # how a DataLoader worker's error is passed on


def error_message(error: BaseException) -> str:
    """The text of a library error; for one raised in a DataLoader worker (which torch passes on as the same type,
    its message the worker's whole traceback) the original message alone."""
    text = str(error)
    if WORKER_TRACEBACK not in text:
        return text
    last = text.rstrip().rsplit("\n", 1)[-1]
    kind, _, message = last.partition(": ")
    return message if message and kind.rsplit(".", 1)[-1] == type(error).__name__ else last


@contextlib.contextmanager
def user_errors(usage: bool = False) -> Iterator[None]:
    """Turn the library's errors for bad input (ValueError, OSError) into a one-line click error."""
    try:
        yield
    except (ValueError, OSError) as error:
        if os.environ.get(DEBUG_ENV):
            raise
        raise (click.UsageError if usage else click.ClickException)(error_message(error)) from None


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit(128 + signal) in the main thread, so `finally` blocks (the removal of
    temporary files) run; the previous handlers come back afterwards.

    Should compiled code swallow that exception (a signal during an extension module's import can), the
    signal is remembered and the block still ends with the same SystemExit.
    """
    received: list[int] = []

    def handle(signum, frame):
        received.append(signum)
        raise SystemExit(128 + signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        if number is not None:
            with contextlib.suppress(ValueError):  # not the main thread
                previous[number] = signal.signal(number, handle)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        raise SystemExit(128 + received[0])


class AugDim(click.ParamType):
    """D: a real number > 0, or 'inf' for the diffusion limit."""

    name = "D"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        """Parse and check D, failing with a click error (no traceback) when it is invalid."""
        if isinstance(value, float):
            return value
        try:
            D = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number; give D > 0 such as 128, or 'inf'", param, ctx)
        if math.isnan(D) or D <= 0:
            self.fail(f"D must be > 0 (or 'inf'), got {value}", param, ctx)
        return D


class Float(click.FloatRange):
    """A finite float, optionally within a range: 'inf' and 'nan' are refused (FloatRange lets them through)."""

    name = "FLOAT"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number

    def get_metavar(self, param, *args, **kwargs) -> str:  # click >= 8.2 passes ctx too
        return "FLOAT"

    def _describe_range(self) -> str:  # the help's "[x>0]"; nothing when unbounded
        return "" if self.min is None and self.max is None else super()._describe_range()
