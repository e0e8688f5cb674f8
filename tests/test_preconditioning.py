"""Preconditioning coefficients (EDM Table 1) and the noise schedules they rest on."""

import math

import numpy as np
import pytest
import torch

from training import preconditioners as pc
from training import schedules


class Probe(torch.nn.Module):
    """Inner model that records its inputs and returns a constant per-channel output."""

    def __init__(self, out_channels=3, value=1.0):
        super().__init__()
        self.out_channels, self.value = out_channels, value

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.seen = dict(x=x, noise_labels=noise_labels, class_labels=class_labels, augment_labels=augment_labels)
        return torch.full([x.shape[0], self.out_channels, *x.shape[2:]], self.value, dtype=x.dtype)


KW = dict(img_resolution=4, img_channels=3)


def _run(precond, sigma):
    x = torch.randn([len(sigma), 3, 4, 4], generator=torch.Generator().manual_seed(0))
    out = precond(x, torch.tensor(sigma))
    return x, out, precond.model.seen


def test_edm_coefficients():
    sigma = [0.002, 0.5, 80.0]
    x, out, seen = _run(pc.EDMPrecond(Probe(), **KW), sigma)
    s = torch.tensor(sigma).reshape(-1, 1, 1, 1)
    c_skip = 0.25 / (s**2 + 0.25)
    c_out = s * 0.5 / (s**2 + 0.25).sqrt()
    torch.testing.assert_close(seen["x"], x / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(seen["noise_labels"], torch.tensor(sigma).log() / 4)
    torch.testing.assert_close(out, c_skip * x + c_out)


def test_edm_with_zero_network_is_the_exact_gaussian_denoiser():
    """For N(0, sigma_data^2 I) data, E[y|x] = c_skip x: F = 0 is optimal, as the EDM design intends."""
    precond = pc.EDMPrecond(Probe(value=0.0), **KW)
    x = torch.randn([2, 3, 4, 4])
    torch.testing.assert_close(precond(x, 1.5), x * 0.25 / (1.5**2 + 0.25))


def test_vp_coefficients_and_range():
    beta_d, beta_min = 19.9, 0.1
    precond = pc.VPPrecond(Probe(), **KW)
    assert precond.sigma_min == pytest.approx(math.sqrt(math.expm1(0.5 * beta_d * 1e-10 + beta_min * 1e-5)))
    assert precond.sigma_max == pytest.approx(math.sqrt(math.expm1(0.5 * beta_d + beta_min)))  # ~152.3
    sigma = [0.01, 1.0, 100.0]
    x, out, seen = _run(precond, sigma)
    s = torch.tensor(sigma).reshape(-1, 1, 1, 1)
    t = [(math.sqrt(beta_min**2 + 2 * beta_d * math.log(1 + v**2)) - beta_min) / beta_d for v in sigma]
    torch.testing.assert_close(seen["noise_labels"], 999 * torch.tensor(t))
    torch.testing.assert_close(seen["x"], x / (s**2 + 1).sqrt())
    torch.testing.assert_close(out, x - s)


def test_ve_coefficients():
    sigma = [0.02, 3.0, 100.0]
    x, out, seen = _run(pc.VEPrecond(Probe(), **KW), sigma)
    assert torch.equal(seen["x"], x)
    torch.testing.assert_close(seen["noise_labels"], (0.5 * torch.tensor(sigma)).log())
    torch.testing.assert_close(out, x + torch.tensor(sigma).reshape(-1, 1, 1, 1))


def test_iddpm_grid_and_rounding():
    """u_M = 0, u_{j-1}^2 + 1 = (u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) (recomputed in numpy)."""
    M, C_1, C_2 = 1000, 0.001, 0.008
    j = np.arange(M + 1)
    abar = np.sin(0.5 * np.pi * j / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for k in range(M, 0, -1):
        u[k - 1] = np.sqrt((u[k] ** 2 + 1) / max(abar[k - 1] / abar[k], C_1) - 1)
    np.testing.assert_allclose(schedules.iddpm_sigmas(M, C_1, C_2).numpy(), u, rtol=1e-12)
    precond = pc.iDDPMPrecond(Probe(out_channels=6), **KW)
    assert precond.sigma_max == pytest.approx(u[0], rel=1e-6) and precond.sigma_min == pytest.approx(u[M - 1], rel=1e-6)
    assert "u" in precond.state_dict()
    grid = torch.tensor(u, dtype=torch.float32)
    for value in (0.01, 1.0, 70.0):
        nearest = int((grid - value).abs().argmin())
        assert precond.round_sigma(torch.tensor(value)) == grid[nearest]
        assert precond.round_sigma(torch.tensor(value), return_index=True) == nearest
    x, out, seen = _run(precond, [1.0])
    assert out.shape == x.shape  # the learned variance half is dropped
    assert seen["noise_labels"].item() == M - 1 - int((grid - 1.0).abs().argmin())


def test_class_labels_and_augment_labels_reach_the_model():
    precond = pc.EDMPrecond(Probe(), label_dim=10, **KW)
    precond(torch.zeros([2, 3, 4, 4]), 1.0)
    assert torch.equal(precond.model.seen["class_labels"], torch.zeros([1, 10]))
    labels = torch.eye(10)[:2]
    augment = torch.ones([2, 9])
    precond(torch.zeros([2, 3, 4, 4]), 1.0, labels, augment_labels=augment)
    assert torch.equal(precond.model.seen["class_labels"], labels)
    assert torch.equal(precond.model.seen["augment_labels"], augment)
    unconditional = pc.EDMPrecond(Probe(), **KW)
    unconditional(torch.zeros([2, 3, 4, 4]), 1.0, labels)
    assert unconditional.model.seen["class_labels"] is None


def test_scalar_sigma_gives_one_noise_label_per_sample():
    precond = pc.EDMPrecond(Probe(), **KW)
    precond(torch.zeros([5, 3, 4, 4]), torch.tensor(2.0, dtype=torch.float64))
    assert precond.model.seen["noise_labels"].shape == (5,)


def test_fp16_is_used_only_on_cuda():
    precond = pc.EDMPrecond(Probe(), use_fp16=True, **KW)
    out = precond(torch.zeros([1, 3, 4, 4]), 1.0)
    assert precond.model.seen["x"].dtype == torch.float32 and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda():
    precond = pc.EDMPrecond(Probe(), use_fp16=True, **KW).cuda()
    out = precond(torch.zeros([1, 3, 4, 4], device="cuda"), 1.0)
    assert precond.model.seen["x"].dtype == torch.float16 and out.dtype == torch.float32
    precond(torch.zeros([1, 3, 4, 4], device="cuda"), 1.0, force_fp32=True)
    assert precond.model.seen["x"].dtype == torch.float32


@pytest.mark.parametrize("cls", list(pc.PRECONDITIONERS.values()))
def test_every_preconditioner_records_D_and_checks_it(cls):
    model = Probe(out_channels={pc.iDDPMPrecond: 6, pc.PFGMPrecond: 4}.get(cls, 3))
    if cls is pc.PFGMPrecond:  # PFGM is D = 1 by definition
        assert cls(model, **KW).D == 1.0
        with pytest.raises(ValueError, match="PFGM is D = 1"):
            cls(model, D=128, **KW)
    else:
        assert cls(model, D=128, **KW).D == 128.0
        assert cls(model, **KW).D == math.inf
    with pytest.raises(ValueError, match="D"):
        cls(model, D=-1, **KW)
    with pytest.raises(ValueError, match="img_resolution"):
        cls(model, img_resolution=0, img_channels=3)


def test_vp_schedule_inverse_and_derivative():
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(schedules.vp_sigma_inv(schedules.vp_sigma(t)), t)
    h = 1e-6
    numeric = (schedules.vp_sigma(t + h) - schedules.vp_sigma(t - h)) / (2 * h)
    torch.testing.assert_close(schedules.vp_sigma_deriv(t[1:]), numeric[1:], rtol=1e-5, atol=0)
    beta_d, beta_min = schedules.vp_betas_for_range(0.002, 80.0, 1e-3)
    assert float(schedules.vp_sigma(1.0, beta_d, beta_min)) == pytest.approx(80)
    assert float(schedules.vp_sigma(1e-3, beta_d, beta_min)) == pytest.approx(0.002)
