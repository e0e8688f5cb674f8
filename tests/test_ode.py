"""The ODE solvers against closed forms, and the RK45 probability-flow sampler against the analytic denoiser."""

import math

import pytest
import scipy.stats
import torch

from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from torch_utils import rng
from training import ode, samplers
from training.samplers import rk45

# dy/dt = lambda * y per component: y(t) = y0 exp(lambda t). Rates from decay to growth, per sample; moderate,
# so that the problem is well conditioned in both directions.
RATES = torch.tensor([[-1.0, -3.0, 0.5, -2.5], [0.2, -0.5, -2.0, 1.0]], dtype=torch.float64)
Y0 = torch.tensor([[1.0, 2.0, -1.0, 0.5], [-3.0, 0.1, 4.0, 1.0]], dtype=torch.float64)


def _linear(t, y):
    return RATES * y


def _relative_error(y, t):
    """Max over components of |y - exact| / |exact|."""
    exact = Y0 * torch.exp(RATES * t)
    return ((y - exact).abs() / exact.abs()).max().item()


@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-8])
@pytest.mark.parametrize("t0, t1", [(0.0, 2.0), (2.0, 0.5)])
def test_rk45_meets_its_tolerance_on_a_linear_ode(tol, t0, t1):
    """Forwards and backwards, the global relative error stays within a small multiple of rtol."""
    y_start = Y0 * torch.exp(RATES * t0)
    solution = ode.rk45(_linear, y_start, t0, t1, rtol=tol, atol=1e-14)
    assert solution.t == t1
    assert _relative_error(solution.y, t1) < 10 * tol
    assert solution.nfe == 2 + 6 * (solution.steps + solution.rejected)  # f(t0), the starting step, 6 per step
    torch.testing.assert_close(solution.dy, _linear(t1, solution.y))  # first same as last


def test_rk45_evaluations_grow_like_tol_to_the_minus_one_fifth():
    """A fifth-order method: 1000x tighter tolerance costs about 1000^(1/5) ~ 4x the steps."""
    loose, tight = (ode.rk45(_linear, Y0, 0.0, 2.0, rtol=tol, atol=tol) for tol in (1e-4, 1e-7))
    assert 2.5 < tight.steps / loose.steps < 6.5, (loose.steps, tight.steps)


def test_rk45_step_serves_the_hardest_sample():
    """A batch integrates each sample at least as accurately as that sample alone."""
    batch = ode.rk45(_linear, Y0, 0.0, 2.0, rtol=1e-4, atol=1e-4)
    for i in range(2):
        alone = ode.rk45(lambda t, y: RATES[i : i + 1] * y, Y0[i : i + 1], 0.0, 2.0, rtol=1e-4, atol=1e-4)
        exact = Y0[i] * torch.exp(RATES[i] * 2.0)
        assert (batch.y[i] - exact).abs().max() <= (alone.y[0] - exact).abs().max() * 1.01
        assert batch.steps >= alone.steps


@pytest.mark.parametrize("method, order", [("euler", 1), ("improved_euler", 2)])
def test_fixed_step_convergence_order(method, order):
    """Doubling the steps divides the error by 2^order."""
    errors = []
    for n in (50, 100, 200):
        solution = ode.fixed_step(_linear, Y0, torch.linspace(0, 1, n + 1).tolist(), method)
        assert solution.nfe == n * (1 if method == "euler" else 2)
        errors.append(_relative_error(solution.y, 1.0))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(2**order * 0.8 < r < 2**order * 1.25 for r in ratios), ratios


def test_non_finite_drift_raises_runtime_error():
    with pytest.raises(RuntimeError, match="step size collapsed"):
        ode.rk45(lambda t, y: y * (math.nan if t > 1 else 1.0), Y0, 0.0, 2.0)


@pytest.mark.parametrize(
    "kwargs, word",
    [(dict(rtol=0), "rtol"), (dict(atol=-1), "atol"), (dict(rtol=math.nan), "rtol"), (dict(t1=0.0), "t0 and t1")],
)
def test_bad_arguments_raise_value_error(kwargs, word):
    args = dict(t0=0.0, t1=1.0, rtol=1e-5, atol=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        ode.rk45(_linear, Y0, **args)
    with pytest.raises(ValueError, match="method"):
        ode.fixed_step(_linear, Y0, [0.0, 1.0], "rk4")


# ----------------------------------------------------------------------------------------------
# The probability-flow ODE with RK45 (the rk45 solver).


def _toy_data(seed: int = 1) -> torch.Tensor:
    """16 centred points in N = 12 (as tests/test_sampling.py)."""
    data = torch.randn([16, 3, 2, 2], generator=torch.Generator().manual_seed(seed)) * 0.5
    return data - data.mean(dim=0)


@pytest.mark.parametrize("D", [1, 128, math.inf])
def test_rk45_reproduces_finite_data_set(D):
    """With E[y|x] as the network, RK45 maps the prior onto the 16 points with mass 1/16 each, at a loose
    and a tight tolerance, and the loose one needs fewer evaluations."""
    data = _toy_data()
    net = AnalyticDenoiser(data, D)
    options = dict(sigma_min=1e-5 if D == 1 else 0.002, sigma_max=80)  # D = 1: see test_sampling.py
    latents = samplers.prior_latents(net, rng.seeded_generators(range(2000)), solver="rk45", **options)
    evaluations = []
    for tol in (1e-2, 1e-4):
        x, nfe = rk45.sample(net, latents, rtol=tol, atol=tol, **options)
        dist = torch.cdist(x.reshape(len(x), -1).double(), data.reshape(16, -1).double())
        nearest, index = dist.min(dim=1)
        assert nearest.max() < 1e-3
        counts = torch.bincount(index, minlength=16).numpy()
        assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts
        evaluations.append(nfe)
    assert evaluations[0] < evaluations[1], evaluations


def test_rk45_matches_the_exact_ode_solution_on_gaussian_data():
    """N(0, s^2 I) data: x(sigma_min) = x(sigma_max) sqrt(sigma_min^2 + s^2) / sqrt(sigma_max^2 + s^2)."""
    net = GaussianDenoiser(s=0.5, channels=3, resolution=4)
    latents = torch.randn([8, 3, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    x, nfe = rk45.sample(net, latents, sigma_min=0.002, sigma_max=80, rtol=1e-7, atol=1e-7, denoise=False)
    expected = latents * math.sqrt(0.002**2 + 0.25) / math.sqrt(80**2 + 0.25)
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)
    denoised, nfe_denoised = rk45.sample(net, latents, sigma_min=0.002, sigma_max=80, rtol=1e-7, atol=1e-7)
    assert nfe_denoised == nfe  # the final denoising step reuses the last RK45 stage
    torch.testing.assert_close(denoised, expected * 0.25 / (0.25 + 0.002**2), rtol=1e-5, atol=1e-6)


def test_rk45_counts_network_evaluations():
    """The reported count is the number of network calls."""
    net = AnalyticDenoiser(_toy_data(), 8)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(4)), solver="rk45")
    _, nfe = rk45.sample(net, latents, rtol=1e-3, atol=1e-3)
    assert nfe == net.calls > 0
