"""The sampler's command-line options, shared by generate.py and `fid.py gen` (the table of
training/samplers/options.py), and the seed list type."""

from __future__ import annotations

import click

from training import generation, samplers
from training.cli.options import click_options
from training.samplers import options as sampler_table


class SeedList(click.ParamType):
    """'0-63,100' -> [0, ..., 63, 100], checked by `training.generation.parse_seeds`."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return generation.parse_seeds(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def sampler_options(command):
    """The sampler's options (`training.samplers.options.OPTIONS`), for generate.py and `fid.py gen`.

    Options left unset take the chosen solver's defaults; setting one that the solver does not read is an error
    (`settings_from_options`).
    """
    return click_options(sampler_table.OPTIONS.values())(command)


def settings_from_options(opts: dict) -> samplers.SamplerSettings:
    """The sampler settings among the parsed options of `sampler_options`; a usage error for a foreign option."""
    try:
        return sampler_table.sampler_settings(opts)
    except samplers.UnknownOptions as error:
        reads = [sampler_table.flag(k) for k in error.accepted if k in sampler_table.SOLVER_OPTIONS]
        raise click.UsageError(f"{', '.join(sampler_table.flag(k) for k in error.foreign)} does not apply to "
                               f"--solver={error.solver}; it reads {', '.join(reads) or 'no sampler option'}") from None
