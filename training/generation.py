"""Seeded image generation from a trained network: what generate.py and `fid.py gen` share.

Image k with seed s depends on s alone: its prior draw, its class label (when not fixed) and any
sampler noise come from a generator seeded with s on the sampling device, so the images are the
same whatever the batch size, the number of ranks or the order of the seeds. Ranks take whole
batches round robin; nothing here waits for other ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import click
import torch
import tqdm

from dnnlib import util
from torch_utils import distributed, rng
from training import checkpoint, images, pfgm, sampling, sde_sampling

PRECISIONS = ("fp32", "tf32", "bf16")

# The options of `sampling.noise_levels`, which the prior draw must share with the sampler.
_LEVEL_OPTIONS = ("num_steps", "sigma_min", "sigma_max", "rho", "discretization", "epsilon_s", "C_1", "C_2", "M")

# Sampler families and the options each one reads; --solver picks the family.
SOLVERS = ("heun", "euler", "rk45", "pc", *(f"pfgm_{s}" for s in pfgm.SOLVERS))
_FAMILY_OPTIONS = {
    "edm": ("num_steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise", "discretization",
            "schedule", "scaling"),
    "rk45": ("sigma_min", "sigma_max", "rtol", "atol"),
    "pc": ("num_steps", "sigma_min", "sigma_max", "sde", "predictor", "corrector", "snr", "n_corrector"),
    "pfgm": ("num_steps", "sigma_min", "sigma_max", "rtol", "atol"),
}
_CLI_NAMES = {"num_steps": "--steps", "discretization": "--disc"}


@dataclass(frozen=True)
class Batch:
    """One batch of this rank's share: global positions, seeds, uint8 images [B, H, W, C] on the device, and
    the network evaluations the sampler made for it."""

    indices: list[int]
    seeds: list[int]
    images: torch.Tensor
    nfe: int = 0


@dataclass
class SamplerSettings:
    """The sampler (`solver`) and its options, None meaning that sampler's default.

    Families: heun / euler (EDM's sampler and its ablations, `sampling.sample`), rk45 (the adaptive
    probability-flow ODE, `sampling.sample_rk45`), pc (Score SDE predictor-corrector for D = inf,
    `sde_sampling.sample_pc`), pfgm_rk45 / pfgm_euler / pfgm_improved_euler (PFGM's backward ODE in
    ln z, `pfgm.sample`).
    """

    options: dict = field(default_factory=dict)

    @property
    def solver(self) -> str:
        return self.options.get("solver") or "heun"

    @property
    def family(self) -> str:
        """edm, rk45, pc or pfgm."""
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        return "edm" if self.solver in ("heun", "euler") else "pfgm" if self.solver.startswith("pfgm_") else self.solver

    def given(self) -> dict:
        """The options that were set, checked to apply to the chosen solver."""
        given = {k: v for k, v in self.options.items() if v is not None and k != "solver"}
        foreign = [k for k in given if k not in _FAMILY_OPTIONS[self.family]]
        if foreign:
            names = ", ".join(_CLI_NAMES.get(k, f"--{k}") for k in foreign)
            raise ValueError(f"{names} does not apply to --solver={self.solver}; it reads "
                             f"{', '.join(_CLI_NAMES.get(k, f'--{k}') for k in _FAMILY_OPTIONS[self.family])}")
        return given

    def sample_kwargs(self) -> dict:
        """The options of EDM's sampler (`sampling.sample`), for the heun and euler solvers."""
        if self.family != "edm":
            raise ValueError(f"this needs --solver=heun or euler (EDM's sampler), not {self.solver}")
        return {**self.given(), "solver": self.solver}

    def level_kwargs(self) -> dict:
        """The subset of `sample_kwargs` that fixes the noise levels, for `sampling.prior_latents`."""
        return {k: v for k, v in self.sample_kwargs().items() if k in _LEVEL_OPTIONS}


def check_network(net, aug_dim: float | None = None, pfgmpp: bool | None = None, class_idx: int | None = None) -> None:
    """Reject options that contradict the network: a different D, --pfgmpp=0 on a PFGM++ net, a bad class."""
    D = float(net.D)
    if aug_dim is not None and float(aug_dim) != D:
        raise ValueError(
            f"the network was trained with D={_d_text(D)} but --aug_dim={_d_text(float(aug_dim))} was given; "
            "D and the prior come from the checkpoint: drop --aug_dim"
        )
    if pfgmpp is not None and bool(pfgmpp) != math.isfinite(D):
        raise ValueError(
            f"--pfgmpp={int(bool(pfgmpp))} contradicts the network (D={_d_text(D)}); "
            "the checkpoint decides: drop --pfgmpp"
        )
    if class_idx is not None:
        if not net.label_dim:
            raise ValueError("--class was given but the network is unconditional; drop --class")
        if not 0 <= class_idx < net.label_dim:
            raise ValueError(f"--class={class_idx} is out of range: the network has classes 0-{net.label_dim - 1}")


