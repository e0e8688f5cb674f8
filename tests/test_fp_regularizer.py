"""The FP-Diffusion score Fokker-Planck regulariser: zero residual for exact scores, its wiring into training.

Exact scores come from the oracles: GaussianDenoiser (data N(0, s^2 I), D = inf: D(x, sigma) = x s^2 / (s^2 + sigma^2))
and AnalyticDenoiser (the posterior mean of a finite data set, the exact score (D - x) / sigma^2 of the mixture at
D = inf). Both satisfy the heat equation d p / d sigma = sigma Lap p, so the vector residual vanishes pointwise
(up to the O(h^2) finite difference), and the scalar residual rho has mean zero under p_sigma.
"""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import train
from tests.helpers import make_dataset, run_train
from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from torch_utils import rng
from training import divergence, losses
from training.losses import fp_regularizer
from training.train import config

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _gaussian_points(s, sigma, shape, seed):
    """x ~ p_sigma = N(0, (s^2 + sigma^2) I) for Gaussian data."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()


def _mixture(seed=0, count=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand([count, 1, 2, 2], generator=g, dtype=F64) * 2 - 1


def _mixture_points(data, sigma, batch, seed):
    """x ~ p_sigma for the uniform mixture over `data` at D = inf."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(data), [batch], generator=g)
    return data[index] + sigma * torch.randn([batch, *data.shape[1:]], generator=g, dtype=F64)


class Perturbed(torch.nn.Module):
    """An exact denoiser with a perturbed output: its score breaks the score FPE."""

    def __init__(self, net, scale=1.1, wiggle=0.05):
        super().__init__()
        self.net, self.scale, self.wiggle = net, scale, wiggle

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return self.net(x, sigma) * self.scale + self.wiggle * torch.sin(3 * x)


class ScaledScore(torch.nn.Module):
    """The denoiser whose score is c times the exact one: x + c (D(x) - x)."""

    def __init__(self, net, c):
        super().__init__()
        self.net, self.c = net, c

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        return x + self.c * (self.net(x, sigma) - x)


class TinyDenoiser(torch.nn.Module):
    """A small EDM-preconditioned MLP denoiser (smooth, so that double backward is meaningful)."""

    def __init__(self, N=4, width=16, dropout=0.0):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(N + 1, width), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(width, N))

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        c_skip, c_out, c_in = 0.25 / (sigma**2 + 0.25), sigma * 0.5 / (sigma**2 + 0.25).sqrt(), 1 / (sigma**2 + 0.25).sqrt()
        flat = x.reshape(x.shape[0], -1)
        out = c_skip * flat + c_out * self.net(torch.cat([c_in * flat, sigma.log() / 4], dim=1))
        return out.reshape(x.shape)


def _residual_size(res, x, net, sigma):
    """|eps| relative to |d s / d ln sigma| ~ |s|: a scale-free residual per sample."""
    score = (net(x, sigma.reshape(-1, 1, 1, 1)) - x) / sigma.reshape(-1, 1, 1, 1) ** 2
    return res.vector.flatten(1).norm(dim=1) / score.flatten(1).norm(dim=1)


def test_vector_residual_is_zero_for_the_exact_gaussian_score_and_not_for_a_perturbed_one():
    """N(0, 0.25 I) data, D = inf, sigma over EDM's training range: |eps| / |s| < 1e-6 exact, > 1e-2 perturbed."""
    net = GaussianDenoiser(0.5, channels=1, resolution=2)
    sigma = torch.exp(torch.linspace(math.log(0.01), math.log(20), 12, dtype=F64))
    x = _gaussian_points(0.5, sigma, [12, 1, 2, 2], seed=1)
    exact = fp_regularizer.score_fpe_residuals(net, x, sigma, fd_step=1e-4)
    assert _residual_size(exact, x, net, sigma).max() < 1e-6
    perturbed = fp_regularizer.score_fpe_residuals(Perturbed(net), x, sigma, fd_step=1e-4)
    assert _residual_size(perturbed, x, net, sigma).min() > 1e-2


def test_vector_residual_is_zero_for_the_exact_mixture_score():
    """A finite data set at D = inf: the analytic denoiser's score satisfies the score FPE pointwise."""
    data = _mixture()
    net = AnalyticDenoiser(data, math.inf)
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 10.0], dtype=F64)
    x = _mixture_points(data, sigma.reshape(-1, 1, 1, 1), 6, seed=2)
    res = fp_regularizer.score_fpe_residuals(net, x, sigma, fd_step=1e-4)
    assert _residual_size(res, x, net, sigma).max() < 1e-5


