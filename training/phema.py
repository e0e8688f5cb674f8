"""Power-function EMA and its post-hoc reconstruction (EDM2: Karras et al., "Analyzing and Improving the Training
Dynamics of Diffusion Models", CVPR 2024, section 3 and appendix C; equation numbers are arXiv:2312.02696v2's).

The profile. A power-function EMA of exponent gamma >= 0 read at training time T is the average of the parameter
history theta(tau), 0 <= tau <= T, under the density (eq. 121)

    p_{gamma,T}(tau) = (gamma + 1) tau^gamma / T^(gamma + 1),

i.e. weights proportional to tau^gamma. Its standard deviation relative to T is (eq. 123)

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),

from 0 (gamma -> inf: the latest parameters) to sqrt(1/12) (gamma = 0: the uniform average of the whole run).

Time. t counts training images, as EDM2's training loop does: after the optimizer step that used the images
(t - b, t] the parameters are theta_t, held until the next step. The update after that step is (eq. 127)

    ema <- beta ema + (1 - beta) theta_t,    beta = (1 - b / t)^(gamma + 1),

and the EMA then equals the integral of p_{gamma,t} against the piecewise-constant history: the weight of the
parameters of the step ending at t_i is (t_i^(gamma+1) - t_(i-1)^(gamma+1)) / t^(gamma+1), exactly, whatever the
batch sizes. With a constant batch size this is the same as counting steps (only ratios of times matter).

Snapshots. A run tracking profiles writes `network-snapshot-NNNNNN-S.SSS.pt` (NNNNNN = kimg = images // 1000,
S.SSS = sigma_rel) with `training.checkpoint.save_network`. The reconstruction reads the time from the name:
t = 1000 kimg images, within 1000 images of the truth (a relative error below 1000 / t).

Reconstruction (section 3.2, appendix C.3). A profile wanted at time T is approximated in L2 by a combination of
the stored snapshots' profiles: the weights solve the normal equations A x = b with A_ij = <p_i, p_j>, b_i =
<p_i, p_target> (closed form below, float64), normalised to sum to 1 as EDM2 does. Because each snapshot is
the integral of its profile against the same history, the combination of snapshots is the integral of the
combined profile: the result is as close to the wanted EMA as the profiles are to each other. The networks are
then combined in float32, one snapshot read at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from training import checkpoint
from training.checkpoint.formats import KIMG_PATTERN, label_images

SNAPSHOT_PREFIX = "network-snapshot"
SIGMA_REL_MAX = math.sqrt(1 / 12)  # gamma = 0: the uniform average of the whole history
DEFAULT_SIGMA_REL = (0.05, 0.10)  # EDM2's two tracked profiles (gamma 16.97 and 6.94)
FIT_WARNING = 0.05  # a relative L2 residual of the fitted profile above this is reported as a poor fit
# This program's `.pt` / `.safetensors` snapshots and EDM2's `.pkl` ones (network-snapshot-0001234-0.050.pkl).
_NAME = re.compile(rf"(?P<prefix>.+)-{KIMG_PATTERN}-(?P<sigma_rel>\d+\.\d{{3}})\.(?:pt|safetensors|pkl)")


# ------------------------------------------------------------------------------------------------
# sigma_rel <-> gamma.

def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent gamma >= 0 (EDM2 eq. 123)."""
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"the power-function exponent gamma must be a finite number >= 0, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def check_sigma_rel(sigma_rel: float) -> float:
    """`sigma_rel` as a float when 0 < sigma_rel <= sqrt(1/12); a ValueError naming the valid range otherwise."""
    value = float(sigma_rel)
    if not (math.isfinite(value) and 0 < value <= SIGMA_REL_MAX):
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (sqrt(1/12) = the uniform average of the "
                         f"whole run, gamma = 0; EDM2 uses 0.010 to 0.250), got {sigma_rel}")
    return value


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 of the power-function profile with relative standard deviation sigma_rel (eq. 126).

    Eq. 123 squared and inverted is the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0, s = sigma_rel^-2;
    gamma is its largest real root, written here in closed form (the trigonometric solution of the depressed cubic
    x^3 + p x + q = 0, gamma = x - 7/3, p = -(s + 1/3), q = 4 s / 3 + 2 / 27; three real roots since s >= 12).
    """
    s = check_sigma_rel(sigma_rel) ** -2
    p, q = -(s + 1 / 3), 4 * s / 3 + 2 / 27
    m = 2 * math.sqrt(-p / 3)
    phi = math.acos(min(1.0, max(-1.0, 3 * q / (p * m))))
    return max(0.0, m * math.cos(phi / 3) - 7 / 3)


def power_function_beta(gamma: float, t: float, batch_size: float) -> float:
    """The decay of the update at time t (images seen after the step) for a step of batch_size images (eq. 127)."""
    return (1 - batch_size / t) ** (gamma + 1)  # 0 at the first step: the EMA starts as a copy


# ------------------------------------------------------------------------------------------------
# File names.

def check_profiles(sigma_rels: Sequence[float]) -> list[float]:
    """Tracked profiles: valid, distinct, written exactly by three decimals (the file names hold three)."""
    profiles = [check_sigma_rel(s) for s in sigma_rels]
    if not profiles:
        raise ValueError("give at least one sigma_rel to track (EDM2 tracks 0.050 and 0.100)")
    inexact = [s for s in profiles if abs(round(s, 3) - s) > 1e-9]
    if inexact:
        raise ValueError(f"sigma_rel {inexact[0]} has more than three decimals; snapshot names hold three, so the "
                         f"reconstruction would read another profile: track {round(inexact[0], 3):.3f} instead")
    if len({f"{s:.3f}" for s in profiles}) != len(profiles):
        raise ValueError(f"sigma_rel values tracked twice: {', '.join(f'{s:.3f}' for s in profiles)}")
    return profiles


def snapshot_name(kimg: int | str, sigma_rel: float | None = None, prefix: str = SNAPSHOT_PREFIX) -> str:
    """'network-snapshot-000123-0.100.pt': the snapshot of a tracked profile at kimg = images // 1000 (or at a
    `checkpoint.formats.kimg_label` such as '000123.456'); without sigma_rel, the classic EMA's
    'network-snapshot-000123.pt'."""
    label = kimg if isinstance(kimg, str) else f"{int(kimg):06d}"
    if sigma_rel is None:
        return f"{prefix}-{label}.pt"
    return f"{prefix}-{label}-{float(sigma_rel):.3f}.pt"


def parse_snapshot_name(name: str) -> tuple[str, int, float, int | None] | None:
    """(prefix, kimg, sigma_rel, the exact images seen when the name tells them) of a profile's snapshot name, ours
    (`snapshot_name`) or EDM2's; None for any other name."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    kimg, nimg = label_images(match["kimg"], match["rest"])
    return match["prefix"], kimg, float(match["sigma_rel"]), nimg