def load_network(network: str, device, aug_dim: float | None = None, pfgmpp: bool | None = None,
                 class_idx: int | None = None) -> torch.nn.Module:
    """A network from any supported file or URL, checked against the options that must agree with it.

    Rank 0 reads (and for a URL downloads) it first; the other ranks then read the cached file.
    """
    net = distributed.main_first(lambda: checkpoint.load_network(network, device=device))
    check_network(net, aug_dim, pfgmpp, class_idx)
    return net


def parse_seeds(text: str) -> list[int]:
    """'0-63,100' -> [0, ..., 63, 100]: distinct non-negative seeds below 2^63."""
    seeds = util.parse_int_list(text)
    if not seeds:
        raise ValueError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError("a seed is listed twice; each seed names one image")
    if max(seeds) >= 2**63:
        raise ValueError("seeds must be below 2^63")
    return seeds


def _d_text(D: float) -> str:
    return "inf" if math.isinf(D) else f"{D:g}"


def rank_batches(count: int, batch_size: int, rank: int | None = None, world: int | None = None) -> list[range]:
    """Positions 0..count-1 in batches of `batch_size`; this rank's batches, taken round robin."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rank = distributed.get_rank() if rank is None else rank
    world = distributed.get_world_size() if world is None else world
    starts = range(0, count, batch_size)
    return [range(s, min(s + batch_size, count)) for s in starts][rank::world]


def class_labels(net, generators: Sequence[torch.Generator], class_idx: int | None, device) -> torch.Tensor | None:
    """One-hot labels [B, label_dim]: class_idx for all, or one drawn uniformly from each seed's generator."""
    if not net.label_dim:
        return None
    if class_idx is None:
        u = rng.rand([len(generators)], generators, device=device, dtype=torch.float64)
        index = (u * net.label_dim).long().clamp_max(net.label_dim - 1)
    else:
        index = torch.full([len(generators)], int(class_idx), device=device)
    return torch.eye(net.label_dim, device=device)[index]


def precision_context(precision: str, device: torch.device):
    """Set TF32 (on unless fp32) and return the autocast context of `precision` for the network calls."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def draw_latents(net, generators: Sequence[torch.Generator], device, settings: SamplerSettings) -> torch.Tensor:
    """Prior draws for `run_sampler` with the same settings: the network's prior at that sampler's first level."""
    o = settings.given()
    family = settings.family
    if family == "pc":
        return sde_sampling.prior_latents(net, generators, device=device, sde=o.get("sde"),
                                          sigma_min=o.get("sigma_min"), sigma_max=o.get("sigma_max"))
    if family == "pfgm":
        if not hasattr(net, "upper_norm"):
            raise ValueError(f"--solver={settings.solver} is PFGM's sampler, for networks trained with --precond=pfgm; "
                             f"{type(net).__name__} solves the same ODE with --solver=rk45")
        return pfgm.prior_latents(net, generators, device=device, z_max=o.get("sigma_max"))
    if family == "rk45":
        return sampling.prior_latents(net, generators, device=device, sigma_min=o.get("sigma_min"), sigma_max=o.get("sigma_max"))
    return sampling.prior_latents(net, generators, device=device, **settings.level_kwargs())


def run_sampler(net, latents, labels, generators: Sequence[torch.Generator], settings: SamplerSettings) -> tuple[torch.Tensor, int]:
    """Integrate `latents` to images with the chosen sampler: (x, network evaluations)."""
    o = settings.given()
    family = settings.family
    with torch.no_grad():
        if family == "rk45":
            return sampling.sample_rk45(net, latents, labels, **o)
        if family == "pc":
            return sde_sampling.sample_pc(net, latents, labels, generator=generators, **o)
        if family == "pfgm":
            z_range = dict(z_min=o.pop("sigma_min", None), z_max=o.pop("sigma_max", None))
            return pfgm.sample(net, latents, labels, solver=settings.solver[len("pfgm_"):], **z_range, **o)
        kwargs = settings.sample_kwargs()
        x = sampling.sample(net, latents, labels, randn_like=rng.randn_like_fn(generators), **kwargs)
        steps = len(sampling.noise_levels(net, **settings.level_kwargs()))
        return x, (2 * steps - 1 if settings.solver == "heun" else steps)


def sample_seeds(net, seeds: Sequence[int], device, settings: SamplerSettings,
                 class_idx: int | None = None) -> tuple[torch.Tensor, int]:
    """(float images [B, C, H, W] in about [-1, 1], network evaluations) for `seeds`, one generator per seed.

    Each seed's generator draws, in order: its prior latent, its class label (unless fixed), its sampler noise.
    """
    generators = rng.seeded_generators(seeds, device)
    latents = draw_latents(net, generators, device, settings)
    labels = class_labels(net, generators, class_idx, device)
    return run_sampler(net, latents, labels, generators, settings)


def generate(
    net,
    seeds: Sequence[int],
    batch_size: int,
    device,
    settings: SamplerSettings | None = None,
    class_idx: int | None = None,
    precision: str = "tf32",
    progress: bool = False,
) -> Iterator[Batch]:
    """This rank's share of `seeds`, batch by batch, quantised to uint8 exactly as the PNGs store them."""
    settings = settings or SamplerSettings()
    seeds = [int(s) for s in seeds]
    device = torch.device(device)
    batches = rank_batches(len(seeds), batch_size)
    context = precision_context(precision, device)
    bar = _progress(len(batches), progress and distributed.is_main())
    for positions in batches:
        batch_seeds = [seeds[i] for i in positions]
        with context:
            x, nfe = sample_seeds(net, batch_seeds, device, settings, class_idx)
        yield Batch(list(positions), batch_seeds, images.to_uint8(x), nfe)
        bar.update(1)
    bar.close()


