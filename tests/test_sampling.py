"""The sampler against exact answers: a finite data set (analytic denoiser) and Gaussian data (closed form)."""

import math

import pytest
import scipy.stats
import torch

from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from torch_utils import rng
from training import samplers, schedules
from training.samplers.edm import SCALINGS, SCHEDULES
from training.samplers.levels import DISCRETIZATIONS, noise_levels


def _toy_data(seed: int = 1) -> torch.Tensor:
    """16 centred points in N = 12 (shape [16, 3, 2, 2]), spread ~ sigma_data = 0.5."""
    data = torch.randn([16, 3, 2, 2], generator=torch.Generator().manual_seed(seed)) * 0.5
    return data - data.mean(dim=0)


@pytest.mark.parametrize("D", [1, 4, 128, math.inf])
def test_analytic_denoiser_reproduces_finite_data_set(D):
    """Sampling with E[y|x] as the network maps the prior onto the data, each point with mass 1/16.

    sigma_min is 1e-5: at D = 1 the kernel's heavy tail leaves ~0.6% of samples off the data at
    sigma_min = 0.002 (R^2 / r^2 ~ BetaPrime(6, 0.5) has P(X > x) ~ x^-1/2), as the mathematics says.
    """
    data = _toy_data()
    net = AnalyticDenoiser(data, D)
    options = dict(num_steps=40, sigma_min=1e-5, sigma_max=80)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(3000)), **options)
    x = samplers.sample(net, latents, **options)
    dist = torch.cdist(x.reshape(len(x), -1).double(), data.reshape(16, -1).double())
    nearest, index = dist.min(dim=1)
    assert nearest.max() < 1e-3
    counts = torch.bincount(index, minlength=16).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts


def _gaussian_final(net, latents, sigma_0):
    """Exact ODE solution for N(0, s^2 I) data: x(0) = x(sigma_0) s / sqrt(sigma_0^2 + s^2)."""
    return latents.double() * net.s / math.sqrt(sigma_0**2 + net.s**2)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_convergence_order_on_gaussian_data(solver, order):
    """Doubling the steps divides the error by 2^order (Euler 1, Heun 2)."""
    net = GaussianDenoiser(s=0.5, channels=3, resolution=4)
    latents = torch.randn([8, 3, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    errors = []
    for n in (16, 32, 64):
        out = samplers.sample(net, latents, num_steps=n, sigma_min=1e-7, sigma_max=80, solver=solver)
        errors.append((out - _gaussian_final(net, latents, 80.0)).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(2**order * 0.7 < r < 2**order * 1.4 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("discretization", DISCRETIZATIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_every_ablation_solves_the_same_ode(discretization, schedule, scaling):
    """EDM Table 1: each discretisation, schedule and scaling integrates the same probability-flow ODE,
    converging to its exact solution at second order (Heun).

    Compared at the last non-zero noise level: the final step to sigma = 0 of the VP schedule is a
    coarse Euler step through the schedule's singular point, by construction of that ablation.
    """
    net = GaussianDenoiser(s=0.5, channels=1, resolution=2)
    errors = []
    for num_steps in (100, 200):
        options = dict(num_steps=num_steps, sigma_min=0.002, sigma_max=80, discretization=discretization)
        steps = noise_levels(net, **options)
        sigma_0, sigma_last = float(steps[0]), float(steps[-1])
        latents = torch.randn([16, 1, 2, 2], generator=torch.Generator().manual_seed(3), dtype=torch.float64) * sigma_0
        states = {}
        record = lambda i, a, b, x, d: states.update({i: x})  # noqa: E731
        samplers.sample(net, latents, schedule=schedule, scaling=scaling, callback=record, **options)
        expected = latents * math.sqrt(sigma_last**2 + net.s**2) / math.sqrt(sigma_0**2 + net.s**2)
        errors.append(((states[num_steps - 2] - expected).abs().max() / expected.abs().max()).item())
    assert errors[1] < 0.1 and 3.0 < errors[0] / errors[1] < 5.5, errors


def test_images_do_not_depend_on_batch():
    """Seed k gives the same image alone or in a batch of 7, churn included."""
    net = AnalyticDenoiser(_toy_data(), D=8)
    seeds = list(range(100, 107))
    options = dict(num_steps=12, S_churn=20, S_min=0.01, S_max=50)

    def run(batch_seeds):
        latents = samplers.prior_latents(net, rng.seeded_generators(batch_seeds))
        churn = rng.seeded_generators([s + 10**6 for s in batch_seeds])
        return samplers.sample(net, latents, generator=churn, **options)

    together = run(seeds)
    alone = torch.cat([run([s]) for s in seeds])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_one_step_heun_equals_euler():
    """Heun skips its correction on the last step, so a one-step sampler is Euler; two steps differ."""
    net = AnalyticDenoiser(_toy_data(), D=4)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(5)))
    one = [samplers.sample(net, latents, num_steps=1, solver=s) for s in ("heun", "euler")]
    two = [samplers.sample(net, latents, num_steps=2, solver=s) for s in ("heun", "euler")]
    assert torch.equal(one[0], one[1])
    assert not torch.allclose(two[0], two[1])


def test_no_churn_is_deterministic_and_draws_nothing():
    """S_churn = 0 draws nothing from the generator; churn > 0 draws from it and depends on it."""
    net = AnalyticDenoiser(_toy_data(), D=16)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(4)), num_steps=8)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    a = samplers.sample(net, latents, num_steps=8, generator=g)
    b = samplers.sample(net, latents, num_steps=8, generator=g)
    assert torch.equal(a, b) and torch.equal(g.get_state(), state)
    churned = [
        samplers.sample(net, latents, num_steps=8, S_churn=40, generator=torch.Generator().manual_seed(s))
        for s in (0, 0, 1)
    ]
    assert torch.equal(churned[0], churned[1]) and not torch.equal(churned[0], churned[2])


def test_callback_sees_every_step():
    """The callback gets each step in order with decreasing sigma, ending at 0."""
    net = GaussianDenoiser(0.5)
    seen = []
    samplers.sample(net, torch.randn([2, 1, 2, 2]) * 80, num_steps=5, callback=lambda i, s0, s1, x, d: seen.append((i, s0, s1)))
    assert [i for i, _, _ in seen] == list(range(5))
    assert seen[0][1] == pytest.approx(80) and seen[-1][2] == 0
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:]))


