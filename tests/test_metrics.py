"""FID, KID and Inception Score against closed forms and independent computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from training import metrics
from training.metrics.fid import fid_from_stats
from training.metrics.inception_score import inception_score
from training.metrics.kid import kid_from_features


def _random_spd(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=[n, n])
    return a @ a.T / n + 0.1 * np.eye(n)


def test_fid_one_dimension_closed_form():
    """For 1-D Gaussians the Fréchet distance is (m1 - m2)^2 + (s1 - s2)^2."""
    fid = fid_from_stats([1.5], [[4.0]], [-0.5], [[0.25]])
    assert fid == pytest.approx((1.5 + 0.5) ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_fid_diagonal_covariances_closed_form():
    """Commuting (diagonal) covariances: sum (sqrt a_i - sqrt b_i)^2 plus the mean term."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_general_covariances_match_matrix_square_root():
    """Non-commuting covariances: the eigendecomposition route equals tr sqrtm(S1 S2) from scipy."""
    s1, s2 = _random_spd(24, 1), _random_spd(24, 2)
    mu1, mu2 = np.zeros(24), np.full(24, 0.1)
    expected = 24 * 0.01 + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    fid = fid_from_stats(mu1, s1, mu2, s2)
    assert fid == pytest.approx(expected, rel=1e-9)
    assert fid_from_stats(mu2, s2, mu1, s1) == pytest.approx(fid, rel=1e-10)  # symmetric


def test_fid_of_a_set_with_itself_is_zero():
    s = _random_spd(64, 3)
    assert abs(fid_from_stats(np.ones(64), s, np.ones(64), s)) < 1e-9


def test_fid_is_real_for_slightly_indefinite_covariances():
    """Rank-deficient covariances with rounding (eigenvalues ~ -1e-15) give a finite real number."""
    features = np.random.default_rng(4).normal(size=[10, 32])  # 10 samples in 32 dimensions: rank 9
    s = np.cov(features, rowvar=False)
    assert np.linalg.eigvalsh(s).min() < 0
    fid = fid_from_stats(np.zeros(32), s, np.zeros(32), s + 1e-3 * np.eye(32))
    assert isinstance(fid, float) and math.isfinite(fid) and fid > 0


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same detector"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_equal_numpy_mean_and_covariance():
    """The float64 sufficient statistics give numpy's mean and unbiased covariance."""
    features = torch.randn([300, 8], generator=torch.Generator().manual_seed(5)) * 3 + 1
    stats = metrics.FeatureStats(8, "cpu")
    for start in range(0, 300, 64):
        stats.append(features[start : start + 64], range(start, min(start + 64, 300)))
    mu, sigma = stats.reduce().mean_cov()
    np.testing.assert_allclose(mu, features.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features.double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_kid_closed_form_for_point_masses():
    """All features a in one set and b in the other: MMD^2 = k(a,a) + k(b,b) - 2 k(a,b) exactly."""
    a, b = torch.full([50, 4], 0.5), torch.full([60, 4], -1.0)
    k = lambda x, y: (x * y * 4 / 4 + 1) ** 3  # noqa: E731  (x.y / F + 1)^3 with equal coordinates
    expected = k(0.5, 0.5) + k(-1.0, -1.0) - 2 * k(0.5, -1.0)
    kid = kid_from_features(a, b, num_subsets=5, generator=torch.Generator().manual_seed(0))
    assert kid == pytest.approx(expected, rel=1e-12)


def test_kid_is_unbiased_for_equal_distributions_and_positive_otherwise():
    g = torch.Generator().manual_seed(6)
    x, y, z = torch.randn([2000, 16], generator=g), torch.randn([2000, 16], generator=g), torch.randn([2000, 16], generator=g) + 0.5
    same = [kid_from_features(x, y, num_subsets=10, max_subset_size=200, generator=g) for _ in range(10)]
    assert abs(np.mean(same)) < 3 * np.std(same) / math.sqrt(len(same)) + 1e-4
    assert kid_from_features(x, z, num_subsets=10, max_subset_size=200, generator=g) > 10 * np.std(same)


@pytest.mark.parametrize("classes", [1, 10])
def test_inception_score_of_confident_balanced_predictions_is_the_class_count(classes):
    """One-hot predictions spread evenly over C classes in every split give IS = C (std 0)."""
    probs = torch.eye(10)[torch.arange(1000) % classes]
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_inception_score_of_uncertain_predictions_is_one():
    assert inception_score(torch.full([100, 7], 1 / 7))[0] == pytest.approx(1.0, rel=1e-12)


def test_reference_round_trip_and_edm_compatibility(tmp_path):
    """Our npz reads as EDM reads it (mu, sigma); EDM's (mu, sigma only) reads here."""
    features = torch.randn([40, 6], generator=torch.Generator().manual_seed(7))
    stats = metrics.FeatureStats(6, "cpu", capacity=40, keep_features=True)
    stats.append(features, range(40))
    metrics.save_reference(tmp_path / "ours.npz", stats.reduce(), keep_features=True)
    with np.load(tmp_path / "ours.npz") as data:  # EDM: dict(np.load(f)); uses ref['mu'], ref['sigma']
        edm_view = dict(data)
    np.testing.assert_allclose(edm_view["mu"], features.double().mean(0).numpy(), rtol=1e-12)
    assert edm_view["sigma"].dtype == np.float64 and edm_view["sigma"].shape == (6, 6)
    np.savez(tmp_path / "edm.npz", mu=edm_view["mu"], sigma=edm_view["sigma"])
    reference = metrics.load_reference(tmp_path / "edm.npz")
    assert reference.features is None and reference.count is None
    ours = metrics.load_reference(tmp_path / "ours.npz")
    assert ours.count == 40 and np.array_equal(ours.features, features.numpy())


def _truncated_npz(path):
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    path.write_bytes(path.read_bytes()[:200])


def _one_array(path):
    """A .npy file (one array) under an .npz name."""
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


_asymmetric = np.eye(3) + np.triu(np.full([3, 3], 0.5), 1)


@pytest.mark.parametrize("write, match", [
    (lambda p: np.savez(p, mean=np.zeros(3)), "need 'mu' and 'sigma'"),
    (lambda p: p.write_text("not an npz"), "not reference statistics .* not an npz"),  # not numpy's pickle advice
    (_one_array, "not reference statistics .* not an npz"),
    (lambda p: np.savez(p, mu=np.array([object()]), sigma=np.zeros([1, 1])), "not reference statistics"),  # needs pickle
    (_truncated_npz, "not reference statistics"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(4)), "do not fit together"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.ones([3, 4])), "do not fit together"),
    (lambda p: np.savez(p, mu=np.array([0, np.nan, 0]), sigma=np.eye(3)), "mu holds NaN or inf.*fid.py ref"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.diag([1, np.inf, 1])), "sigma holds NaN or inf.*fid.py ref"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=_asymmetric), "sigma is not symmetric.*fid.py ref"),
    (lambda p: np.savez(p, mu=np.array(["a", "b"]), sigma=np.eye(2)), "mu holds <U1, not numbers"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3), features=np.zeros([5, 4])), r"features \(5, 4\) do not fit mu \(3,\)"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3), features=np.full([5, 3], np.nan)), "features hold NaN or inf"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3), count=np.arange(2)), "count should be one integer"),
])
def test_reference_errors(tmp_path, write, match):
    """A damaged or foreign npz is refused with a one-line ValueError naming the file."""
    write(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match=match) as error:
        metrics.load_reference(tmp_path / "ref.npz")
    assert "\n" not in str(error.value) and str(tmp_path / "ref.npz") in str(error.value)


