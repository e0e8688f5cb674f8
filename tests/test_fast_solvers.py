"""DPM-Solver++(2M/3M), UniPC and Restart against mathematics: orders of convergence on the exact denoiser of a
finite data set (D = 2, 128, inf) and on Gaussian data (closed form), DPM-Solver++(2M) against an independent
float64 implementation of the published algorithm, the PFGM++ kernel's transition law, seeds and NFE."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from torch_utils import rng
from training import pfgmpp, samplers
from training.samplers import guidance, multistep, restart, rk45

FAST = ("dpmpp-2m", "dpmpp-3m", "unipc")
ORDERS = {"dpmpp-2m": 2, "dpmpp-3m": 3, "unipc": 3}  # UniPC: the order-2 predictor plus the corrector
# The measured orders (NFE 64 -> 128) must lie within this of the stated ones: 0.25 holds every measured case
# (1.98 - 2.07 for 2M, 2.89 - 3.09 for 3M and UniPC) and rejects a lower-order method (the probe below).
ORDER_TOLERANCE = 0.25


def _points(seed: int = 0) -> torch.Tensor:
    return torch.randn([8, 1, 2, 2], generator=torch.Generator().manual_seed(seed))


def _order(errors, nfes) -> float:
    return math.log(errors[0] / errors[1]) / math.log(nfes[1] / nfes[0])


def _finite_data_errors(net, run, nfes=(64, 128), sigma_min=1.0):
    """RMS errors of D(x(sigma_min)) against RK45 at rtol = atol = 1e-12, levels uniform in ln(sigma)."""
    options = dict(sigma_min=sigma_min, sigma_max=80.0)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(32)), **options).double()
    exact, _ = rk45.sample(net, latents, rtol=1e-12, atol=1e-12, denoise=False, **options)
    reference = net(exact, sigma_min)
    return [(run(latents, n, options) - reference).square().mean().sqrt().item() for n in nfes]


@pytest.mark.parametrize("D", [2, 128, math.inf])
@pytest.mark.parametrize("solver", FAST)
def test_order_on_the_exact_denoiser_of_a_finite_data_set(solver, D):
    net = AnalyticDenoiser(_points(), D)
    sample = lambda latents, n, options: samplers.sample(  # noqa: E731
        net, latents, solver=solver, num_steps=n, discretization="ve", **options)
    nfes = (64, 128)
    errors = _finite_data_errors(net, sample, nfes)
    assert abs(_order(errors, nfes) - ORDERS[solver]) < ORDER_TOLERANCE, errors


@pytest.mark.parametrize("solver", FAST)
def test_order_on_gaussian_data_against_the_closed_form(solver):
    """N(0, I) data at D = inf: x(sigma) = x(sigma_0) sqrt((1 + sigma^2) / (1 + sigma_0^2)); EDM's grid to 0.002."""
    net = GaussianDenoiser(1.0)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(32))).double()
    reference = net(latents * math.sqrt((1 + 0.002**2) / (1 + 80.0**2)), 0.002)
    nfes = (64, 128)
    errors = [(samplers.sample(net, latents, solver=solver, num_steps=n) - reference).square().mean().sqrt().item()
              for n in nfes]
    assert abs(_order(errors, nfes) - ORDERS[solver]) < ORDER_TOLERANCE, errors


def _distributed_3m(sigmas):
    """The widely distributed third-order multistep update (second divided difference weighted by phi_2 / h - 1/2,
    half of the exact integral's weight): a probe that the order test tells a second-order method apart."""
    h = multistep.log_steps(sigmas)
    plan = []
    for i, step in enumerate(h):
        ratio, phi_1 = float(sigmas[i + 1] / sigmas[i]), math.expm1(-step)
        if i == 0:
            outputs = (-phi_1,)
        elif i == 1:
            r = h[0] / step
            phi_2 = phi_1 / step + 1
            outputs = (-phi_1 + phi_2 / r, -phi_2 / r)
        else:
            r0, r1 = h[i - 1] / step, h[i - 2] / step
            phi_2 = phi_1 / step + 1
            phi_3 = phi_2 / step - 0.5
            # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 (D1_0 - D1_1) / (r0 + r1),
            # D2 = (D1_0 - D1_1) / (r0 + r1); x = ratio x - phi_1 m0 + phi_2 D1 - phi_3 D2.
            a = np.zeros(3)
            d10, d11 = np.array([1, -1, 0]) / r0, np.array([0, 1, -1]) / r1
            d1 = d10 + r0 * (d10 - d11) / (r0 + r1)
            d2 = (d10 - d11) / (r0 + r1)
            a += phi_2 * d1 - phi_3 * d2
            a[0] -= phi_1
            outputs = tuple(float(v) for v in a)
        plan.append(multistep.Step(multistep.Combination(ratio, outputs)))
    return plan


