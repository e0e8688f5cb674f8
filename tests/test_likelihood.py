"""Likelihood for any D: the change of variables against closed forms, bits/dim, the dataset loop and the CLI.

What is exact here. The model is the pushforward of the prior p_{r_max} (the kernel at sigma_max centred at 0)
along the probability-flow ODE; with an exact denoiser that ODE is the characteristic flow of the true
perturbed marginals p_sigma (PFGM++: d p_r / d r + div(p_r (x - E[y|x]) / r) = 0 for every D), so

    log p_model(x_0) - log p_{sigma_min}(x_0) = log p_{r_max}(x_T) - log p_{sigma_max}(x_T)

exactly, where x_T is the flow's end. For a finite data set both p_sigma are kernel mixtures (closed form), so
the estimate is checked against exact densities at both ends (not against "p_model ~ p_sigma_min", which
holds only up to the prior mismatch). For Gaussian data N(0, s^2 I) at D = inf the flow is linear,
x(sigma) proportional to sqrt(s^2 + sigma^2), and p_model = N(0, sigma_max^2 (s^2 + sigma_min^2) / (s^2 + sigma_max^2) I).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.helpers import ROOT, free_port, make_dataset, snapshot_and_dataset, subprocess_env
from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from training import divergence, pfgmpp
from training.cli import likelihood as likelihood_cli
from training.generation import likelihood
from training.samplers.levels import flow_range

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian_model_variance(s, lo, hi):
    """The model's variance per dimension for N(0, s^2 I) data at D = inf (module docstring)."""
    return hi**2 * (s**2 + lo**2) / (s**2 + hi**2)


def _log_mixture(x, data, sigma, D):
    """log of the uniform kernel mixture over `data` at sigma, per sample (exact, float64)."""
    terms = torch.stack([pfgmpp.log_prob(x - y[None], sigma, D) for y in data.to(x.dtype)], dim=1)
    return torch.logsumexp(terms, dim=1) - math.log(len(data))


