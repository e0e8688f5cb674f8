"""The sampler's command-line options, shared by generate.py and `fid.py gen`, and the seed list type."""

from __future__ import annotations

import click

from training import generation, samplers
from training.cli import AugDim, Float, flag
from training.samplers import edm, score_sde


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


def _solver(ctx, param, value: str) -> str:
    """--solver, checked against the registry when the command runs (a solver registered later counts)."""
    if value not in samplers.SOLVERS:
        known = ", ".join(f"{name} ({solver.description})" for name, solver in samplers.SOLVERS.items())
        raise click.BadParameter(f"choose one of {known}; got {value!r}")
    return value


def sampler_options(command):
    """The sampler's options (EDM's generate.py names, plus the baselines'), for generate.py and `fid.py gen`.

    Options left unset take the chosen solver's defaults; setting one that the solver does not read is an error
    (`settings_from_options`).
    """
    positive = Float(min=0, min_open=True)
    options = [
        click.option("--solver", help=f"Sampler: {', '.join(samplers.SOLVERS)}", metavar="NAME", callback=_solver, default="heun", show_default=True),
        click.option("--steps", "num_steps", help="Noise levels [default: 18; pc 1000; pfgm_euler* 100]", metavar="INT", type=click.IntRange(min=1)),
        click.option("--sigma_min", help="Lowest noise level (z_min for pfgm_*) [default: varies]", metavar="FLOAT", type=positive),
        click.option("--sigma_max", help="Highest noise level (z_max for pfgm_*) [default: varies]", metavar="FLOAT", type=positive),
        click.option("--rho", help="Time step exponent [default: 7]", metavar="FLOAT", type=positive),
        click.option("--S_churn", "S_churn", help="Stochasticity strength [default: 0]", metavar="FLOAT", type=Float(min=0)),
        click.option("--S_min", "S_min", help="Stoch. min noise level [default: 0]", metavar="FLOAT", type=Float(min=0)),
        click.option("--S_max", "S_max", help="Stoch. max noise level [default: inf]", metavar="FLOAT", type=Float(min=0)),
        click.option("--S_noise", "S_noise", help="Stoch. noise inflation [default: 1]", metavar="FLOAT", type=Float()),
        click.option("--disc", "discretization", help="Time step discretization [default: edm]", type=click.Choice(list(edm.DISCRETIZATIONS))),
        click.option("--schedule", help="Noise schedule sigma(t) [default: linear]", type=click.Choice(list(edm.SCHEDULES))),
        click.option("--scaling", help="Signal scaling s(t) [default: none]", type=click.Choice(list(edm.SCALINGS))),
        click.option("--rtol", help="rk45: relative tolerance [default: 1e-5; pfgm_rk45 1e-4]", metavar="FLOAT", type=positive),
        click.option("--atol", help="rk45: absolute tolerance [default: 1e-5; pfgm_rk45 1e-4]", metavar="FLOAT", type=positive),
        click.option("--sde", help="pc: the SDE [default: vp for VP networks, else ve]", type=click.Choice(list(score_sde.SDES))),
        click.option("--predictor", help="pc: predictor [default: reverse_diffusion]", type=click.Choice(list(score_sde.PREDICTORS))),
        click.option("--corrector", help="pc: corrector [default: langevin]", type=click.Choice(list(score_sde.CORRECTORS))),
        click.option("--snr", help="pc: corrector signal-to-noise ratio [default: 0.16]", metavar="FLOAT", type=positive),
        click.option("--n_corrector", help="pc: corrector steps per level [default: 1]", metavar="INT", type=click.IntRange(min=1)),
        click.option("--guidance", help="Guidance weight w: D_g + w (D - D_g); 1 = none", metavar="FLOAT", type=Float(), default=1.0, show_default=True),
        click.option("--gnet", help="Guiding network D_g [default: the network itself without labels, if trained with --label_dropout]", metavar="PATH|URL"),
        click.option("--precision", help="Network arithmetic (tf32: TF32 matmuls on CUDA)", type=click.Choice(list(generation.PRECISIONS)), default="tf32", show_default=True),
        click.option("--aug_dim", help="Check that the network's D is this ('inf' for diffusion)", type=AugDim()),
        click.option("--pfgmpp", help="Check that the network is PFGM++ (finite D)", metavar="BOOL", type=bool),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# The keywords of `sampler_options` that are solver options (the rest: precision and the network checks).
SAMPLER_KEYWORDS = ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "discretization",
                    "schedule", "scaling", "rtol", "atol", "sde", "predictor", "corrector", "snr", "n_corrector")


def settings_from_options(opts: dict) -> samplers.SamplerSettings:
    """The sampler settings among the parsed options of `sampler_options`; a usage error for a foreign option."""
    try:
        return samplers.SamplerSettings(opts["solver"], {k: opts.get(k) for k in SAMPLER_KEYWORDS})
    except samplers.UnknownOptions as error:
        reads = [flag(k) for k in error.accepted if k in SAMPLER_KEYWORDS]
        raise click.UsageError(f"{', '.join(flag(k) for k in error.foreign)} does not apply to --solver={error.solver}; "
                               f"it reads {', '.join(reads) or 'no sampler option'}") from None