# ------------------------------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """Power-function EMA copies of a module, one per tracked sigma_rel (EDM2 section 3.1).

    Call `update(net, cur_nimg, batch_size)` after every optimizer step, with cur_nimg the images seen including
    that step's; the parameters follow eq. 127 with torch._foreach ops (beta is a host float: no device sync) and
    the buffers are copied. `module(sigma_rel)` is the EMA network of a profile (for snapshots);
    `state_dict()` / `load_state_dict()` hold every profile for an exact resume.
    """

    def __init__(self, net: torch.nn.Module, sigma_rels: Sequence[float] = DEFAULT_SIGMA_REL):
        self.profiles = check_profiles(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.profiles]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.profiles]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, cur_nimg: int, batch_size: int) -> None:
        """Fold in the parameters after the step that brought the images seen to cur_nimg (eq. 127)."""
        if not 0 < batch_size <= cur_nimg:
            raise ValueError(f"update after a step: need 0 < batch_size <= cur_nimg (images seen including this step), "
                             f"got batch_size={batch_size}, cur_nimg={cur_nimg}")
        params = [p.detach() for p in net.parameters()]
        buffers = list(net.buffers())
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_function_beta(gamma, cur_nimg, batch_size)
            torch._foreach_lerp_(list(ema.parameters()), params, 1 - beta)
            if buffers:
                torch._foreach_copy_(list(ema.buffers()), buffers)

    def module(self, sigma_rel: float) -> torch.nn.Module:
        """The EMA network of a tracked profile (matched by its three-decimal name)."""
        for s, ema in zip(self.profiles, self.emas):
            if f"{s:.3f}" == f"{float(sigma_rel):.3f}":
                return ema
        raise ValueError(f"sigma_rel {sigma_rel} is not tracked; tracked: {', '.join(f'{s:.3f}' for s in self.profiles)}")

    def items(self) -> list[tuple[float, torch.nn.Module]]:
        """(sigma_rel, EMA network) of every tracked profile."""
        return list(zip(self.profiles, self.emas))

    def state_dict(self) -> dict:
        """The tracked profiles and the state_dict of each EMA network (tensors by reference, like nn.Module)."""
        return {"sigma_rel": list(self.profiles), "ema": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state: dict) -> None:
        """Restore every EMA from `state_dict()`; a ValueError when the state tracks other profiles."""
        tracked = [float(s) for s in state.get("sigma_rel", [])]
        if tracked != self.profiles or len(state.get("ema", [])) != len(self.profiles):
            raise ValueError(f"the state tracks sigma_rel {', '.join(f'{s:.3f}' for s in tracked) or 'none'}, this run "
                             f"{', '.join(f'{s:.3f}' for s in self.profiles)}; resume with the same profiles")
        for ema, ema_state in zip(self.emas, state["ema"]):
            ema.load_state_dict(ema_state)


# ------------------------------------------------------------------------------------------------
# Post-hoc reconstruction.

def _gammas(sigma_rel) -> np.ndarray:
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    return np.array([sigma_rel_to_gamma(s) for s in sigma_rel.ravel()], dtype=np.float64).reshape(sigma_rel.shape)


def inner_products(t_a, sigma_a, t_b, sigma_b) -> np.ndarray:
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) d tau of power-function profiles (float64, broadcast; eq. 151).

    For T_a <= T_b: (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) T_b) * (T_a / T_b)^gamma_b.
    """
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    g_a, g_b = _gammas(sigma_a), _gammas(sigma_b)
    t_lo, t_hi = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_hi = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the profile that ends later
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * t_hi) * (t_lo / t_hi) ** g_hi


