"""Score SDE predictor-corrector sampling against exact answers (a finite data set, Gaussian data), and short
VE / VP training runs whose snapshots sample."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch

from tests.helpers import make_dataset, run_train
from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from torch_utils import rng
from training import checkpoint, preconditioners
from training.samplers import score_sde


def _toy_data(seed: int = 1) -> torch.Tensor:
    """16 centred points in N = 12 (as tests/test_sampling.py)."""
    data = torch.randn([16, 3, 2, 2], generator=torch.Generator().manual_seed(seed)) * 0.5
    return data - data.mean(dim=0)


@pytest.mark.parametrize(
    "predictor, corrector", [("reverse_diffusion", "langevin"), ("euler_maruyama", "ald"), ("reverse_diffusion", "none")]
)
def test_pc_recovers_finite_data_set(predictor, corrector):
    """With the analytic VE denoiser (sigma in [0.02, 100]) the samples land on the 16 points, each with
    mass 1/16 (chi-square)."""
    data = _toy_data()
    net = AnalyticDenoiser(data, math.inf, sigma_min=0.02, sigma_max=100)
    g = torch.Generator().manual_seed(0)
    latents = score_sde.prior_latents(net, g, batch=2000)
    x, nfe = score_sde.sample(net, latents, generator=g, num_steps=200, predictor=predictor, corrector=corrector)
    assert nfe == net.calls == 200 * (1 + (corrector != "none")) + 1
    nearest, index = torch.cdist(x.reshape(len(x), -1).double(), data.reshape(16, -1).double()).min(dim=1)
    assert nearest.max() < 1e-3
    counts = torch.bincount(index, minlength=16).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-3, counts


def _variance_error(sde: str, predictor: str, num_steps: int) -> float:
    """Relative error of the sample variance for N(0, 0.5^2 I) data (exact: 0.25 s^2 / (s^2 + sigma_eps^2))."""
    net = GaussianDenoiser(0.5, channels=3, resolution=4)
    g = torch.Generator().manual_seed(0)
    latents = score_sde.prior_latents(net, g, batch=4000, sde=sde)
    x, _ = score_sde.sample(net, latents, generator=g, sde=sde, num_steps=num_steps, predictor=predictor,
                                  corrector="none")
    sigma_eps = 0.02 if sde == "ve" else math.sqrt(math.expm1(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3))
    return x.double().var().item() / (0.25 * 0.25 / (0.25 + sigma_eps**2)) - 1


@pytest.mark.parametrize("sde", score_sde.SDES)
@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_predictors_converge_on_gaussian_data(sde, predictor):
    """Both predictors sample N(0, s^2 I) data with a first-order error: 4x the steps, about 1/4 the variance
    error or less (the Monte Carlo error of the variance is 0.3%)."""
    coarse, fine = (abs(_variance_error(sde, predictor, n)) for n in (25, 100))
    assert fine < 0.1 and 2.5 < coarse / fine < 12, (coarse, fine)


def test_langevin_snr_acts_like_a_temperature():
    """At a fixed level, Langevin steps of e = 2 (snr |z| / |score|)^2 hold Gaussian data at a variance
    v / (1 - snr^2): the corrector alone, repeated, heats N(0, v I) by snr^2."""
    net = GaussianDenoiser(0.5, channels=3, resolution=4)
    g = torch.Generator().manual_seed(1)
    latents = score_sde.prior_latents(net, g, batch=1000)
    x, _ = score_sde.sample(net, latents, generator=g, num_steps=1, eps=0.5, predictor="none", n_corrector=100,
                                  snr=0.3, denoise=False)
    v = 0.25 + (0.02 * 5000**1.0) ** 2  # the level of t_0 = 1: sigma_max = 100
    assert x.double().var().item() / (v / (1 - 0.3**2)) == pytest.approx(1, abs=0.02)


def test_ald_images_do_not_depend_on_batch():
    """With one generator per sample and the annealed Langevin corrector, a sample is the same alone or batched."""
    net = AnalyticDenoiser(_toy_data(), math.inf, sigma_min=0.02, sigma_max=100)
    seeds = list(range(5))

    def run(batch_seeds):
        generators = rng.seeded_generators(batch_seeds)
        latents = score_sde.prior_latents(net, generators)
        return score_sde.sample(net, latents, generator=generators, num_steps=20, corrector="ald")[0]

    torch.testing.assert_close(run(seeds), torch.cat([run([s]) for s in seeds]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "options, word",
    [
        (dict(predictor="ddim"), "predictor"),
        (dict(corrector="hmc"), "corrector"),
        (dict(predictor="none", corrector="none"), "both"),
        (dict(snr=0), "snr"),
        (dict(num_steps=0), "num_steps"),
        (dict(eps=1.5), "eps"),
        (dict(sde="subvp"), "sde"),
    ],
)
def test_bad_options_raise_value_error(options, word):
    net = GaussianDenoiser(0.5)
    with pytest.raises(ValueError, match=word):
        score_sde.sample(net, torch.zeros([1, 1, 2, 2]), **options)


def test_finite_D_is_refused():
    """The score (D(x) - x) / sigma^2 holds for the Gaussian kernel only."""
    with pytest.raises(ValueError, match="D = inf"):
        score_sde.sample(AnalyticDenoiser(_toy_data(), 128), torch.zeros([1, 3, 2, 2]))


def test_default_sde_follows_the_network():
    """VPPrecond networks sample the VP SDE (prior at sigma(1) = 152), others the VE SDE (sigma_max = 100)."""
    model = torch.nn.Identity()
    vp = preconditioners.VPPrecond(model, img_resolution=2, img_channels=1)
    ve = preconditioners.VEPrecond(model, img_resolution=2, img_channels=1)
    for net, sigma_max in ((vp, math.sqrt(math.expm1(0.5 * 19.9 + 0.1))), (ve, 100.0)):
        latents = score_sde.prior_latents(net, torch.Generator().manual_seed(0), batch=4000)
        assert latents.std().item() == pytest.approx(sigma_max, rel=0.03)


@pytest.mark.slow
@pytest.mark.parametrize("precond", ["ve", "vp"])
def test_short_training_run_lowers_the_loss_and_samples(tmp_path, precond):
    """train.py --precond=ve|vp on 32 tiny images: the loss falls and the snapshot samples finite images."""
    data = make_dataset(tmp_path / "d.zip", count=32, labels=False)
    run_train(tmp_path / "run", [f"--data={data}", f"--precond={precond}", "--batch=16", "--lr=0.002", "--lr_rampup=0",
                                 "--duration=0.0016", "--tick=0.32", "--snap=5", "--grid=0"])
    ticks = [json.loads(line)["loss"] for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(ticks) == 5 and np.mean(ticks[-2:]) < 0.7 * ticks[0], ticks
    net = checkpoint.load_network(next((tmp_path / "run").glob("network-snapshot-*.pt")))
    generators = rng.seeded_generators(range(4))
    latents = score_sde.prior_latents(net, generators)
    x, nfe = score_sde.sample(net, latents, generator=generators, num_steps=20)
    assert torch.isfinite(x).all() and nfe == 41