def test_the_order_test_rejects_the_distributed_3m_update():
    net = AnalyticDenoiser(_points(), 128)

    def sample(latents, n, options):
        sigmas = multistep.levels(net, num_steps=n, discretization="ve", **options)
        return multistep.integrate(net, latents, sigmas, _distributed_3m(sigmas))[0]

    errors = _finite_data_errors(net, sample)
    assert _order(errors, (64, 128)) < ORDERS["dpmpp-3m"] - ORDER_TOLERANCE, errors  # measured: 2.25


def _numpy_dpmpp_2m(data: np.ndarray, x: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """Lu et al. 2022, Algorithm 2 (DPM-Solver++(2M)), with alpha = 1 and lambda = -ln(sigma), in float64 numpy,
    for the exact denoiser of `data` at D = inf; returns the denoised output at the last level."""

    def denoise(x, sigma):
        d2 = ((x[:, None, :] - data[None, :, :]) ** 2).sum(-1)
        logw = -d2 / (2 * sigma**2)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        return (w / w.sum(axis=1, keepdims=True)) @ data

    lam = -np.log(sigmas)
    previous = None
    for i in range(len(sigmas) - 1):
        current = denoise(x, sigmas[i])
        h = lam[i + 1] - lam[i]
        if previous is None:
            blend = current
        else:
            r = (lam[i] - lam[i - 1]) / h
            blend = (1 + 1 / (2 * r)) * current - 1 / (2 * r) * previous
        x = sigmas[i + 1] / sigmas[i] * x - np.expm1(-h) * blend
        previous = current
    return denoise(x, sigmas[-1])


def test_dpmpp_2m_equals_the_published_algorithm_at_D_inf():
    data = torch.randn([16, 3, 2, 2], generator=torch.Generator().manual_seed(1)) * 0.5
    net = AnalyticDenoiser(data, math.inf)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(16)), solver="dpmpp-2m", num_steps=12)
    ours = samplers.sample(net, latents.double(), solver="dpmpp-2m", num_steps=12)
    sigmas = multistep.levels(net, num_steps=12).numpy()
    theirs = _numpy_dpmpp_2m(data.reshape(16, -1).double().numpy(), latents.reshape(16, -1).double().numpy(), sigmas)
    assert np.abs(ours.reshape(16, -1).numpy() - theirs).max() < 1e-6


@pytest.mark.parametrize("solver", [*FAST, "restart"])
def test_nfe_is_counted_exactly_and_guidance_doubles_it(solver):
    net = AnalyticDenoiser(_points(), 128)
    options = dict(num_steps=10) if solver != "restart" else dict(
        num_steps=10, restart_info='{"0": [3, 2, 0.06, 0.3], "1": [4, 1, 1.0, 2.0]}')
    expected = 10 if solver != "restart" else 2 * 10 - 1 + 2 * 2 * (3 - 1) + 1 * 2 * (4 - 1)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(4)), solver=solver, **options)
    info = samplers.SampleInfo()
    x = samplers.sample(net, latents, solver=solver, generator=rng.seeded_generators(range(4)), info=info, **options)
    assert info.nfe == net.calls == expected
    # Guided by itself, D_g + w (D - D_g) = D at any w: the same samples at twice the evaluations.
    guided = guidance.Guided(net, net, 2.5)
    y = samplers.sample(guided, latents, solver=solver, generator=rng.seeded_generators(range(4)), info=info,
                        **options)
    assert info.nfe == 2 * expected
    torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", [*FAST, "restart"])
