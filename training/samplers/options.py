"""The sampler's options of generate.py and `fid.py gen` / `fid.py sweep`: one table (`training.options.Option`),
from which their click options and the solver keywords they pass on are derived.

`SOLVER_OPTIONS` are keywords of the solvers (training/samplers: each solver declares those it reads, and an option
given to a solver that does not read it is an error); `OPTIONS` adds the solver choice, guidance, the sampling
precision and the checks against the network. EDM's flag names are kept: --steps (num_steps), --disc
(discretization). Exposing a new solver option is one entry in `SOLVER_OPTIONS`.
"""

from __future__ import annotations

from training import samplers
from training.generation import SAMPLING_PRECISIONS
from training.options import Option, table
from training.samplers import edm, restart, score_sde, unipc

_POSITIVE = dict(low=0, low_open=True)

SOLVER_OPTIONS: dict[str, Option] = table([
    Option("num_steps", "int", "Noise levels [default: 18; pc 1000; pfgm_euler* 100]", flag="--steps", low=1),
    Option("sigma_min", "float", "Lowest noise level (z_min for pfgm_*) [default: varies]", **_POSITIVE),
    Option("sigma_max", "float", "Highest noise level (z_max for pfgm_*) [default: varies]", **_POSITIVE),
    Option("rho", "float", "Time step exponent [default: 7]", **_POSITIVE),
    Option("S_churn", "float", "Stochasticity strength [default: 0]", low=0),
    Option("S_min", "float", "Stoch. min noise level [default: 0]", low=0),
    Option("S_max", "float", "Stoch. max noise level [default: inf]", low=0),
    Option("S_noise", "float", "Stoch. noise inflation [default: 1]"),
    Option("discretization", "choice", "Time step discretization [default: edm]", flag="--disc",
           choices=tuple(edm.DISCRETIZATIONS)),
    Option("schedule", "choice", "Noise schedule sigma(t) [default: linear]", choices=tuple(edm.SCHEDULES)),
    Option("scaling", "choice", "Signal scaling s(t) [default: none]", choices=tuple(edm.SCALINGS)),
    Option("rtol", "float", "rk45: relative tolerance [default: 1e-5; pfgm_rk45 1e-4]", **_POSITIVE),
    Option("atol", "float", "rk45: absolute tolerance [default: 1e-5; pfgm_rk45 1e-4]", **_POSITIVE),
    Option("sde", "choice", "pc: the SDE [default: vp for VP networks, else ve]", choices=tuple(score_sde.SDES)),
    Option("predictor", "choice", "pc: predictor [default: reverse_diffusion]", choices=tuple(score_sde.PREDICTORS)),
    Option("corrector", "choice", "pc: corrector [default: langevin]", choices=tuple(score_sde.CORRECTORS)),
    Option("snr", "float", "pc: corrector signal-to-noise ratio [default: 0.16]", **_POSITIVE),
    Option("n_corrector", "int", "pc: corrector steps per level [default: 1]", low=1),
    Option("perturb_alpha", "float", "Robustness study: add alpha * sigma_i * N(0, I) to x at the start of every "
           "step (fixed-step solvers; PFGM++ generate_alpha.py) [default: 0]", metavar="ALPHA", low=0),
    Option("order", "int", "unipc: predictor order (the corrector adds one) [default: 2]", low=min(unipc.ORDERS),
           high=max(unipc.ORDERS)),
    Option("restart_info", "str", "restart: intervals, JSON {\"i\": [N, K, t_min, t_max], ...} [default: "
           f"{restart.DEFAULT_RESTARTS}]", metavar="JSON"),
    Option("restart_gamma", "float", "restart: churn inside the intervals [default: 0]", low=0),
])  # fmt: skip


def _solvers() -> list[str]:
    return list(samplers.SOLVERS)


OPTIONS: dict[str, Option] = table([
    Option("solver", "choice", "Sampler", default="heun", choices=_solvers),
    *SOLVER_OPTIONS.values(),
    Option("guidance", "float", "Guidance weight w: D_g + w (D - D_g); 1 = none", default=1.0),
    Option("gnet", "str", "Guiding network D_g [default: the network itself without labels, if trained with "
           "--label_dropout]", metavar="PATH|URL"),
    Option("quantize_bits", "int", "Robustness study: quantise a copy of the weights to B bits per tensor "
           "(min-max; PFGM++ generate_quant.py; 32: unchanged)", metavar="B", low=1, high=32),
    Option("precision", "choice", "Network arithmetic (tf32: TF32 matmuls on CUDA)", default="tf32",
           choices=SAMPLING_PRECISIONS),
    Option("aug_dim", "D", "Check that the network's D is this ('inf' for diffusion)"),
    Option("pfgmpp", "bool", "Check that the network is PFGM++ (finite D)"),
])  # fmt: skip


def flag(keyword: str) -> str:
    """The command-line flag of a sampler keyword: '--steps' for num_steps."""
    return OPTIONS[keyword].cli_flag if keyword in OPTIONS else f"--{keyword}"


def sampler_settings(values: dict) -> samplers.SamplerSettings:
    """The sampler settings among parsed option values (by keyword); `samplers.UnknownOptions` for a solver option
    the chosen solver does not read."""
    return samplers.SamplerSettings(values.get("solver", "heun"), {k: values.get(k) for k in SOLVER_OPTIONS})
