"""Tests of the PFGM++ kernel (training/pfgmpp.py) against mathematics, with scipy as the oracle.

Facts checked (see PFGMPP_MATH.md): with r = sigma * sqrt(D) the kernel p_r(x | y) is a multivariate
Student-t with D degrees of freedom and scale sigma * I, so ||n||^2 / r^2 ~ BetaPrime(N/2, D/2), the
direction n / ||n|| is uniform on the sphere, D -> inf is N(0, sigma^2 I), and the posterior mean over
a finite data set is a softmax of the kernel's log-density. Every random test uses fixed seeds, so a
KS p-value threshold of 1e-3 is deterministic, not flaky.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch

from torch_utils import rng
from training import pfgmpp

P_MIN = 1e-3  # KS acceptance threshold (fixed seeds: deterministic)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zeros(batch: int, N: int, dtype=torch.float32) -> torch.Tensor:
    """A [B, N] batch, or [B, 3, H, W] when N = 3 * H * H (image shapes)."""
    side = math.isqrt(N // 3)
    if N >= 3 * 32 * 32 and 3 * side * side == N:
        return torch.zeros(batch, 3, side, side, dtype=dtype)
    return torch.zeros(batch, N, dtype=dtype)


def _sq_norms(n: torch.Tensor) -> np.ndarray:
    """||n_i||^2 per sample, in float64 (heavy tails overflow float32 squares)."""
    return torch.linalg.vector_norm(n.reshape(n.shape[0], -1), dim=1, dtype=torch.float64).square().numpy()


def _ks_p(samples, dist) -> float:
    return scipy.stats.kstest(np.asarray(samples), dist.cdf).pvalue


# ----------------------------------------------------------------------------------------------
# Radial law: ||n||^2 / r^2 ~ BetaPrime(N/2, D/2)


@pytest.mark.parametrize(
    "N, D, batch",
    [(2, 1, 4000), (3072, 1, 2000), (3072, 2, 2000), (3072, 128, 2000), (3072, 2048, 2000), (196608, 128, 300)],
)
def test_radius_is_betaprime(N, D, batch):
    """||n||^2 / (sigma^2 D) ~ BetaPrime(N/2, D/2) (the PFGM++ radial law), exact for every D."""
    sigma = 0.7
    n = pfgmpp.sample_perturbation(_zeros(batch, N), sigma, D, generator=_gen(1000 + N + D))
    ratio = _sq_norms(n) / (sigma**2 * D)
    assert _ks_p(ratio, scipy.stats.betaprime(N / 2, D / 2)) > P_MIN


@pytest.mark.parametrize("D", [1.0, 128.0, math.inf])
def test_radius_is_betaprime_from_counter_streams(D):
    """Training's per-sample counter-based streams give the same exact radial law (chi-square at D = inf)."""
    batch, N, sigma = 2000, 3072, 0.7
    streams = rng.sample_streams((5, 9, 0), range(batch))
    n = pfgmpp.sample_perturbation(_zeros(batch, N), sigma, D, generator=streams)
    if math.isinf(D):
        assert _ks_p(_sq_norms(n) / sigma**2, scipy.stats.chi2(N)) > P_MIN
    else:
        assert _ks_p(_sq_norms(n) / (sigma**2 * D), scipy.stats.betaprime(N / 2, D / 2)) > P_MIN


def test_ks_rejects_reference_clipped_sampler():
    """Power check: the reference code's clipped draw (B ~ Beta clipped to [1e-3, 1-1e-3]) fails the same test."""
    N, D, batch, r = 3072, 1.0, 2000, 1.0
    rs = np.random.default_rng(0)
    B = np.clip(rs.beta(N / 2, D / 2, size=batch), 1e-3, 1 - 1e-3)
    R = r * np.sqrt(B / (1 - B))
    assert _ks_p(R**2 / r**2, scipy.stats.betaprime(N / 2, D / 2)) < 1e-6


