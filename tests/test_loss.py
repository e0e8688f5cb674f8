"""Losses: the same draws as EDM at D = inf, the right noise-level distributions, STF targets."""

import math

import pytest
import scipy.stats
import torch

from tests.oracles import AnalyticDenoiser
from training import losses, pfgmpp, schedules


class Recorder(torch.nn.Module):
    """A network that records its inputs and returns a fixed linear function of x."""

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.seen = dict(x=x, sigma=sigma, class_labels=class_labels, augment_labels=augment_labels)
        return 0.3 * x


def _images(batch=6, seed=0):
    return torch.rand([batch, 3, 4, 4], generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_infinite_D_is_the_plain_gaussian_edm_loss():
    """With the same generator, D = inf draws exactly what EDM's loss draws and returns its value."""
    images, net = _images(), Recorder()
    ours = losses.EDMLoss(D=math.inf)(net, images, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn([6, 1, 1, 1], generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(images.shape, generator=g) * sigma
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * (0.3 * (images + n) - images) ** 2
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("D", [1.0, 128.0])
def test_finite_D_perturbs_with_the_kernel(D):
    """Finite D: sigma first, then the kernel draw of sample_perturbation from the same generator."""
    images, net = _images(), Recorder()
    ours = losses.EDMLoss(D=D)(net, images, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    sigma = (torch.randn([6], generator=g) * 1.2 - 1.2).exp()
    n = pfgmpp.sample_perturbation(images, sigma, D, generator=g)
    torch.testing.assert_close(net.seen["x"], images + n)
    sigma = sigma.reshape(-1, 1, 1, 1)
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (0.3 * (images + n) - images) ** 2
    torch.testing.assert_close(ours, expected)


def test_edm_sigma_is_log_normal():
    """ln sigma ~ N(P_mean, P_std^2) (EDM), KS against scipy."""
    sigma = losses.EDMLoss(P_mean=-1.2, P_std=1.2).sample_sigma(20000, "cpu", torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(sigma.numpy(), scipy.stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf).pvalue > 1e-3
    shifted = losses.EDMLoss(P_mean=-1.0, P_std=1.2).sample_sigma(20000, "cpu", torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(shifted.numpy(), scipy.stats.lognorm(s=1.2, scale=math.exp(-1.2)).cdf).pvalue < 1e-6


def test_vp_and_ve_sigma_distributions():
    """VP: t(sigma) ~ U(epsilon_t, 1); VE: ln sigma ~ U(ln 0.02, ln 100)."""
    g = torch.Generator().manual_seed(1)
    t = schedules.vp_sigma_inv(losses.VPLoss().sample_sigma(20000, "cpu", g).double()).numpy()
    assert scipy.stats.kstest(t, scipy.stats.uniform(1e-5, 1 - 1e-5).cdf).pvalue > 1e-3
    log_sigma = losses.VELoss().sample_sigma(20000, "cpu", g).log().numpy()
    lo, hi = math.log(0.02), math.log(100)
    assert scipy.stats.kstest(log_sigma, scipy.stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3


@pytest.mark.parametrize("cls", [losses.VPLoss, losses.VELoss])
def test_score_sde_weights_are_inverse_variance(cls):
    images, net = _images(), Recorder()
    value = cls(D=math.inf)(net, images, generator=torch.Generator().manual_seed(2))
    sigma = net.seen["sigma"]
    torch.testing.assert_close(value * sigma**2, (net.seen["x"] * 0.3 - images) ** 2)


def test_augment_pipe_hook():
    """The pipe's output is the clean sample, and its labels reach the network."""
    images, net = _images(), Recorder()
    pipe = lambda y: (-y, torch.ones([y.shape[0], 9]))  # noqa: E731
    value = losses.EDMLoss(D=math.inf)(net, images, augment_pipe=pipe, generator=torch.Generator().manual_seed(3))
    assert torch.equal(net.seen["augment_labels"], torch.ones([6, 9]))
    g = torch.Generator().manual_seed(3)
    sigma = (torch.randn([6, 1, 1, 1], generator=g) * 1.2 - 1.2).exp()
    n = torch.randn(images.shape, generator=g) * sigma
    torch.testing.assert_close(net.seen["x"], -images + n)
    assert value.shape == images.shape


@pytest.mark.parametrize("D", [4.0, math.inf])
def test_stable_target_field_is_the_posterior_mean(D):
    """STF regresses on E[y | y + n] over the batch and the reference set, independent of chunking."""
    images, reference = _images(4, seed=1), _images(12, seed=2)
    targets = []
    for chunk in (1, 5, 1000):
        net = AnalyticDenoiser(torch.cat([images, reference]), D)
        stf = losses.EDMLoss(D=D, stf=True, stf_chunk=chunk)
        value = stf(net, images, generator=torch.Generator().manual_seed(4), reference=reference)
        targets.append(value)
    # The analytic denoiser of the same set is the exact minimiser: the STF loss is ~0 for it.
    for value in targets:
        assert value.abs().max() < 1e-10


def test_stf_differs_from_plain_target():
    images, reference = _images(4, seed=1), _images(12, seed=2)
    plain = losses.EDMLoss(D=4.0)(Recorder(), images, generator=torch.Generator().manual_seed(4))
    stf = losses.EDMLoss(D=4.0, stf=True)(Recorder(), images, generator=torch.Generator().manual_seed(4), reference=reference)
    assert not torch.allclose(plain, stf)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="D"):
        losses.EDMLoss(D=0)
    with pytest.raises(ValueError, match="P_std"):
        losses.EDMLoss(P_std=0)
    with pytest.raises(ValueError, match="epsilon_t"):
        losses.VPLoss(epsilon_t=0)
    with pytest.raises(ValueError, match="sigma_min"):
        losses.VELoss(sigma_min=5, sigma_max=1)
    with pytest.raises(ValueError, match="stf"):
        losses.EDMLoss(stf=True)(Recorder(), _images(), labels=torch.zeros([6, 10]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [1.0, 128.0, math.inf])
def test_loss_step_makes_no_host_sync_on_gpu(D):
    """Drawing sigma and the kernel noise and evaluating the loss never synchronise with the host."""
    images = torch.rand([8, 3, 8, 8], device="cuda") * 2 - 1
    loss_fn, g = losses.EDMLoss(D=D), torch.Generator("cuda").manual_seed(0)
    loss_fn(Recorder(), images, generator=g)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn(Recorder(), images, generator=g).sum()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("D", [4.0, math.inf])
def test_drawing_the_global_batch_and_slicing_equals_drawing_in_place(D):
    """loss(draws=draw(...)) is the loss with its own draws; slices of a global draw serve sub-batches."""
    images, loss_fn = _images(6), losses.EDMLoss(D=D)
    own = loss_fn(Recorder(), images, generator=torch.Generator().manual_seed(8))
    draws = loss_fn.draw(images.shape, "cpu", torch.Generator().manual_seed(8))
    torch.testing.assert_close(loss_fn(Recorder(), images, draws=draws), own, rtol=0, atol=0)
    halves = [loss_fn(Recorder(), images[i : i + 3], draws=(draws[0][i : i + 3], draws[1][i : i + 3])) for i in (0, 3)]
    torch.testing.assert_close(torch.cat(halves), own, rtol=0, atol=0)