def _progress(total: int, enabled: bool):
    """A tqdm bar over batches on rank 0, or a silent stand-in."""
    return tqdm.tqdm(total=total, unit="batch", disable=not enabled, dynamic_ncols=True)


class SeedList(click.ParamType):
    """Click type: '0-63,100' -> [0, ..., 63, 100], checked by `parse_seeds`."""

    name = "LIST"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return parse_seeds(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def sampler_options(command):
    """The sampler's click options (EDM's generate.py names, plus the baselines'), for generate.py and `fid.py gen`.

    Options left unset take the chosen solver's defaults; setting one that the solver does not read is an error.
    """
    positive = click.FloatRange(min=0, min_open=True)
    options = [
        click.option("--solver", help="Sampler: heun/euler (EDM), rk45 (adaptive ODE), pc (Score SDE), pfgm_* (PFGM, ln z)", type=click.Choice(list(SOLVERS)), default="heun", show_default=True),
        click.option("--steps", "num_steps", help="Noise levels [default: 18; pc 1000; pfgm_euler* 100]", metavar="INT", type=click.IntRange(min=1)),
        click.option("--sigma_min", help="Lowest noise level (z_min for pfgm_*) [default: varies]", metavar="FLOAT", type=positive),
        click.option("--sigma_max", help="Highest noise level (z_max for pfgm_*) [default: varies]", metavar="FLOAT", type=positive),
        click.option("--rho", help="Time step exponent [default: 7]", metavar="FLOAT", type=positive),
        click.option("--S_churn", "S_churn", help="Stochasticity strength [default: 0]", metavar="FLOAT", type=click.FloatRange(min=0)),
        click.option("--S_min", "S_min", help="Stoch. min noise level [default: 0]", metavar="FLOAT", type=click.FloatRange(min=0)),
        click.option("--S_max", "S_max", help="Stoch. max noise level [default: inf]", metavar="FLOAT", type=click.FloatRange(min=0)),
        click.option("--S_noise", "S_noise", help="Stoch. noise inflation [default: 1]", metavar="FLOAT", type=float),
        click.option("--disc", "discretization", help="Time step discretization [default: edm]", type=click.Choice(list(sampling.DISCRETIZATIONS))),
        click.option("--schedule", help="Noise schedule sigma(t) [default: linear]", type=click.Choice(list(sampling.SCHEDULES))),
        click.option("--scaling", help="Signal scaling s(t) [default: none]", type=click.Choice(list(sampling.SCALINGS))),
        click.option("--rtol", help="rk45: relative tolerance [default: 1e-5; pfgm_rk45 1e-4]", metavar="FLOAT", type=positive),
        click.option("--atol", help="rk45: absolute tolerance [default: 1e-5; pfgm_rk45 1e-4]", metavar="FLOAT", type=positive),
        click.option("--sde", help="pc: the SDE [default: vp for VP networks, else ve]", type=click.Choice(list(sde_sampling.SDES))),
        click.option("--predictor", help="pc: predictor [default: reverse_diffusion]", type=click.Choice(list(sde_sampling.PREDICTORS))),
        click.option("--corrector", help="pc: corrector [default: langevin]", type=click.Choice(list(sde_sampling.CORRECTORS))),
        click.option("--snr", help="pc: corrector signal-to-noise ratio [default: 0.16]", metavar="FLOAT", type=positive),
        click.option("--n_corrector", help="pc: corrector steps per level [default: 1]", metavar="INT", type=click.IntRange(min=1)),
        click.option("--precision", help="Network arithmetic (tf32: TF32 matmuls on CUDA)", type=click.Choice(list(PRECISIONS)), default="tf32", show_default=True),
        click.option("--aug_dim", help="Check that the network's D is this ('inf' for diffusion)", metavar="D", type=float),
        click.option("--pfgmpp", help="Check that the network is PFGM++ (finite D)", metavar="BOOL", type=bool),
    ]
    for option in reversed(options):
        command = option(command)
    return command


_SAMPLER_KEYS = ("solver", *sorted({k for keys in _FAMILY_OPTIONS.values() for k in keys}))


def settings_from_options(opts: dict) -> SamplerSettings:
    """The sampler settings among the parsed click options of `sampler_options`, checked against the solver."""
    settings = SamplerSettings({k: opts[k] for k in _SAMPLER_KEYS if opts.get(k) is not None})
    settings.given()
    return settings
