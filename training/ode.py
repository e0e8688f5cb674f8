"""Batched ODE solvers in torch: adaptive Dormand-Prince RK5(4) and fixed-step Euler / improved Euler.

The problem is dy/dt = f(t, y) with a batched state y of shape [B, ...] (one sample per row) and one
time t shared by the whole batch, a Python float. Everything stays on the state's device.

Step-size control of `rk45` (Hairer, Norsett & Wanner, Solving ODEs I, II.4; the controller of
`scipy.integrate.solve_ivp(method="RK45")`): the local error estimate of each sample is measured as
the RMS over its components of err / (atol + rtol * max(|y|, |y_new|)); the batch shares one step,
accepted when the largest per-sample error is <= 1. Reading that one scalar is the single
host-device synchronisation per attempted step; nothing else in the loop waits for the device.
Because the step is shared, a sample is integrated at least as accurately as it would be alone
(its result depends on its batch companions only within the tolerance).

The last stage of an accepted Dormand-Prince step is f at the new point ("first same as last"), so
a step costs 6 evaluations and the solution also returns f(t1, y(t1)) for free (`dy`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Drift = Callable[[float, torch.Tensor], torch.Tensor]

# Dormand & Prince (1980), RK5(4)7M: nodes c, stages a, 5th-order weights b (propagated), and
# e = b - b_hat, the difference to the embedded 4th-order weights (the local error estimate).
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_ORDER = 5  # of the error estimate's lower method + 1: the step scales with err^(-1/5)
_SAFETY, _MIN_FACTOR, _MAX_FACTOR = 0.9, 0.2, 10.0

FIXED_METHODS = ("euler", "improved_euler")


@dataclass
class ODESolution:
    """Result of a solve: final state, time, evaluations of f, accepted/rejected steps, f at the end."""

    y: torch.Tensor
    t: float
    nfe: int
    steps: int
    rejected: int = 0
    dy: torch.Tensor | None = None


class _Counted:
    """f with a count of its evaluations."""

    def __init__(self, f: Drift):
        self.f, self.nfe = f, 0

    def __call__(self, t: float, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.f(t, y)


def _rms_per_sample(x: torch.Tensor) -> torch.Tensor:
    """Root mean square over each sample's components: Tensor[B]."""
    return x.reshape(x.shape[0], -1).square().mean(dim=1).sqrt()


def _check_tolerances(rtol: float, atol: float) -> None:
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0 (e.g. 1e-5), got {value!r}")


def _initial_step(f: _Counted, t0: float, y0: torch.Tensor, f0: torch.Tensor, direction: float,
                  rtol: float, atol: float) -> float:
    """Hairer-Norsett-Wanner's starting step (one extra evaluation), the smallest over the batch."""
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms_per_sample(y0 / scale), _rms_per_sample(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1).min().item()
    f1 = f(t0 + direction * h0, y0 + direction * h0 * f0)
    d2 = (_rms_per_sample((f1 - f0) / scale) / h0).max().item()
    d1_max = d1.max().item()
    if max(d1_max, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1_max, d2)) ** (1 / _ORDER)
    return min(100 * h0, h1)


def _dopri_attempt(f: _Counted, t: float, y: torch.Tensor, k1: torch.Tensor, h: float):
    """One Dormand-Prince step of size h: (y_new, f(t + h, y_new), error estimate)."""
    k = [k1]
    for i in range(1, 7):
        y_stage = y
        for a, k_j in zip(_A[i], k):
            if a != 0.0:
                y_stage = y_stage + (h * a) * k_j
        k.append(f(t + _C[i] * h, y_stage))
    y_new = y_stage  # the 7th stage is evaluated at the 5th-order solution (FSAL)
    error = sum((h * e) * k_j for e, k_j in zip(_E, k) if e != 0.0)
    return y_new, k[6], error


def rk45(
    f: Drift,
    y0: torch.Tensor,
    t0: float,
    t1: float,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    first_step: float | None = None,
    max_steps: int = 100_000,
) -> ODESolution:
    """Integrate dy/dt = f(t, y) from t0 to t1 (either direction) with adaptive Dormand-Prince RK5(4).

    `y0` is [B, ...]; the step is shared by the batch and controlled by the largest per-sample error
    (see the module docstring). Returns y(t1), the evaluations of f used (`nfe`) and f(t1, y(t1)).
    Raises RuntimeError if the step size collapses (the drift is not finite or the ODE is too stiff).
    """
    _check_tolerances(rtol, atol)
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise ValueError(f"t0 and t1 must be finite and differ, got {t0} and {t1}")
    if not isinstance(y0, torch.Tensor) or y0.ndim < 1 or y0.shape[0] == 0:
        raise ValueError("y0 must be a non-empty batched tensor [B, ...]")
    counted = _Counted(f)
    direction = 1.0 if t1 > t0 else -1.0
    t, y = t0, y0
    k1 = counted(t, y)
    h_abs = abs(first_step) if first_step else _initial_step(counted, t, y, k1, direction, rtol, atol)
    steps = rejected = 0
    min_step = 10 * math.ulp(max(abs(t0), abs(t1)))
    while direction * (t1 - t) > 0:
        if steps + rejected >= max_steps:
            raise RuntimeError(f"rk45 took more than max_steps={max_steps} steps; loosen rtol/atol or raise max_steps")
        rejected_here = False
        while True:
            if h_abs < min_step:
                raise RuntimeError(f"rk45 step size collapsed at t={t:.6g} (non-finite drift or a too stiff ODE)")
            t_new = t + direction * h_abs
            if direction * (t_new - t1) > 0 or abs(t1 - t_new) < min_step:
                t_new = t1
            h = t_new - t
            y_new, k_new, error = _dopri_attempt(counted, t, y, k1, h)
            scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            err = _rms_per_sample(error / scale).max().item()  # the one host sync of the step
            if math.isfinite(err) and err <= 1.0:
                factor = _MAX_FACTOR if err == 0 else min(_MAX_FACTOR, _SAFETY * err ** (-1 / _ORDER))
                h_abs = abs(h) * (min(1.0, factor) if rejected_here else factor)
                break
            factor = _MIN_FACTOR if not math.isfinite(err) else max(_MIN_FACTOR, _SAFETY * err ** (-1 / _ORDER))
            h_abs = abs(h) * factor
            rejected, rejected_here = rejected + 1, True
        t, y, k1 = t_new, y_new, k_new
        steps += 1
    return ODESolution(y=y, t=t, nfe=counted.nfe, steps=steps, rejected=rejected, dy=k1)


def fixed_step(f: Drift, y0: torch.Tensor, ts: Sequence[float], method: str = "euler") -> ODESolution:
    """Integrate dy/dt = f(t, y) over the grid ts with forward Euler or improved Euler (Heun's method)."""
    if method not in FIXED_METHODS:
        raise ValueError(f"method must be one of {', '.join(FIXED_METHODS)}, got {method!r}")
    ts = [float(t) for t in ts]
    if len(ts) < 2:
        raise ValueError(f"ts must hold at least two times, got {len(ts)}")
    counted = _Counted(f)
    y = y0
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t_cur
        d_cur = counted(t_cur, y)
        if method == "euler":
            y = y + h * d_cur
        else:  # improved Euler: average the slopes at both ends of the Euler step
            d_next = counted(t_next, y + h * d_cur)
            y = y + (0.5 * h) * (d_cur + d_next)
    return ODESolution(y=y, t=ts[-1], nfe=counted.nfe, steps=len(ts) - 1)