@pytest.mark.parametrize("D", [1.0, 128.0])
@pytest.mark.parametrize("sigma_shape", ["[B]", "[B,1,1,1]"])
def test_radius_with_per_sample_sigma(D, sigma_shape):
    """With sigma_i per sample, ||n_i||^2 / (sigma_i^2 D) ~ BetaPrime(N/2, D/2) for all i together."""
    batch, N = 2000, 3072
    sigma = torch.exp(torch.linspace(math.log(0.01), math.log(100.0), batch, dtype=torch.float64))
    sigma_arg = sigma if sigma_shape == "[B]" else sigma.reshape(batch, 1, 1, 1)
    n = pfgmpp.sample_perturbation(_zeros(batch, N), sigma_arg, D, generator=_gen(7))
    assert n.shape == (batch, 3, 32, 32)
    ratio = _sq_norms(n) / (sigma.numpy() ** 2 * D)
    assert _ks_p(ratio, scipy.stats.betaprime(N / 2, D / 2)) > P_MIN


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 1.5, 64.0, 5e6])
def test_internal_gamma_sampler(alpha):
    """_log_standard_gamma(alpha).exp() ~ Gamma(alpha, 1) (Marsaglia-Tsang, boosted for alpha < 1)."""
    y = pfgmpp._log_standard_gamma(alpha, 20000, _gen(11), "cpu").exp()
    assert y.dtype == torch.float64 and y.shape == (20000,)
    assert bool(torch.all(torch.isfinite(y) & (y > 0)))
    assert _ks_p(y.numpy(), scipy.stats.gamma(alpha)) > P_MIN


# ----------------------------------------------------------------------------------------------
# Direction and limits


@pytest.mark.parametrize("D", [0.5, 1.0, 128.0, math.inf])
def test_direction_is_uniform_on_sphere_N3(D):
    """In N = 3 a uniform direction has each coordinate ~ Uniform(-1, 1) (Archimedes) and mean 0."""
    batch = 4000
    n = pfgmpp.sample_perturbation(torch.zeros(batch, 3), 1.3, D, generator=_gen(21)).double()
    u = (n / n.norm(dim=1, keepdim=True)).numpy()
    # Each coordinate has variance 1/3, so the mean of 4000 has sd 0.0091; 5 sd is 0.046.
    assert np.all(np.abs(u.mean(axis=0)) < 0.046)
    for k in range(3):
        assert _ks_p(u[:, k], scipy.stats.uniform(-1, 2)) > P_MIN


@pytest.mark.parametrize("D", [1.0, 128.0])
def test_direction_is_uniform_on_circle_N2(D):
    """In N = 2 the angle of n is Uniform(-pi, pi)."""
    n = pfgmpp.sample_perturbation(torch.zeros(4000, 2), 0.5, D, generator=_gen(22)).double().numpy()
    angle = np.arctan2(n[:, 1], n[:, 0])
    assert _ks_p(angle, scipy.stats.uniform(-np.pi, 2 * np.pi)) > P_MIN


def test_large_D_is_gaussian():
    """D = 1e7: coordinates are N(0, sigma^2) (the D -> inf limit is the EDM / VE kernel)."""
    sigma = 2.5
    n = pfgmpp.sample_perturbation(torch.zeros(500, 1000), sigma, 1e7, generator=_gen(31))
    assert _ks_p(n.double().numpy().ravel(), scipy.stats.norm(scale=sigma)) > P_MIN


@pytest.mark.parametrize("sigma", [0.7, 2.5, 80.0])
@pytest.mark.parametrize("shape", [(4, 5), (3, 3, 8, 8)])
def test_infinite_D_is_exactly_scaled_randn(sigma, shape):
    """D = inf takes the Gaussian path: exactly sigma * torch.randn(shape, generator) with the same seed."""
    n = pfgmpp.sample_perturbation(torch.zeros(shape), sigma, math.inf, generator=_gen(41))
    assert torch.equal(n, sigma * torch.randn(shape, generator=_gen(41)))


@pytest.mark.parametrize("D", [0.5, 1.0, 1e7])
def test_no_overflow_at_256px(D):
    """N = 196608 (3x256x256): draws are finite for heavy tails (D <= 1) and for D = 1e7."""
    for seed in range(3):
        n = pfgmpp.sample_perturbation(torch.zeros(2, 3, 256, 256), 80.0, D, generator=_gen(seed))
        assert bool(torch.isfinite(n).all())