def _mixture(seed=0):
    return torch.rand([5, 1, 2, 2], generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


class ImageList:
    """A dataset of uint8 images [C, H, W] without labels."""

    def __init__(self, pixels):
        self.pixels = pixels

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return self.pixels[i], torch.zeros([0])


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_divergence_estimators(kind):
    """Exact divergence = trace of the Jacobian; Hutchinson's mean over probes is within 4 standard errors of it."""
    g = torch.Generator().manual_seed(0)
    A, b = torch.randn([6, 6], generator=g, dtype=F64), torch.randn([6], generator=g, dtype=F64)
    x = torch.randn([3, 6], generator=g, dtype=F64).requires_grad_(True)
    out = torch.tanh(x @ A.T + b)
    trace = torch.stack([torch.autograd.functional.jacobian(lambda v: torch.tanh(A @ v + b), row).trace() for row in x.detach()])
    torch.testing.assert_close(divergence.divergence(out, x), trace)
    probes = divergence.draw_probes(x.shape, kind, 4000, g, dtype=F64)
    assert probes.shape == (3, 4000, 6) and (kind == "gaussian" or set(probes.unique().tolist()) == {-1.0, 1.0})
    per_probe = torch.stack([divergence.divergence(out, x, probes[:, k : k + 1]) for k in range(0, 4000, 400)])
    mean = divergence.divergence(out, x, probes)
    se = per_probe.std(dim=0) / math.sqrt(4000)  # spread of single probes (10 of them) over sqrt(all probes)
    assert ((mean - trace).abs() < 4 * se + 1e-9).all()


@pytest.mark.parametrize("estimator", ["exact", "rademacher"])
def test_gaussian_data_log_likelihood_is_exact(estimator):
    """N(0, 0.25 I) data at D = inf: log p equals the closed form (Rademacher is exact here: J = c I)."""
    net = GaussianDenoiser(0.5, channels=1, resolution=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn([6, 1, 2, 2], generator=g, dtype=F64) * 0.5
    probes = None if estimator == "exact" else divergence.draw_probes(x.shape, estimator, 1, g, dtype=F64)
    result = likelihood.log_likelihood(net, x, probes=probes, rtol=1e-7, atol=1e-7)
    variance = _gaussian_model_variance(0.5, result.sigma_min, result.sigma_max)
    torch.testing.assert_close(result.log_p, pfgmpp.log_prob(x, math.sqrt(variance), math.inf), rtol=0, atol=1e-5)
    torch.testing.assert_close(result.latents, x * math.sqrt((0.25 + result.sigma_max**2) / (0.25 + result.sigma_min**2)),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("D", [1.0, 8.0, 128.0, math.inf])
def test_finite_data_log_likelihood_matches_the_exact_mixtures(D):
    """Analytic denoiser of 5 points, any D: the identity of the module docstring holds to the solver's tolerance."""
    data = _mixture()
    net = AnalyticDenoiser(data, D)
    g = torch.Generator().manual_seed(2)
    index = torch.randint(0, 5, [6], generator=g)
    x = data[index] + pfgmpp.sample_perturbation(data[index], 0.002, D, g)
    result = likelihood.log_likelihood(net, x, rtol=1e-7, atol=1e-7)
    exact = (_log_mixture(x, data, result.sigma_min, D) + result.prior_log_p
             - _log_mixture(result.latents, data, result.sigma_max, D))
    torch.testing.assert_close(result.log_p, exact, rtol=0, atol=1e-4)  # measured: <= 4.3e-5 at rtol 1e-7, 6e-7 at 1e-9


def test_hutchinson_likelihood_is_unbiased_for_finite_D():
    """D = 8, Gaussian probes on one point, 32 trajectories: the mean is within 4 standard errors of the exact value."""
    data = _mixture()
    net = AnalyticDenoiser(data, 8.0)
    x = (data[1:2] + 0.01).expand(32, -1, -1, -1)
    exact = likelihood.log_likelihood(net, x[:1]).log_p
    probes = divergence.draw_probes(x.shape, "gaussian", 1, torch.Generator().manual_seed(3), dtype=F64)
    estimate = likelihood.log_likelihood(net, x, probes=probes, rtol=1e-4, atol=1e-4).log_p
    se = estimate.std() / math.sqrt(len(estimate))
    assert se > 0.01 and abs(estimate.mean() - exact) < 4 * se


def test_bits_per_dim_convention():
    """bpd = -log p_x / (N ln 2) + log2(127.5) equals Score SDE's -log p_z / (N ln 2) + 8 for z = (x + 1) 127.5 / 256."""
    log_p_x = torch.tensor([-3.0, 10.0], dtype=F64)
    N = 12
    log_p_z = log_p_x + N * math.log(256 / 127.5)  # z = (k + u) / 256 and x = (k + u - 1/2) / 127.5 - 1: dx/dz = 256 / 127.5
    torch.testing.assert_close(likelihood.bits_per_dim(log_p_x, N), -log_p_z / (N * math.log(2)) + 8)
    pixels = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    x = likelihood.dequantize(pixels, torch.Generator().manual_seed(0))
    assert -1 - 0.5 / 127.5 <= x[0, 0, 0, 0] < -1 + 0.5 / 127.5 and 1 - 0.5 / 127.5 <= x[0, 0, 0, 1] < 1 + 0.5 / 127.5
    with pytest.raises(ValueError, match="uint8"):
        likelihood.dequantize(pixels.float())


def test_dataset_bpd_of_gaussian_model_is_exact():
    """8-bit images under the D = inf Gaussian model: the dequantised bpd has a closed form; batch size does not matter.

    E_u[-log p(x)] = N/2 log(2 pi v) + sum_i (c_i^2 + 1 / (12 * 127.5^2)) / (2 v), c = k / 127.5 - 1.
    """
    net = GaussianDenoiser(0.5, channels=1, resolution=2)
    pixels = torch.randint(60, 200, [8, 1, 2, 2], generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    lo, hi = flow_range(net)
    v = _gaussian_model_variance(0.5, lo, hi)
    c = pixels.to(F64) / 127.5 - 1
    nll = 2 * math.log(2 * math.pi * v) + (c.square() + 1 / (12 * 127.5**2)).flatten(1).sum(1) / (2 * v)
    exact = likelihood.bits_per_dim(-nll, 4)
    options = dict(dequant=4, estimator="rademacher", rtol=1e-7, atol=1e-7)
    result = likelihood.dataset_bpd(net, ImageList(pixels), 4, "cpu", seed=1, workers=0, **options)
    per_image = torch.tensor(result["per_image"], dtype=F64)
    difference = per_image - exact
    assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(8) + 1e-6
    assert abs(result["bpd"] - per_image.mean().item()) < 1e-12 and result["num_images"] == 8
    rebatched = likelihood.dataset_bpd(net, ImageList(pixels), 3, "cpu", seed=1, workers=0, **options)
    torch.testing.assert_close(torch.tensor(rebatched["per_image"], dtype=F64), per_image, rtol=0, atol=1e-6)


def test_clipped_prior_and_bad_options_are_refused():
    net = GaussianDenoiser(0.5, channels=1, resolution=2)
    net.upper_norm = 3.0
    with pytest.raises(ValueError, match="upper_norm"):
        likelihood.log_likelihood(net, torch.zeros([1, 1, 2, 2]))
    del net.upper_norm
    pixels = torch.zeros([1, 1, 2, 2], dtype=torch.uint8)
    with pytest.raises(ValueError, match="estimator"):
        likelihood.image_bpd(net, pixels, [torch.Generator()], estimator="hutch")
    with pytest.raises(ValueError, match="dequant"):
        likelihood.image_bpd(net, pixels, [torch.Generator()], dequant=0)
    with pytest.raises(ValueError, match="probe kind"):
        divergence.draw_probes([1, 4], "sphere")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return snapshot_and_dataset(tmp_path_factory.mktemp("likelihood"), count=4)


@pytest.mark.slow
def test_cli_writes_json_and_two_ranks_equal_one(files, tmp_path):
    """The CLI in one process and `python -m training.cli.likelihood` under torchrun with 2 ranks: the same per-image bpd."""
    net, data = files
    args = [f"--network={net}", f"--data={data}", "--batch=2", "--workers=0", "--per_image", "--rtol=1e-3", "--atol=1e-3"]
    result = CliRunner().invoke(likelihood_cli.main, [*args, f"--out={tmp_path / 'one.json'}"])
    assert result.exit_code == 0, result.output
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "training.cli.likelihood"]
    done = subprocess.run([*launcher, *args, f"--out={tmp_path / 'two.json'}"], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert one["num_images"] == 4 and len(one["per_image"]) == 4 and one["D"] == "128" and one["estimator"] == "rademacher"
    assert 0 < one["bpd"] < 30 and one["bpd_se"] > 0 and one["nfe_per_solve"] > 10
    torch.testing.assert_close(torch.tensor(two["per_image"]), torch.tensor(one["per_image"]), rtol=0, atol=1e-9)


def test_cli_errors_are_click_errors(files, tmp_path):
    from training.cli.likelihood import main

    net, data = files
    result = CliRunner().invoke(main, [f"--network={net}", f"--data={tmp_path / 'missing.zip'}"])
    assert result.exit_code != 0 and "does not exist" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, [f"--network={net}", f"--data={data}", f"--out={tmp_path / 'no' / 'x.json'}"])
    assert result.exit_code != 0 and "folder does not exist" in result.output
    (tmp_path / "folder.json").mkdir()
    result = CliRunner().invoke(main, [f"--network={net}", f"--data={data}", f"--out={tmp_path / 'folder.json'}"])
    assert result.exit_code != 0 and "is a directory" in result.output and "Traceback" not in result.output
    gray = make_dataset(tmp_path / "gray.zip", count=2, resolution=8, labels=False, channels=1)
    result = CliRunner().invoke(main, [f"--network={net}", f"--data={gray}"])
    assert result.exit_code != 0 and "takes 8x8 images with 3 channel(s)" in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs a folder nobody may write into (Linux /sys)")
def test_cli_checks_the_output_before_the_work(files, monkeypatch):
    """An --out that cannot be written fails before any image is evaluated (not with a traceback after)."""
    from training.cli import likelihood as cli

    net, data = files
    monkeypatch.setattr(cli, "dataset_bpd", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    result = CliRunner().invoke(cli.main, [f"--network={net}", f"--data={data}", "--out=/sys/pfgmpp-bpd.json"])
    assert result.exit_code == 1 and "cannot be written" in result.output and "Traceback" not in result.output