def test_a_symmetric_reference_within_rounding_is_accepted(tmp_path):
    """sigma saved in float32, or with float64 rounding between its halves, is still reference statistics."""
    sigma = _random_spd(16, 5)
    sigma[0, 1] += 1e-15
    np.savez(tmp_path / "r64.npz", mu=np.zeros(16), sigma=sigma)
    np.savez(tmp_path / "r32.npz", mu=np.zeros(16, np.float32), sigma=_random_spd(16, 6).astype(np.float32))
    assert metrics.load_reference(tmp_path / "r64.npz").sigma[0, 1] == sigma[0, 1]
    assert metrics.load_reference(tmp_path / "r32.npz").sigma.dtype == np.float64


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fid_refuses_non_finite_statistics(bad):
    """Not 'Eigenvalues did not converge', nor a silent nan: a ValueError saying what is wrong."""
    s = _random_spd(4, 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        fid_from_stats(np.zeros(4), s, np.array([0, bad, 0, 0]), s)
    with pytest.raises(ValueError, match="NaN or inf"):
        fid_from_stats(np.zeros(4), np.where(np.eye(4) > 0, bad, s), np.zeros(4), s)


def test_fid_refuses_an_asymmetric_covariance():
    s = _random_spd(4, 0)
    with pytest.raises(ValueError, match="not symmetric"):
        fid_from_stats(np.zeros(4), s + np.triu(np.ones([4, 4]), 1), np.zeros(4), s)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features_of_the_images_are_refused(bad):
    """A detector that returns NaN or inf for an image: the statistics say so instead of giving fid nan."""
    features = torch.randn([10, 4], generator=torch.Generator().manual_seed(1))
    features[3, 2] = bad
    stats = metrics.FeatureStats(4, "cpu", capacity=10, keep_features=True)
    stats.append(features, range(10))
    with pytest.raises(ValueError, match="NaN or inf"):
        stats.reduce()


class _LinearDetector:
    """A stand-in detector: fixed random projection of the uint8 pixels, softmax of another."""

    feature_dim, num_classes = 5, 3

    def __init__(self, pixels: int):
        g = torch.Generator().manual_seed(8)
        self.w = torch.randn([pixels, 5], generator=g)
        self.v = torch.randn([pixels, 3], generator=g) / 100

    def features(self, images):
        return images.flatten(1).float() @ self.w

    def probabilities(self, images):
        return torch.softmax(images.flatten(1).float() @ self.v, dim=1)


def test_compute_stats_equals_direct_computation():
    images = torch.randint(0, 256, [20, 3, 4, 4], dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    det = _LinearDetector(3 * 16)
    batches = [(list(range(s, s + 7))[: 20 - s], images[s : s + 7]) for s in range(0, 20, 7)]
    stats = metrics.statistics(batches, det, 20, "cpu", ["fid", "kid", "is"])
    rgb = images
    direct = det.features(rgb)
    torch.testing.assert_close(stats.features, direct, rtol=1e-6, atol=1e-3)  # batches of 7 vs 20: rounding
    torch.testing.assert_close(stats.probs, det.probabilities(rgb))
    mu, _ = stats.mean_cov()
    np.testing.assert_allclose(mu, stats.features.double().mean(0).numpy(), rtol=1e-12)