def test_no_overflow_heavy_tails_N2():
    """D = 0.5, N = 2: Y ~ Gamma(0.25) gets tiny, so ||n|| is huge, but every draw stays finite."""
    n = pfgmpp.sample_perturbation(torch.zeros(200000, 2), 1.0, 0.5, generator=_gen(51))
    assert bool(torch.isfinite(n).all())
    assert bool((n.abs().amax(dim=1) > 0).all())


# ----------------------------------------------------------------------------------------------
# Generators


@pytest.mark.parametrize("D", [0.5, 1.0, 128.0, math.inf])
def test_per_sample_generators_do_not_depend_on_batch(D):
    """With one generator per sample, sample i's noise is the same in a batch of 1 and of 7."""
    seeds = [100 + i for i in range(7)]
    batch = pfgmpp.sample_perturbation(torch.zeros(7, 3, 4, 4), 1.5, D, generator=rng.seeded_generators(seeds))
    for i, seed in enumerate(seeds):
        alone = pfgmpp.sample_perturbation(torch.zeros(1, 3, 4, 4), 1.5, D, generator=rng.seeded_generators([seed]))
        assert torch.equal(batch[i], alone[0])


@pytest.mark.parametrize("D", [1.0, math.inf])
def test_single_generator_reproduces(D):
    """The same seed gives the same draw; another seed gives another."""
    draw = lambda seed: pfgmpp.sample_perturbation(torch.zeros(4, 10), 1.0, D, generator=_gen(seed))
    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def test_prior_has_kernel_distribution():
    """sample_prior(shape, sigma_max, D) is the kernel at sigma_max centred at 0: radial BetaPrime law."""
    N, D, sigma_max = 3072, 64.0, 80.0
    x = pfgmpp.sample_prior([2000, 3, 32, 32], sigma_max, D, generator=_gen(61))
    ratio = _sq_norms(x) / (sigma_max**2 * D)
    assert _ks_p(ratio, scipy.stats.betaprime(N / 2, D / 2)) > P_MIN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1.0, math.inf])
def test_prior_device_and_dtype(dtype, D):
    """The prior lands on the requested device and dtype (and on the generator's device by default)."""
    x = pfgmpp.sample_prior((3, 2, 4, 4), 80.0, D, generator=_gen(0), device="cpu", dtype=dtype)
    assert x.shape == (3, 2, 4, 4) and x.dtype == dtype and x.device.type == "cpu"
    y = pfgmpp.sample_prior((3, 5), 80.0, D, generator=rng.seeded_generators([1, 2, 3]))
    assert y.device.type == "cpu" and y.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [1.0, math.inf])
def test_prior_on_cuda(D):
    """With a CUDA generator the prior is drawn on the GPU, in the requested dtype."""
    g = torch.Generator("cuda").manual_seed(0)
    x = pfgmpp.sample_prior((4, 3, 8, 8), 80.0, D, generator=g, dtype=torch.float16)
    assert x.device.type == "cuda" and x.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# Log-density


@pytest.mark.parametrize(
    "N, D, sigma",
    [(1, 0.5, 1.0), (1, 1.0, 0.3), (2, 3.0, 2.0), (5, 1.0, 0.7), (16, 0.5, 5.0), (16, 128.0, 0.1),
     (64, 3.0, 1.0), (64, 128.0, 80.0), (3, math.inf, 0.5), (64, math.inf, 2.0)],
)
def test_log_prob_matches_scipy(N, D, sigma):
    """log_prob = scipy multivariate_t(0, sigma^2 I, df=D).logpdf; multivariate_normal at D = inf."""
    rs = np.random.default_rng(N)
    x = rs.standard_normal((6, N)) * sigma * np.array([0.0, 0.1, 1.0, 3.0, 30.0, 1000.0])[:, None]
    if math.isinf(D):
        ref = scipy.stats.multivariate_normal(mean=np.zeros(N), cov=sigma**2 * np.eye(N)).logpdf(x)
    else:
        ref = scipy.stats.multivariate_t(loc=np.zeros(N), shape=sigma**2 * np.eye(N), df=D).logpdf(x)
    got = pfgmpp.log_prob(torch.from_numpy(x), sigma, D)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.atleast_1d(ref), rtol=1e-10, atol=1e-12)