@pytest.mark.parametrize("case", ["gaussian", "mixture"])
def test_scalar_residual_has_mean_zero_under_p_sigma(case):
    """E_{p_sigma}[rho] = d/dt int p = 0: the batch mean is within 4 standard errors of 0.

    For the score c s: E[rho] = sigma^2 (c^2 - c) E|s|^2 != 0 (Stein's identity E[div s] = -E|s|^2)."""
    sigma = torch.full([4000], 0.7, dtype=F64)
    if case == "gaussian":
        net = GaussianDenoiser(0.5, channels=1, resolution=2)
        x = _gaussian_points(0.5, sigma, [4000, 1, 2, 2], seed=3)
    else:
        data = _mixture()
        net = AnalyticDenoiser(data, math.inf)
        x = _mixture_points(data, 0.7, 4000, seed=3)
    rho = fp_regularizer.score_fpe_residuals(net, x, sigma).scalar
    assert abs(rho.mean()) < 4 * rho.std() / math.sqrt(len(rho))
    rho_bad = fp_regularizer.score_fpe_residuals(ScaledScore(net, 1.3), x, sigma).scalar
    assert abs(rho_bad.mean()) > 10 * rho_bad.std() / math.sqrt(len(rho_bad))


def test_hutchinson_residual_is_unbiased():
    """With Rademacher probes the residual's mean over probes equals the exact-divergence residual (zero)."""
    data = _mixture()
    net = AnalyticDenoiser(data, math.inf)
    x = _mixture_points(data, 0.3, 1, seed=4).expand(800, -1, -1, -1)
    sigma = torch.full([800], 0.3, dtype=F64)
    probes = divergence.draw_probes(x.shape, "rademacher", 1, torch.Generator().manual_seed(5), dtype=F64)
    res = fp_regularizer.score_fpe_residuals(net, x, sigma, probes, fd_step=1e-4)
    mean, se = res.vector.flatten(1).mean(dim=0), res.vector.flatten(1).std(dim=0) / math.sqrt(800)
    assert (mean.abs() < 4 * se + 1e-9).all() and se.max() > 0  # the single-probe residuals do vary


def test_finite_D_residual_shrinks_like_N_over_D_and_small_D_is_refused():
    """The exact PFGM++ denoiser breaks the heat-equation FPE by O(N / D): it holds only as D -> inf."""
    data = _mixture()
    sigma = torch.full([6], 0.5, dtype=F64)
    x = _mixture_points(data, 0.5, 6, seed=6)
    size = {D: _residual_size(fp_regularizer.score_fpe_residuals(AnalyticDenoiser(data, D), x, sigma, fd_step=1e-4),
                              x, AnalyticDenoiser(data, D), sigma).max().item() for D in (1e2, 1e4, 1e6)}
    assert size[1e2] > 1e-2 and size[1e4] < size[1e2] / 10 and size[1e6] < size[1e4] / 10, size
    fp_regularizer.check_D(math.inf, 3072)
    fp_regularizer.check_D(4e6, 3072)
    with pytest.raises(ValueError, match="aug_dim=inf"):
        fp_regularizer.check_D(2048, 3072)
    with pytest.raises(ValueError, match="too small"):
        fp_regularizer.FPRegularizer(D=128).terms(GaussianDenoiser(0.5, 1, 2), torch.zeros([1, 1, 2, 2]), 1.0)


def test_weightings():
    """w(sigma) in t = ln sigma with g^2 = 2 sigma^2: ll = g^2, convention = g, constant = 1."""
    sigma = torch.tensor([0.1, 2.0])
    torch.testing.assert_close(fp_regularizer.FPRegularizer(weighting="ll").weight(sigma), 2 * sigma**2)
    torch.testing.assert_close(fp_regularizer.FPRegularizer(weighting="convention").weight(sigma), math.sqrt(2) * sigma)
    torch.testing.assert_close(fp_regularizer.FPRegularizer(weighting="constant").weight(sigma), torch.ones(2))


@pytest.mark.parametrize("kwargs", [dict(alpha=0, beta=0), dict(m=0), dict(weighting="log"), dict(probe="sphere"),
                                    dict(num_probes=0), dict(fd_step=0)])
