"""Hyper-parameter transfer from diffusion (EDM) to PFGM++: every setting stated in sigma carries over.

PFGM++ (Xu et al. 2023) aligns its radius with the diffusion noise level by r = sigma * sqrt(D), so
sigma_max, sigma_min and the training distribution ln sigma ~ N(P_mean, P_std^2) keep their EDM values
for every D. What changes with D is the prior: x ~ p_{r_max} is a multivariate Student-t with D degrees
of freedom and scale sigma_max, whose norm R obeys R^2 / r_max^2 ~ BetaPrime(N/2, D/2). This module
reports those quantities so a user can see what a choice of D does before training:

    pfgmpp-hparams --aug_dim=128                  # training/cli/hparams.py
    pfgmpp-hparams --aug_dim=inf --resolution=64 --json
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

from scipy import stats

from training.pfgmpp import check_D, sigma_to_r

# Above this D the F(N, D) quantiles equal their chi-square limit to double precision (relative
# difference O(N / D)), while scipy's F quantile function returns nan for D near 1e300.
_D_CHI2_LIMIT = 1e15
# D from which the kernel is, for practical purposes, the diffusion (Gaussian) kernel.
_D_PRACTICALLY_INF = 1e6
# Quantiles of R^2 / (sigma^2 N) above this are saturated by scipy (the true value overflows float64).
_F_QUANTILE_MAX = 1e300

_HEAVY_TAIL_WARNING = (
    "D <= 2: the kernel has infinite variance (heavy tails, as PFGM at D=1); E||x||^2 is infinite and "
    "a few prior draws land far outside the data range. PFGM++ reports D = 128..2048 as the sweet spot "
    "at 32x32..64x64; small D trades training ease for robustness."
)


def _validate(
    D: Any, N: Any, sigma_max: float, sigma_min: float, P_std: float, quantiles: Sequence[float]
) -> tuple[float, int, list[float]]:
    """Check the arguments of transfer_report; return D as a float, N as an int, the quantiles as a list."""
    D = check_D(D)
    if isinstance(N, bool) or not isinstance(N, Integral) or N < 1:
        raise ValueError(f"N (values per sample, C*H*W) must be an integer >= 1, got {N!r}")
    for name, value in (("sigma_max", sigma_max), ("sigma_min", sigma_min), ("P_std", P_std)):
        if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max})")
    quantiles = [float(q) for q in quantiles]
    if not quantiles or any(not 0.0 < q < 1.0 for q in quantiles):
        raise ValueError(f"quantiles must be a non-empty list of numbers strictly between 0 and 1, got {quantiles}")
    return D, int(N), quantiles


def _r(sigma: float, D: float) -> float | None:
    """r = sigma * sqrt(D), or None at D = inf where r is infinite."""
    return None if math.isinf(D) else sigma_to_r(sigma, D)


def _training_noise(D: float, P_mean: float, P_std: float, quantiles: list[float]) -> list[dict]:
    """Quantiles of the EDM training noise ln sigma ~ N(P_mean, P_std^2) and the matching r."""
    rows = []
    for q in quantiles:
        sigma = math.exp(P_mean + P_std * float(stats.norm.ppf(q)))
        rows.append({"q": q, "sigma": sigma, "r": _r(sigma, D)})
    return rows


def _prior_radius(D: float, N: int, sigma_max: float, quantiles: list[float]) -> list[dict]:
    """Quantiles of R = ||x|| for x ~ p_{r_max}, and R / sqrt(N), comparable with sigma_max.

    R^2 / r_max^2 ~ BetaPrime(N/2, D/2) = (N/D) F(N, D), so R^2 / (sigma_max^2 N) ~ F(N, D); the F form
    is the numerically robust one for large D and tends to chi2(N) / N as D -> inf. None marks a
    quantile beyond the float64 range (heavy tails at D << 1).
    """
    if D >= _D_CHI2_LIMIT:
        ratios = [float(stats.chi2(N).ppf(q)) / N for q in quantiles]
    else:
        ratios = [float(stats.f(N, D).ppf(q)) for q in quantiles]
    rows = []
    for q, ratio in zip(quantiles, ratios):
        ok = math.isfinite(ratio) and ratio < _F_QUANTILE_MAX
        per_coordinate = sigma_max * math.sqrt(ratio) if ok else None
        radius = per_coordinate * math.sqrt(N) if ok else None
        rows.append({"q": q, "R": radius, "R_per_coordinate": per_coordinate})
    return rows


def _mean_square_norm(D: float, N: int, sigma: float) -> float | None:
    """E||n||^2 = sigma^2 N D / (D - 2) (sigma^2 N at D = inf); None where it is infinite (D <= 2)."""
    if D <= 2:
        return None
    return sigma**2 * N / (1 - 2 / D)  # = sigma^2 N D / (D - 2), without overflow for D near the float64 limit


def _notes_and_warnings(D: float, prior: list[dict]) -> tuple[list[str], list[str]]:
    """Plain-language notes and warnings about a choice of D."""
    notes, warnings = [], []
    if math.isinf(D):
        notes.append(
            "D = inf is the diffusion limit (EDM / VE): r = sigma * sqrt(D) is infinite, so r_max, r_min "
            "and r are reported as None; work with sigma."
        )
    elif D >= _D_PRACTICALLY_INF:
        notes.append(f"D = {D:g} >= 1e6: practically the diffusion limit (D = inf); the kernel is Gaussian to O(1/D).")
    if D <= 2:
        warnings.append(_HEAVY_TAIL_WARNING)
    if any(row["R"] is None for row in prior):
        warnings.append("some prior radius quantiles exceed the float64 range and are reported as None.")
    return notes, warnings


def transfer_report(
    D: float,
    N: int,
    sigma_max: float = 80.0,
    sigma_min: float = 0.002,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    quantiles: Sequence[float] = (0.01, 0.5, 0.99),
) -> dict:
    """What the EDM settings (in sigma) become in PFGM++ at augmentation dimension D; JSON-able values.

    Keys: D ("inf" for math.inf), N, sigma_max, sigma_min, r_max and r_min (None at D = inf), P_mean,
    P_std, training_noise (rows q, sigma, r), prior_radius (rows q, R, R_per_coordinate = R / sqrt(N)),
    prior_mean_square_norm = E||x||^2 at sigma_max and prior_rms_per_coordinate (None when infinite,
    D <= 2), notes and warnings (lists of str). Raises ValueError for invalid arguments.
    """
    D, N, quantiles = _validate(D, N, sigma_max, sigma_min, P_std, quantiles)
    if not math.isfinite(P_mean):
        raise ValueError(f"P_mean must be finite, got {P_mean!r}")
    prior = _prior_radius(D, N, sigma_max, quantiles)
    mean_square = _mean_square_norm(D, N, sigma_max)
    notes, warnings = _notes_and_warnings(D, prior)
    return {
        "D": "inf" if math.isinf(D) else D,
        "N": N,
        "sigma_max": float(sigma_max),
        "sigma_min": float(sigma_min),
        "r_max": _r(sigma_max, D),
        "r_min": _r(sigma_min, D),
        "P_mean": float(P_mean),
        "P_std": float(P_std),
        "training_noise": _training_noise(D, P_mean, P_std, quantiles),
        "prior_radius": prior,
        "prior_mean_square_norm": mean_square,
        "prior_rms_per_coordinate": None if mean_square is None else math.sqrt(mean_square / N),
        "notes": notes,
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------------------------
# The report as text


def _fmt(value: float | None, missing: str = "inf") -> str:
    """A number for the table: 4 significant digits, `missing` for None."""
    return missing if value is None else f"{value:.4g}"


def format_report(report: dict) -> str:
    """The report of transfer_report as a human-readable table."""
    D = report["D"]
    lines = [
        "PFGM++ hyper-parameter transfer (r = sigma * sqrt(D))",
        f"  D = {D if D == 'inf' else f'{D:g}'}, N = {report['N']}",
        f"  sigma_max = {_fmt(report['sigma_max'])}   ->  r_max = {_fmt(report['r_max'])}",
        f"  sigma_min = {_fmt(report['sigma_min'])}   ->  r_min = {_fmt(report['r_min'])}",
        "",
        f"Training noise, ln sigma ~ N({report['P_mean']:g}, {report['P_std']:g}^2):",
        f"  {'quantile':>8}  {'sigma':>11}  {'r':>11}",
    ]
    lines += [f"  {row['q']:>8g}  {_fmt(row['sigma']):>11}  {_fmt(row['r']):>11}" for row in report["training_noise"]]
    lines += [
        "",
        f"Prior radius ||x||, x ~ p_r_max (diffusion: ||x|| / sqrt(N) ~ sigma_max = {report['sigma_max']:g}):",
        f"  {'quantile':>8}  {'||x||':>11}  {'||x||/sqrt(N)':>13}",
    ]
    lines += [
        f"  {row['q']:>8g}  {_fmt(row['R']):>11}  {_fmt(row['R_per_coordinate']):>13}" for row in report["prior_radius"]
    ]
    lines += [
        f"  E||x||^2 = {_fmt(report['prior_mean_square_norm'])}, "
        f"RMS per coordinate = {_fmt(report['prior_rms_per_coordinate'])}",
    ]
    if report["notes"]:
        lines += [""] + [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines)