def test_log_prob_per_sample_sigma():
    """Each sample uses its own sigma."""
    N, D = 4, 3.0
    sigma = np.array([0.1, 1.0, 10.0])
    x = np.random.default_rng(1).standard_normal((3, N))
    ref = [scipy.stats.multivariate_t(np.zeros(N), s**2 * np.eye(N), df=D).logpdf(xi) for s, xi in zip(sigma, x)]
    got = pfgmpp.log_prob(torch.from_numpy(x), torch.from_numpy(sigma), D)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)


def _density(points: np.ndarray, sigma: float, D: float) -> np.ndarray:
    return np.exp(pfgmpp.log_prob(torch.from_numpy(points), sigma, D).numpy())


@pytest.mark.parametrize("D", [1.0, 3.0])
def test_log_prob_integrates_to_one_N1(D):
    """The density integrates to 1 over the real line (N = 1)."""
    sigma = 0.7
    f = lambda t: _density(np.array([[t]]), sigma, D)[0]
    total = sum(scipy.integrate.quad(f, a, b, limit=200)[0] for a, b in [(-np.inf, 0), (0, np.inf)])
    assert abs(total - 1.0) < 1e-6


@pytest.mark.parametrize("D", [1.0, 3.0, math.inf])
def test_log_prob_integrates_to_one_N2(D):
    """The density integrates to 1 over the plane: 2 pi * int_0^inf rho p(rho) d rho (N = 2, isotropic)."""
    sigma = 1.3
    f = lambda rho: rho * _density(np.array([[rho, 0.0]]), sigma, D)[0]
    total = 2 * np.pi * sum(scipy.integrate.quad(f, a, b, limit=200)[0] for a, b in [(0, 10 * sigma), (10 * sigma, np.inf)])
    assert abs(total - 1.0) < 1e-6


# ----------------------------------------------------------------------------------------------
# Posterior mean (the analytic denoiser)


def _brute_posterior_mean(x: np.ndarray, sigma: np.ndarray, D: float, data: np.ndarray) -> np.ndarray:
    """E[y | x] = sum_i softmax_i(log p_r(x | y_i)) y_i, log p from scipy, one row of x at a time."""
    N = x.shape[1]
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        if math.isinf(D):
            kernel = scipy.stats.multivariate_normal(mean=np.zeros(N), cov=sigma[b] ** 2 * np.eye(N))
        else:
            kernel = scipy.stats.multivariate_t(loc=np.zeros(N), shape=sigma[b] ** 2 * np.eye(N), df=D)
        w = scipy.special.softmax(kernel.logpdf(x[b] - data))
        out[b] = w @ data
    return out


@pytest.mark.parametrize("D", [1.0, 4.0, 128.0, math.inf])
@pytest.mark.parametrize("per_sample", [False, True])
def test_posterior_mean_matches_brute_force(D, per_sample):
    """posterior_mean equals a direct float64 softmax of scipy log-densities over the data set."""
    rs = np.random.default_rng(3)
    N, M, B = 6, 40, 5
    data = rs.standard_normal((M, N))
    x = data[rs.integers(0, M, B)] + 0.8 * rs.standard_normal((B, N))
    sigma = np.array([0.3, 0.6, 1.0, 2.0, 5.0]) if per_sample else np.full(B, 0.8)
    sigma_arg = torch.from_numpy(sigma) if per_sample else 0.8
    got = pfgmpp.posterior_mean(torch.from_numpy(x), sigma_arg, D, torch.from_numpy(data), chunk=7)
    np.testing.assert_allclose(got.numpy(), _brute_posterior_mean(x, sigma, D, data), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("D", [1.0, math.inf])
def test_posterior_mean_chunk_invariant(D):
    """The streaming log-sum-exp gives the same result whatever the chunk size."""
    g = _gen(71)
    data = torch.randn(50, 2, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.2, 0.5, 1.0, 3.0], dtype=torch.float64)
    results = [pfgmpp.posterior_mean(x, sigma, D, data, chunk=c) for c in (1, 3, 1000)]
    assert results[0].shape == x.shape
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("D", [0.5, 1.0, 128.0, math.inf])
def test_posterior_mean_single_point(D):
    """With one data point the posterior is a point mass: E[y | x] = y for every x and sigma."""
    g = _gen(81)
    y = torch.randn(1, 8, generator=g, dtype=torch.float64)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64) * torch.tensor([0.1, 1, 10, 100, 1000.0])[:, None]
    got = pfgmpp.posterior_mean(x, torch.tensor([0.01, 0.1, 1, 10, 100.0]), D, y)
    torch.testing.assert_close(got, y.expand(5, 8), rtol=1e-14, atol=1e-14)