def test_noise_levels_follow_each_discretisation():
    """Endpoints and shapes of the EDM (eq. 5), VP, VE and iDDPM step sequences."""
    net = GaussianDenoiser(0.5)
    edm = noise_levels(net, num_steps=18)
    assert edm[0] == pytest.approx(80) and edm[-1] == pytest.approx(0.002) and torch.all(edm[:-1] > edm[1:])
    i = torch.arange(18, dtype=torch.float64)
    torch.testing.assert_close(edm, (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)
    for disc in ("vp", "ve"):
        levels = noise_levels(net, num_steps=10, sigma_min=0.01, sigma_max=50, discretization=disc)
        assert levels[0] == pytest.approx(50) and levels[-1] == pytest.approx(0.01)
    grid = schedules.iddpm_sigmas()
    levels = noise_levels(net, num_steps=10, discretization="iddpm")
    assert all(torch.isclose(grid, v).any() for v in levels) and torch.all(levels[:-1] > levels[1:])


def test_sigma_range_is_clamped_to_the_network():
    """A network trained on [0.02, 100] is never asked below 0.02."""
    net = GaussianDenoiser(0.5)
    net.sigma_min, net.sigma_max = 0.02, 50.0
    levels = noise_levels(net, num_steps=6)
    assert levels[0] == pytest.approx(50) and levels[-1] == pytest.approx(0.02)


@pytest.mark.parametrize(
    "options, word",
    [
        (dict(solver="rk4"), "solver"),
        (dict(discretization="cosine"), "discretization"),
        (dict(schedule="exp"), "schedule"),
        (dict(scaling="ve"), "scaling"),
        (dict(num_steps=0), "num_steps"),
        (dict(sigma_min=10, sigma_max=1), "sigma_min"),
        (dict(alpha=0), "alpha"),
        (dict(S_churn=-1), "S_churn"),
        (dict(rho=0), "rho"),
    ],
)
def test_bad_options_raise_value_error(options, word):
    net = GaussianDenoiser(0.5)
    with pytest.raises(ValueError, match=word):
        samplers.sample(net, torch.zeros([1, 1, 2, 2]), **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampler_makes_no_host_sync_on_gpu():
    """The sampling loop runs without a host-device synchronisation."""
    net = GaussianDenoiser(0.5, channels=3, resolution=8)
    latents = torch.randn([4, 3, 8, 8], device="cuda") * 80
    samplers.sample(net, latents, num_steps=4)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        samplers.sample(net, latents, num_steps=6, S_churn=10)
    finally:
        torch.cuda.set_sync_debug_mode("default")