def test_bad_options(kwargs):
    with pytest.raises(ValueError):
        fp_regularizer.FPRegularizer(**kwargs)


@pytest.mark.parametrize("weighting", ["ll", "constant"])
def test_the_regulariser_adds_exactly_its_stated_terms(weighting):
    """loss_fp = DSM + alpha w (|eps|^2/N)^(m/2) + beta |mean rho / N|^m per element; gradients add up the same way."""
    torch.manual_seed(0)
    net = TinyDenoiser().double()
    images = torch.rand([6, 1, 2, 2], generator=torch.Generator().manual_seed(1), dtype=F64) * 2 - 1
    options = dict(alpha=0.15, beta=0.01, m=2.0, weighting=weighting)
    with_fp, without = losses.EDMLoss(fp=options), losses.EDMLoss()
    draws = with_fp.draw(images.shape, "cpu", torch.Generator().manual_seed(2))
    assert len(draws) == 3 and len(without.draw(images.shape, "cpu", torch.Generator())) == 2
    draws = (draws[0].double(), draws[1].double(), draws[2].double())
    total = with_fp(net, images, draws=draws)
    dsm = without(net, images, draws=draws[:2])
    vector, scalar = fp_regularizer.FPRegularizer(**options).terms(net, images + draws[1], draws[0], draws[2])
    penalty = 0.15 * vector + 0.01 * scalar
    torch.testing.assert_close(total - dsm, penalty.reshape(-1, 1, 1, 1).expand_as(dsm))
    params = list(net.parameters())
    grads = torch.autograd.grad(total.sum(), params)
    expected = torch.autograd.grad(dsm.sum() + 4 * penalty.sum(), params)  # 4 = N elements per sample
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    assert vector.min() > 0 and scalar > 0


def test_dropout_masks_are_replayed_in_every_call():
    """The finite difference must see one network: the same dropout mask in all of the regulariser's calls."""
    torch.manual_seed(0)
    net = TinyDenoiser(dropout=0.5).train()
    x = torch.randn([4, 1, 2, 2])
    replay = rng.replay_point(x.device)
    first = net(x, 0.5)
    replay()
    torch.testing.assert_close(net(x, 0.5), first)
    res = fp_regularizer.score_fpe_residuals(net, x, torch.full([4], 0.5), fd_step=1e-3)
    assert res.vector.abs().max() < 20  # measured: 1.1 replayed; 630 with a fresh mask per call (~ 1 / fd_step)


def test_config_and_cli_wiring(tmp_path):
    """--fp_reg builds the loss options; bad combinations are click errors naming the flag."""
    c = config.training_config(data="x.zip", fp_reg=True, fp_alpha=0.2, fp_weighting="constant", fp_probes=2)
    assert c.loss_kwargs["fp"] == dict(alpha=0.2, beta=0.01, m=2.0, weighting="constant", probe="rademacher",
                                       num_probes=2, fd_step=0.01)
    assert fp_regularizer.from_options(c) == c.loss_kwargs["fp"]  # the configuration's options, by flag name
    assert "fp" not in config.training_config(data="x.zip").loss_kwargs
    with pytest.raises(ValueError, match="fp_alpha"):
        config.training_config(data="x.zip", fp_reg=True, fp_alpha=0, fp_beta=0)
    data = make_dataset(tmp_path / "d.zip", count=8)
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={data}", "--fp_reg=1", "--pfgmpp=1",
                                             "--aug_dim=128", "--attn=4", "--dry-run"])
    assert result.exit_code != 0 and "aug_dim=inf" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={data}", "--fp_reg=1", "--fp_beta=0",
                                             "--precond=ve", "--attn=4", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert '"alpha": 0.15' in result.output and '"beta": 0.0' in result.output


def test_training_reports_the_regulariser_and_its_cost(tmp_path):
    """A tiny run with --fp_reg=1: finite loss and the terms and seconds per step in stats.jsonl."""
    data = make_dataset(tmp_path / "d.zip", count=16)
    run_train(tmp_path / "run", [f"--data={data}", "--fp_reg=1", "--batch=8", "--duration=0.000016", "--tick=0.008"])
    ticks = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(ticks) == 2
    for tick in ticks:
        assert math.isfinite(tick["loss"]) and tick["fp_sec_per_step"] > 0
        assert math.isfinite(tick["fp_vector"]) and tick["fp_scalar"] >= 0