def test_posterior_mean_small_sigma_gaussian_is_nearest_point():
    """D = inf: as sigma -> 0 the weights exp(-||x - y_i||^2 / 2 sigma^2) pick the nearest data point."""
    rs = np.random.default_rng(5)
    data = rs.standard_normal((30, 4))
    x = rs.standard_normal((8, 4))
    nearest = data[np.argmin(((x[:, None, :] - data[None]) ** 2).sum(-1), axis=1)]
    got = pfgmpp.posterior_mean(torch.from_numpy(x), 1e-4, math.inf, torch.from_numpy(data))
    np.testing.assert_allclose(got.numpy(), nearest, rtol=0, atol=1e-12)


@pytest.mark.parametrize("D", [1.0, 4.0, 128.0])
def test_posterior_mean_small_sigma_student_t_limit(D):
    """Finite D: as r -> 0 the weights (||x - y_i||^2 + r^2)^(-(N+D)/2) tend to ||x - y_i||^(-(N+D)).

    The heavy-tailed kernel does not collapse onto the nearest point: the limit is this
    inverse-distance weighting (relative correction ~ r^2 / ||x - y_i||^2 = 1e-12 * D here).
    """
    rs = np.random.default_rng(5)
    N = 4
    data = rs.standard_normal((30, N))
    x = rs.standard_normal((8, N))
    log_d = 0.5 * np.log(((x[:, None, :] - data[None]) ** 2).sum(-1))
    expected = scipy.special.softmax(-(N + D) * log_d, axis=1) @ data
    got = pfgmpp.posterior_mean(torch.from_numpy(x), 1e-6, D, torch.from_numpy(data))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("D", [1.0, 128.0, math.inf])
def test_posterior_mean_on_a_data_point(D):
    """x within 1e-6 of data point k, sigma = 1e-8, others ~1 away: the posterior mean is y_k."""
    rs = np.random.default_rng(6)
    data = rs.standard_normal((30, 4))
    k = np.array([0, 7, 29])
    x = data[k] + 1e-6 * rs.standard_normal((3, 4))
    got = pfgmpp.posterior_mean(torch.from_numpy(x), 1e-8, D, torch.from_numpy(data))
    np.testing.assert_allclose(got.numpy(), data[k], rtol=0, atol=1e-12)


def test_posterior_mean_keeps_dtype():
    """The result is shaped and typed like x (the computation itself is float64)."""
    x = torch.randn(3, 2, 2, generator=_gen(0))
    got = pfgmpp.posterior_mean(x, 1.0, 4.0, torch.randn(9, 2, 2, generator=_gen(1), dtype=torch.float64))
    assert got.shape == x.shape and got.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# sigma <-> r and argument checks


@pytest.mark.parametrize("D", [0.5, 1.0, 128.0, 1e7])
def test_sigma_r_round_trip(D):
    """r = sigma sqrt(D) and back."""
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    r = pfgmpp.sigma_to_r(sigma, D)
    torch.testing.assert_close(r, sigma * math.sqrt(D), rtol=1e-15, atol=0)
    torch.testing.assert_close(pfgmpp.r_to_sigma(r, D), sigma, rtol=1e-15, atol=0)
    assert pfgmpp.r_to_sigma(pfgmpp.sigma_to_r(0.5, D), D) == pytest.approx(0.5, rel=1e-15)