def test_samples_do_not_depend_on_the_batch(solver):
    net = AnalyticDenoiser(_points(), 8)
    seeds = list(range(20, 27))

    def run(batch):
        latents = samplers.prior_latents(net, rng.seeded_generators(batch), solver=solver, num_steps=8)
        noise = rng.seeded_generators([s + 10**6 for s in batch])
        return samplers.sample(net, latents, solver=solver, generator=noise, num_steps=8)

    torch.testing.assert_close(run(seeds), torch.cat([run(seeds[:3]), run(seeds[3:])]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("discretization", ["edm", "vp", "ve", "iddpm"])
def test_every_discretization_samples_the_data(discretization):
    """Each preconditioner's grid (EDM, VP, VE, iDDPM's rounded levels) carries the prior onto the data."""
    data = _points()
    net = AnalyticDenoiser(data, 128, sigma_min=0.002, sigma_max=80)
    for solver in FAST:
        options = dict(num_steps=24, discretization=discretization)
        latents = samplers.prior_latents(net, rng.seeded_generators(range(32)), solver=solver, **options)
        x = samplers.sample(net, latents, solver=solver, **options)
        nearest = torch.cdist(x.reshape(32, -1).double(), data.reshape(8, -1).double()).min(dim=1).values
        assert nearest.max() < 0.1, (solver, discretization)  # the points lie ~1 apart; 3M on iddpm's grid: 0.03


def test_restart_without_intervals_is_heun_bitwise():
    net = AnalyticDenoiser(_points(), 128)
    options = dict(num_steps=12, S_churn=5, S_min=0.05, S_max=10)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(6)), num_steps=12)
    heun = samplers.sample(net, latents, generator=rng.seeded_generators(range(6)), **options)
    for info in ("{}", '{"0": [3, 0, 0.06, 0.3]}'):
        ours = samplers.sample(net, latents, solver="restart", restart_info=info,
                               generator=rng.seeded_generators(range(6)), **options)
        assert torch.equal(ours, heun)


def _radial_pvalue(noise: torch.Tensor, sigma: float, D: float) -> float:
    """KS p-value of |n|^2 against the kernel's law at sigma: sigma^2 chi2_N (D = inf), sigma^2 D BetaPrime(N/2, D/2)."""
    N = noise[0].numel()
    sq = noise.reshape(len(noise), -1).double().square().sum(dim=1).numpy()
    if math.isinf(D):
        return scipy.stats.kstest(sq / sigma**2, scipy.stats.chi2(N).cdf).pvalue
    return scipy.stats.kstest(sq / (sigma**2 * D), scipy.stats.betaprime(N / 2, D / 2).cdf).pvalue


@pytest.mark.parametrize("D", [1, 2, 128, math.inf])
def test_transition_noise_carries_the_kernel_to_the_higher_level(D):
    generator = torch.Generator().manual_seed(7)
    noise = pfgmpp.sample_perturbation(torch.zeros([20000, 3, 2, 2], dtype=torch.float64), 0.3, D, generator)
    moved = noise + pfgmpp.transition_noise(noise, 0.3, 2.0, D, generator)
    assert _radial_pvalue(moved, 2.0, D) > 1e-3
    if D <= 2:  # fresh kernel noise of scale sqrt(2^2 - 0.3^2) is not the kernel at 2: the test tells them apart
        naive = noise + pfgmpp.sample_perturbation(noise, math.sqrt(2.0**2 - 0.3**2), D, generator)
        assert _radial_pvalue(naive, 2.0, D) < 1e-6


@pytest.mark.parametrize("D", [2, 128])
def test_restart_renoising_from_the_denoiser_keeps_the_kernel_law(D):
    """Restart's estimate |n| = |x - D(x, t_min)| (y unknown) at the reference's t_min = 0.06, data spacing ~1."""
    data = _points()
    generator = torch.Generator().manual_seed(3)
    y = data[torch.randint(0, 8, [20000], generator=generator)].double()
    x = y + pfgmpp.sample_perturbation(y, 0.06, D, generator)
    estimate = x - AnalyticDenoiser(data, D)(x, 0.06)
    moved = x + pfgmpp.transition_noise(estimate, 0.06, 0.3, D, generator)
    assert _radial_pvalue(moved - y, 0.3, D) > 1e-3


@pytest.mark.parametrize("text, word", [
    ("[1, 2]", "JSON object"), ("{bad", "JSON"), ('{"0": [1, 2, 0.1, 0.3]}', "N must be"),
    ('{"0": [3, 1, 0.3, 0.1]}', "t_min < t_max"), ('{"0": [3, 1, 0.06, 1000]}', "t_max"),
    ('{"0": [3, 1, 79, 85]}', "first level"),
])  # fmt: skip
def test_bad_restart_intervals_are_refused(text, word):
    net = AnalyticDenoiser(_points(), 128, sigma_max=80)
    with pytest.raises(ValueError, match=word):
        samplers.sample(net, torch.zeros([1, 1, 2, 2]), solver="restart", restart_info=text)


def test_restart_default_is_the_references_example():
    assert restart.parse_restarts(restart.DEFAULT_RESTARTS) == [(3, 2, 0.06, 0.3)]


def test_unipc_order_is_checked():
    net = AnalyticDenoiser(_points(), 128)
    with pytest.raises(ValueError, match="order"):
        samplers.sample(net, torch.zeros([1, 1, 2, 2]), solver="unipc", order=4)
