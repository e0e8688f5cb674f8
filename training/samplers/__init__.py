"""Samplers: one protocol and one registry for every solver, and every network and D.

    latents = samplers.prior_latents(net, generators, solver="heun", num_steps=18)
    images = samplers.sample(net, latents, class_labels, solver="heun", generator=generators, num_steps=18)

`prior_latents` draws the network's own prior (the PFGM++ kernel at the solver's first noise level; one
generator per sample makes each sample independent of its batch) and `sample` integrates the latents to
images, returning them in the latents' dtype. Pass the same options to both. The network evaluations a call
used are written into `info` (a `SampleInfo`) when one is given. Any solver samples a guided denoiser
(`training.samplers.guidance.guided`) like a network. An option the chosen solver does not read
is an error (`UnknownOptions`); None means "the solver's default".

`SOLVERS` maps each solver name to a `Solver` (training/samplers/base.py): its prior, its run function and
the options each reads. A new solver is one module (its run and prior functions and its `Solver`) plus one
line below; nothing else in the project branches on solver names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from torch_utils import rng
from training.samplers import dpm_solver, edm, pfgm, restart, rk45, score_sde, unipc
from training.samplers.base import SampleInfo, Solver

__all__ = ["SOLVERS", "PlanError", "SampleInfo", "SamplerSettings", "Solver", "UnknownOptions", "check_options", "get",
           "prior_latents", "sample"]

SOLVERS: dict[str, Solver] = {
    "heun": edm.HEUN,
    "euler": edm.EULER,
    "dpmpp-2m": dpm_solver.DPMPP_2M,
    "dpmpp-3m": dpm_solver.DPMPP_3M,
    "unipc": unipc.UNIPC,
    "restart": restart.RESTART,
    "rk45": rk45.RK45,
    "pc": score_sde.PC,
    "pfgm_rk45": pfgm.RK45,
    "pfgm_euler": pfgm.EULER,
    "pfgm_improved_euler": pfgm.IMPROVED_EULER,
}


class UnknownOptions(ValueError):
    """Options were given that the chosen solver does not read; `foreign` and `accepted` name them."""

    def __init__(self, solver: str, foreign: list[str], accepted: tuple[str, ...]):
        self.solver, self.foreign, self.accepted = solver, foreign, accepted
        super().__init__(f"{', '.join(foreign)} does not apply to the solver {solver}; it reads {', '.join(accepted)}")


def get(solver: str) -> Solver:
    """The registered solver `solver`."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver]


def check_options(solver: str, options: Mapping) -> dict:
    """The options that are set (not None), checked to be read by `solver`."""
    entry = get(solver)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = [k for k in given if k not in entry.options]
    if foreign:
        raise UnknownOptions(solver, foreign, entry.options)
    return given


def prior_latents(net, generator: rng.Generators, *, solver: str = "heun", batch: int | None = None, device=None,
                  **options) -> torch.Tensor:
    """Latents for `sample` with the same solver and options: the network's prior at the solver's first level.

    `generator`: one per sample (batch = their count), or one generator with `batch`.
    """
    entry, given = get(solver), check_options(solver, options)
    return entry.prior(net, generator, batch, device, **{k: v for k, v in given.items() if k in entry.prior_options})


def sample(net, latents: torch.Tensor, class_labels: torch.Tensor | None = None, *, solver: str = "heun",
           generator: rng.Generators = None, info: SampleInfo | None = None, **options) -> torch.Tensor:
    """Integrate `latents` from the prior to images (in latents' dtype) with `solver`; no gradients.

    `generator` (one, or one per sample) draws a stochastic solver's noise; `info.nfe` receives the number of
    network evaluations.
    """
    entry, given = get(solver), check_options(solver, options)
    with torch.no_grad():
        x, nfe = entry.run(net, latents, class_labels, generator, **given)
    if info is not None:  # a guided denoiser (training.samplers.guidance) evaluates two networks per call
        info.nfe = int(nfe) * getattr(net, "evaluations_per_call", 1)
    return x


@dataclass(frozen=True)
class SamplerSettings:
    """A solver and its options (unset ones dropped), checked when made: what generation passes around."""

    solver: str = "heun"
    options: Mapping = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "options", check_options(self.solver, self.options))

    def prior_latents(self, net, generator: rng.Generators, **kwargs) -> torch.Tensor:
        """`prior_latents` with these settings."""
        return prior_latents(net, generator, solver=self.solver, **self.options, **kwargs)

    def sample(self, net, latents: torch.Tensor, class_labels=None, **kwargs) -> torch.Tensor:
        """`sample` with these settings."""
        return sample(net, latents, class_labels, solver=self.solver, **self.options, **kwargs)

    def check(self, net) -> None:
        """PlanError when these settings cannot sample `net` (levels that underflow in float64, a restart interval
        outside the levels, a solver for another kind of network): the solver's whole plan is run once, on one
        latent, through a denoiser that returns zeros, so the error comes before any work instead of at the first
        batch. Costs no network evaluation."""
        proxy = _ZeroDenoiser(net)
        device = next(iter([*net.parameters(), *net.buffers()]), torch.empty(0)).device
        generators = [torch.Generator(device).manual_seed(0)]
        try:
            self.sample(proxy, self.prior_latents(proxy, generators), generator=generators)
        except ValueError as error:
            raise PlanError(str(error)) from None


class PlanError(ValueError):
    """A sampler's settings that its plan refuses for the network at hand (`SamplerSettings.check`)."""


class _ZeroDenoiser:
    """A network's attributes (noise range, D, prior, shape) with a denoiser that returns zeros."""

    evaluations_per_call = 1

    def __init__(self, net):
        self.net = net

    def __getattr__(self, name: str):
        if name == "net":
            raise AttributeError(name)
        return getattr(self.net, name)

    def __call__(self, x: torch.Tensor, sigma, class_labels=None, **kwargs) -> torch.Tensor:
        return torch.zeros_like(x)