def solve_weights(t_in, sigma_in, t_out, sigma_out) -> tuple[np.ndarray, np.ndarray]:
    """(weights [inputs, outputs], relative L2 residual [outputs]) of the least-squares fit of each output profile
    by the input profiles (EDM2 appendix C.3, Algorithm 3), weights normalised to sum to 1."""
    t_in, s_in = (np.asarray(v, dtype=np.float64).reshape(-1, 1) for v in (t_in, sigma_in))
    t_out, s_out = (np.asarray(v, dtype=np.float64).reshape(1, -1) for v in (t_out, sigma_out))
    A = inner_products(t_in, s_in, t_in.T, s_in.T)
    B = inner_products(t_in, s_in, t_out, s_out)
    try:
        X = np.linalg.solve(A, B)  # the normal equations of min_x || sum_i x_i p_i - p_out ||^2
    except np.linalg.LinAlgError:
        raise ValueError("the snapshots' profiles are linearly dependent (the same time and sigma_rel twice?)") from None
    X = X / X.sum(axis=0, keepdims=True)
    c = inner_products(t_out, s_out, t_out, s_out)[0]
    squared = c - 2 * np.sum(X * B, axis=0) + np.sum(X * (A @ X), axis=0)  # || sum_i x_i p_i - p_out ||^2
    return X, np.sqrt(np.maximum(squared, 0) / c)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A stored EMA snapshot: its file, its time (kimg, from the name), its profile, and the exact images seen when
    known (from the name, or the provenance our snapshots record; EDM2's names round them down to kimg)."""

    path: Path
    kimg: int
    sigma_rel: float
    nimg: int | None = None

    @property
    def t(self) -> float:
        """The snapshot's time in kimg, exact when known: the profile's end for the reconstruction."""
        return self.nimg / 1000 if self.nimg is not None else float(self.kimg)


def find_snapshots(indir, prefix: str = SNAPSHOT_PREFIX) -> list[Snapshot]:
    """The `prefix-NNNNNN-S.SSS.pt` files of a folder, by time then sigma_rel; a ValueError when there are none."""
    indir = Path(indir)
    if not indir.is_dir():
        raise ValueError(f"--indir={indir} is not a folder; give the run directory that holds the snapshots")
    found, runs = [], {}
    for path in indir.iterdir():
        parsed = parse_snapshot_name(path.name)
        if parsed is not None and parsed[0] == prefix and path.is_file():
            provenance = checkpoint.recorded_provenance(path)
            kimg = provenance.get("kimg")
            nimg = parsed[3] if parsed[3] is not None else (round(kimg * 1000) if isinstance(kimg, (int, float)) else None)
            found.append(Snapshot(path, parsed[1], parsed[2], nimg))
            if isinstance(provenance.get("run_dir"), str):
                runs.setdefault(provenance["run_dir"], path.name)
    if len(runs) > 1:
        named = "; ".join(f"{run} (e.g. {name})" for run, name in sorted(runs.items())[:3])
        raise ValueError(f"--indir={indir} holds the snapshots of {len(runs)} runs: {named}; a reconstruction combines "
                         "one run's EMA snapshots: give a folder with one run's")
    if not found:
        raise ValueError(f"no power-function EMA snapshots ({snapshot_name(0, 0.05, prefix).replace('000000', 'NNNNNN')} "
                         f"...) in {indir}; a run writes them when it tracks power-function EMA profiles")
    return sorted(found, key=lambda s: (s.t, s.sigma_rel))


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """What to combine: the snapshots used, the output time (its kimg, and exactly) and profiles, the weights and each
    output's fit."""

    snapshots: list[Snapshot]
    kimg: int
    sigma_rel: list[float]
    weights: np.ndarray  # [snapshots, outputs], float64
    residual: np.ndarray  # [outputs]: || fitted profile - wanted profile || / || wanted profile ||
    t: float = 0.0  # the output time in kimg, exact when the snapshots' times are

    def provenance(self, j: int) -> dict:
        """What an output snapshot records of its making."""
        return {"phema": {"sigma_rel": self.sigma_rel[j], "kimg": self.kimg, "t_kimg": self.t,
                          "relative_residual": float(self.residual[j]), "inputs": [s.path.name for s in self.snapshots]}}


def output_time(snapshots: Sequence[Snapshot], kimg: int | None = None) -> tuple[int, float]:
    """(kimg, exact time in kimg) of the reconstruction: the latest snapshot's, or the latest one at `kimg`."""
    timed = [s for s in snapshots if s.t > 0]
    if not timed:
        raise ValueError("every snapshot is at time 0, before any training; reconstruct from a run that trained longer")
    if kimg is None:
        latest = max(timed, key=lambda s: s.t)
        return latest.kimg, latest.t
    at = [s.t for s in timed if s.kimg == kimg]
    if not at:
        times = sorted({s.kimg for s in timed})
        near = min(times, key=lambda k: abs(k - kimg))
        raise ValueError(f"--outkimg={kimg}: no snapshot at that time (the nearest is {near}; there are {len(times)} "
                         f"from {times[0]} to {times[-1]}); choose one of the snapshot times")
    return kimg, max(at)


def plan_reconstruction(snapshots: Sequence[Snapshot], sigma_rel: Sequence[float], kimg: int | None = None) -> Reconstruction:
    """The weights of the snapshots up to `kimg` (default: the latest) that best give each wanted sigma_rel there.

    Times are exact where the snapshots record them (`Snapshot.t`): the kimg of a name is rounded down, which
    misplaces every profile of a short run and so raises the fit's residual.
    """
    kimg, t = output_time(snapshots, kimg)
    wanted = [check_sigma_rel(s) for s in sigma_rel]
    used = [s for s in snapshots if 0 < s.t <= t]  # t = 0 is no profile
    weights, residual = solve_weights([s.t for s in used], [s.sigma_rel for s in used], [t] * len(wanted), wanted)
    return Reconstruction(list(used), kimg, wanted, weights, residual, t)


def _network_of(config: dict) -> dict:
    return {key: config.get(key) for key in ("precond", "model")}


def _combine(plan: Reconstruction, columns: list[int]) -> list[torch.nn.Module]:
    """The output networks of `columns`: one pass over the snapshots, float32 weighted sums of the parameters."""
    first, shapes, sums, buffers, nets = None, {}, [], {}, []
    for i, snapshot in enumerate(plan.snapshots):
        config, state = checkpoint.read_checkpoint(snapshot.path)
        if first is None:
            first, nets = _network_of(config), [checkpoint.network_from_config(config) for _ in columns]
            shapes = {name: p.shape for name, p in nets[0].named_parameters()}
            sums = [[torch.zeros(shape, dtype=torch.float32) for shape in shapes.values()] for _ in columns]
        if _network_of(config) != first or any(name not in state or state[name].shape != shape
                                               for name, shape in shapes.items()):
            raise ValueError(f"{snapshot.path} holds another network than {plan.snapshots[0].path.name}; keep one "
                             "run's snapshots in --indir")
        values = [state[name].to(torch.float32) for name in shapes]
        for j, column in enumerate(columns):
            torch._foreach_add_(sums[j], values, alpha=float(plan.weights[i, column]))  # sum_i x_i theta_i
        buffers = {k: v for k, v in state.items() if k not in shapes}  # the latest: snapshots come in time order
        del state, values
    for net, parameters in zip(nets, sums):
        checkpoint.load_weights(net, {**buffers, **dict(zip(shapes, parameters))}, plan.snapshots[-1].path.name)
    return [net.eval().requires_grad_(False) for net in nets]


def reconstruct(plan: Reconstruction, batch: int = 8) -> Iterator[tuple[int, torch.nn.Module]]:
    """(output index, network) for every output of `plan`, combined in float32 from one snapshot read at a time.

    Up to `batch` outputs are accumulated per pass over the snapshots (EDM2's --batch: the number of outputs held in
    memory; ceil(outputs / batch) passes). Parameters are the weighted sums; buffers come from the latest snapshot.
    """
    batch = max(int(batch), 1)
    for start in range(0, len(plan.sigma_rel), batch):
        columns = list(range(start, min(start + batch, len(plan.sigma_rel))))
        yield from zip(columns, _combine(plan, columns))


def expand_sigma_rel_list(text: str) -> list[float]:
    """'0.05,0.1' or EDM2's '0.010,0.015,...,0.250' (an evenly spaced run) as sorted distinct valid sigma_rel values."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    values: list[float] = []
    for i, item in enumerate(items):
        if item != "...":
            try:
                values.append(float(item))
            except ValueError:
                raise ValueError(f"{item!r} is not a number; give sigma_rel values such as 0.05,0.1") from None
            continue
        if len(values) < 2 or i + 1 >= len(items) or items[i - 1] == "..." or items[i + 1] == "...":
            raise ValueError("'...' needs two values before it and one after, e.g. 0.010,0.015,...,0.250")
        step, end = values[-1] - values[-2], float(items[i + 1])
        count = (end - values[-1]) / step if step else -1
        if count < 1 or abs(count - round(count)) > 1e-4:
            raise ValueError(f"'...' must continue an even spacing up to {end}: {values[-2]}, {values[-1]}, ... does not reach it")
        values += [values[-1] + step * (k + 1) for k in range(round(count) - 1)]
    if not values:
        raise ValueError("give at least one sigma_rel, e.g. 0.05,0.1")
    return sorted({round(check_sigma_rel(v), 9) for v in values})