@pytest.mark.parametrize("fn", [pfgmpp.sigma_to_r, pfgmpp.r_to_sigma])
def test_sigma_r_infinite_D_raises(fn):
    with pytest.raises(ValueError, match="inf"):
        fn(1.0, math.inf)


BAD_D = [0, -1, math.nan, "abc", True]


def _calls_with_D(D):
    x = torch.zeros(3, 4)
    return [
        lambda: pfgmpp.sample_perturbation(x, 1.0, D, _gen(0)),
        lambda: pfgmpp.sample_prior((3, 4), 80.0, D, _gen(0)),
        lambda: pfgmpp.log_prob(x, 1.0, D),
        lambda: pfgmpp.posterior_mean(x, 1.0, D, torch.zeros(5, 4)),
        lambda: pfgmpp.sigma_to_r(1.0, D),
        lambda: pfgmpp.r_to_sigma(1.0, D),
        lambda: pfgmpp.check_D(D),
    ]


@pytest.mark.parametrize("D", BAD_D, ids=repr)
def test_bad_D_raises(D):
    for call in _calls_with_D(D):
        with pytest.raises(ValueError, match=r"\bD\b"):
            call()


BAD_SIGMA = [0.0, -1.0, math.nan, math.inf, torch.tensor(0.0), torch.tensor([1.0, -2.0, 1.0]),
             torch.tensor([1.0, math.nan, 1.0]), torch.ones(4), torch.ones(3, 3), torch.ones(2)]


def _calls_with_sigma(sigma):
    x = torch.zeros(3, 4)
    return [
        lambda: pfgmpp.sample_perturbation(x, sigma, 2.0, _gen(0)),
        lambda: pfgmpp.sample_perturbation(x, sigma, math.inf, _gen(0)),
        lambda: pfgmpp.sample_prior((3, 4), sigma, 2.0, _gen(0)),
        lambda: pfgmpp.log_prob(x, sigma, 2.0),
        lambda: pfgmpp.posterior_mean(x, sigma, 2.0, torch.zeros(5, 4)),
    ]


@pytest.mark.parametrize("sigma", BAD_SIGMA, ids=lambda s: repr(s).replace("\n", ""))
def test_bad_sigma_raises(sigma):
    """sigma <= 0, nan, inf, or not one value per sample (B = 3 here) is a ValueError naming sigma."""
    for call in _calls_with_sigma(sigma):
        with pytest.raises(ValueError, match="sigma"):
            call()


@pytest.mark.parametrize("x", [torch.zeros(4), torch.tensor(1.0), np.zeros((3, 4))], ids=["1d", "0d", "numpy"])
def test_unbatched_x_raises(x):
    for call in [lambda: pfgmpp.sample_perturbation(x, 1.0, 2.0), lambda: pfgmpp.log_prob(x, 1.0, 2.0),
                 lambda: pfgmpp.posterior_mean(x, 1.0, 2.0, torch.zeros(5, 4))]:
        with pytest.raises(ValueError, match=r"\bx\b"):
            call()


def test_prior_shape_needs_batch():
    with pytest.raises(ValueError, match="shape"):
        pfgmpp.sample_prior((4,), 80.0, 2.0)


@pytest.mark.parametrize("data", [torch.zeros(5, 3), torch.zeros(5, 2, 2, 2), torch.zeros(0, 4), torch.zeros(4)],
                         ids=["fewer-values", "more-values", "empty", "unbatched"])
def test_posterior_mean_bad_data_raises(data):
    with pytest.raises(ValueError, match="data"):
        pfgmpp.posterior_mean(torch.zeros(3, 4), 1.0, 2.0, data)


def test_posterior_mean_bad_chunk_raises():
    with pytest.raises(ValueError, match="chunk"):
        pfgmpp.posterior_mean(torch.zeros(3, 4), 1.0, 2.0, torch.zeros(5, 4), chunk=0)
