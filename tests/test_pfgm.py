"""PFGM (D = 1): the field target against brute force, the perturbation against scipy, the helper against the
paper's CIFAR-10 values, the sampler against the exact field of a finite set, and a short training run."""

import json
import math
import multiprocessing
import os

import numpy as np
import pytest
import scipy.stats
import torch
from click.testing import CliRunner

from tests.helpers import make_dataset, run_train
from tests.oracles import PoissonFieldModel
from torch_utils import distributed, rng
from training import checkpoint, pfgmpp, preconditioners, samplers
from training.losses import pfgm
from training.train import config


def _points(count: int, shape=(2, 2, 2), scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn([count, *shape], generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _brute_force_field(x: np.ndarray, z: np.ndarray, data: np.ndarray, gamma: float) -> np.ndarray:
    """PFGM eq. (the empirical field in N + 1 dims), written out per point in float64: returns v [B, N + 1].

    E(x~) = sum_i (x~ - y~_i) / |x~ - y~_i|^(N+1) points away from the data; the target uses the opposite
    direction with the coefficients normalised to sum to 1, then sqrt(N + 1) E / (|E| + gamma).
    """
    B, N = x.shape
    out = np.zeros([B, N + 1])
    for b in range(B):
        point = np.append(x[b], z[b])
        charges = np.concatenate([data, np.zeros([len(data), 1])], axis=1)
        diff = point - charges
        dist = np.sqrt((diff**2).sum(axis=1))
        physical = (diff / dist[:, None] ** (N + 1)).sum(axis=0)
        E = -physical / (dist ** -(N + 1)).sum()
        out[b] = math.sqrt(N + 1) * E / (np.linalg.norm(E) + gamma)
    return out


def test_field_equals_brute_force_float64():
    data, x = _points(9, seed=1), _points(6, seed=2) * 1.5
    z = torch.tensor([1e-3, 0.05, 0.3, 1.0, 4.0, 50.0], dtype=torch.float64)
    v_x, v_z = pfgm.normalized_field(x, z, data, gamma=5.0)
    ours = torch.cat([v_x.flatten(1), v_z[:, None]], dim=1).numpy()
    expected = _brute_force_field(x.flatten(1).numpy(), z.numpy(), data.flatten(1).numpy(), 5.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_field_does_not_depend_on_chunking():
    data, x = _points(50, seed=3), _points(7, seed=4) * 2
    z = torch.linspace(0.01, 3, 7, dtype=torch.float64)
    reference = pfgm.normalized_field(x, z, data, chunk=1024)
    for chunk in (1, 3, 17):
        for ours, expected in zip(pfgm.normalized_field(x, z, data, chunk=chunk), reference):
            torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gamma", [0.0, 5.0])
def test_field_of_one_point_points_at_it(gamma):
    """One charge: v is parallel to (y - x, -z), of norm sqrt(N + 1) d / (d + gamma), d = |(y - x, z)|."""
    y, x = _points(1, seed=5), _points(4, seed=6) * 3
    z = torch.tensor([0.01, 0.5, 2.0, 20.0], dtype=torch.float64)
    v_x, v_z = pfgm.normalized_field(x, z, y, gamma=gamma)
    v = torch.cat([v_x.flatten(1), v_z[:, None]], dim=1)
    toward = torch.cat([(y - x).flatten(1), -z[:, None]], dim=1)
    d = toward.norm(dim=1)
    torch.testing.assert_close(v / v.norm(dim=1, keepdim=True), toward / d[:, None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v.norm(dim=1), math.sqrt(9) * d / (d + gamma), rtol=1e-12, atol=1e-12)


def test_perturbation_distribution():
    """|n| / z ~ chi_N / |g| for any m, i.e. |n|^2 / (N z^2) ~ F(N, 1); and m ~ U(0, M) or, for draws whose
    Gaussian z is below 0.005, U(0, int(0.7 M)) (P = Phi(0.5) at sigma_end = 0.01), read from the norm of
    the (N + 1)-vector (n, z) = sigma_end (1 + tau)^m (eps_x, |eps_z|) at N = 3072."""
    N, M, tau, sigma_end, count = 3072, 291, 0.03, 0.01, 4000
    g = torch.Generator().manual_seed(0)
    for restrict in (False, True):
        z, n = pfgm.perturb([count, 3, 32, 32], M, tau, sigma_end, restrict_M=restrict, generator=g)
        n2, z2 = n.double().flatten(1).square().sum(dim=1), z.double().square()
        assert scipy.stats.kstest((n2 / (N * z2)).numpy(), scipy.stats.f(N, 1).cdf).pvalue > 1e-3
        m = (torch.log((n2 + z2) / (N + 1)) / 2 - math.log(sigma_end)) / math.log1p(tau)
        share = scipy.stats.norm.cdf(0.5) if restrict else 0.0

        def cdf(u, share=share):
            return share * np.clip(u / int(0.7 * M), 0, 1) + (1 - share) * np.clip(u / M, 0, 1)

        assert scipy.stats.kstest(m.numpy(), cdf).pvalue > 1e-3


def test_perturbation_is_deterministic_given_the_generator():
    a = pfgm.perturb([5, 3, 4, 4], 50, generator=torch.Generator().manual_seed(7))
    b = pfgm.perturb([5, 3, 4, 4], 50, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError, match="M > 0"):
        pfgm.perturb([5, 3, 4, 4], 0)


def test_hparams_reproduce_cifar10():
    """Golden values: PFGM's CIFAR-10 configs (Newbeeer/Poisson_flow, configs/poisson/cifar10_*.py) use
    training.M = 291, sampling.z_max = 40, sampling.upper_norm = 3000, from its hyperparam_calculator.py with
    DATA_NORM = 32 ("32 for cifar"), N = 3072 + 1, sigma = 0.01, tau = 0.03. The calculator's formula gives
    M = 291 exactly; z_max = 43.41 and upper_norm = 3015.9, which the configs round down to 40 and 3000."""
    h = pfgm.derive_hparams(32, 3072)
    assert h["M"] == 291
    scale = 0.01 * 1.03**291
    assert h["z_max"] == pytest.approx(math.sqrt(2 / math.pi) * scale) and h["z_max"] == pytest.approx(43.41, abs=0.01)
    assert h["upper_norm"] == pytest.approx(math.sqrt(3073) * scale) and h["upper_norm"] == pytest.approx(3015.9, abs=0.1)
    assert 40 <= h["z_max"] < 1.1 * 40 and 3000 <= h["upper_norm"] < 1.01 * 3000
    with pytest.raises(ValueError, match="data_norm"):
        pfgm.derive_hparams(0, 3072)


def _hparams_cli():
    """pfgmpp-pfgm-hparams (training/cli/pfgm_hparams.py), imported here so that an import error fails its tests only."""
    from training.cli import pfgm_hparams

    return pfgm_hparams.main


def test_hparams_cli(tmp_path):
    main = _hparams_cli()
    result = CliRunner().invoke(main, ["--data_norm=32", "--resolution=32", "--channels=3"])
    assert result.exit_code == 0 and "M          = 291" in result.output, result.output
    data = make_dataset(tmp_path / "d.zip", count=8, labels=False)
    result = CliRunner().invoke(main, [f"--data={data}", "--json"])
    report = json.loads(result.output)
    assert report["N"] == 192 and report["M"] == pfgm.derive_hparams(report["data_norm"], 192)["M"]
    missing = CliRunner().invoke(main, [])
    assert missing.exit_code == 1 and "--data_norm" in missing.output and "Traceback" not in missing.output


def _pfgm_net(data: torch.Tensor, **kwargs) -> preconditioners.PFGMPrecond:
    kwargs = {"z_exp": 0.0, "sigma_min": 1e-4, "sigma_max": 200.0, "upper_norm": 1e9, **kwargs}
    return preconditioners.PFGMPrecond(PoissonFieldModel(data), img_resolution=data.shape[-1],
                                       img_channels=data.shape[1], **kwargs)


def test_pfgm_network_is_the_d1_denoiser():
    """x - z v_x / v_z of the exact field equals E[y | x] under the PFGM++ kernel at D = 1, r = z."""
    data = _points(16, shape=(3, 2, 2), scale=0.5, seed=8).float()
    net = _pfgm_net(data)
    x = _points(5, shape=(3, 2, 2), scale=3, seed=9)
    z = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(net(x, z).double(), pfgmpp.posterior_mean(x, z, 1, data), rtol=1e-5, atol=1e-5)


def test_z_substitution_is_exact_when_z_is_small():
    """PFGM App. B.2.3: below z_exp, v_z implied by |v_x| matches the exact v_z when z << |E_x|."""
    data = _points(16, shape=(3, 2, 2), scale=0.5, seed=8).float()
    x = _points(4, shape=(3, 2, 2), scale=3, seed=10).float()
    z = torch.full([4], 1e-3)
    v_x, v_z = pfgm.normalized_field(x, z, data)
    net = _pfgm_net(data, z_exp=5.0)
    torch.testing.assert_close(net.z_component(v_x.float(), torch.zeros(4), z), v_z.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("solver, steps", [("pfgm_rk45", None), ("pfgm_improved_euler", 100)])
def test_sampler_with_exact_field_reproduces_finite_data_set(solver, steps):
    """The backward ODE in ln z maps the (clip-free) prior onto the 16 points, each with mass 1/16."""
    data = _points(16, shape=(3, 2, 2), scale=0.5, seed=1).float()
    data -= data.mean(dim=0)
    net = _pfgm_net(data)
    latents = samplers.prior_latents(net, rng.seeded_generators(range(2000)), solver=solver)
    info = samplers.SampleInfo()
    x = samplers.sample(net, latents, solver=solver, num_steps=steps, denoise=True, info=info)
    assert info.nfe == net.model.calls and (steps is None or info.nfe == 2 * steps + 1)
    dist = torch.cdist(x.reshape(len(x), -1).double(), data.reshape(16, -1).double())
    nearest, index = dist.min(dim=1)
    assert nearest.max() < 1e-3
    assert scipy.stats.chisquare(torch.bincount(index, minlength=16).numpy()).pvalue > 1e-3


def test_prior_norm_is_clipped_by_upper_norm():
    """The prior (the D = 1 kernel at z_max) keeps its direction; norms above upper_norm are cut to it."""
    data = _points(4, shape=(3, 2, 2)).float()
    free = samplers.prior_latents(_pfgm_net(data, sigma_max=40.0), rng.seeded_generators(range(500)), solver="pfgm_rk45")
    clipped = samplers.prior_latents(_pfgm_net(data, sigma_max=40.0, upper_norm=300.0), rng.seeded_generators(range(500)),
                                     solver="pfgm_rk45")
    norms = free.flatten(1).norm(dim=1)
    assert (norms > 300).any() and (norms < 300).any()
    torch.testing.assert_close(clipped.flatten(1).norm(dim=1), norms.clamp(max=300.0))
    torch.testing.assert_close(clipped / clipped.flatten(1).norm(dim=1)[:, None, None, None], free / norms[:, None, None, None])


def test_loss_is_zero_for_the_exact_field_and_shaped_n_plus_1():
    """The target is the field of the training batch plus the reference batch; the exact field scores 0."""
    data = _points(12, shape=(3, 2, 2), scale=0.5, seed=11).float()
    net = _pfgm_net(data)
    loss_fn = pfgm.PFGMLoss(M=291)
    loss = loss_fn(net, data[:4], reference=data[4:], generator=torch.Generator().manual_seed(0))
    assert loss.shape == (4, 13) and loss.max() < 1e-8
    without_reference = loss_fn(net, data[:4], generator=torch.Generator().manual_seed(0))
    assert without_reference.max() > 1e-4
    with pytest.raises(ValueError, match="unconditional"):
        loss_fn(net, data[:4], labels=torch.zeros(4, 2))


def _gather_worker(rank: int, world: int, init: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = distributed.all_gather(torch.full([2, 3], float(rank)))
        expected = torch.arange(world).float().repeat_interleave(2)[:, None].expand(-1, 3)
        os._exit(0 if torch.equal(out, expected) else 1)
    finally:
        torch.distributed.destroy_process_group()


def test_all_gather_concatenates_ranks_in_order(tmp_path):
    """World size 1: the identity. Two gloo ranks: both receive rank 0's rows, then rank 1's."""
    x = torch.randn(3, 2)
    assert distributed.all_gather(x) is x
    context = multiprocessing.get_context("fork")  # no re-import of this module: much faster than spawn
    workers = [context.Process(target=_gather_worker, args=(r, 2, f"file://{tmp_path / 'store'}")) for r in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]


class _CifarShape:
    """What `config.complete` reads of a dataset of 32x32 RGB images (their norm is patched in)."""

    num_channels, resolution, label_dim = 3, 32, 0


def test_config_checks_pfgm_options(monkeypatch):
    monkeypatch.setattr(pfgm, "average_norm", lambda dataset: 32.0)
    c = config.training_config(data="x", precond="pfgm", augment=0)
    assert c.loss_kwargs["M"] is None and c.precond_kwargs["sigma_max"] is None and c.D == 1
    config.complete(c, _CifarShape())
    assert c.loss_kwargs["M"] == 291 and c.precond_kwargs["upper_norm"] == pytest.approx(3015.9, abs=0.1)
    for options, word in ((dict(precond="pfgm", cond=True), "--cond"), (dict(gamma=5.0), "--gamma"),
                          (dict(precond="pfgm", pfgmpp=True, aug_dim=1), "--pfgmpp"),
                          (dict(precond="pfgm", z_min=50.0, z_max=40.0), "--z_min")):
        with pytest.raises(ValueError, match=word):
            config.training_config(data="x", **options)
    c = config.training_config(data="x", precond="pfgm", rbatch=4097, world_size=2, batch=8)
    with pytest.raises(ValueError, match="--rbatch"):  # the reference batch is the loss's, known once it is built
        config.complete(c, _CifarShape(), world_size=2)


@pytest.mark.slow
def test_short_training_run_lowers_the_loss_and_samples(tmp_path):
    """train.py --precond=pfgm on 32 tiny images: the loss falls, the snapshot reloads as a PFGM network with
    the derived settings, and its samples are finite."""
    data = make_dataset(tmp_path / "d.zip", count=32, labels=False)
    run_train(tmp_path / "run", [f"--data={data}", "--precond=pfgm", "--batch=16", "--rbatch=64", "--lr=0.002",
                                 "--lr_rampup=0", "--duration=0.0016", "--tick=0.32", "--snap=5", "--grid=4"])
    ticks = [json.loads(line)["loss"] for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(ticks) == 5 and np.mean(ticks[-2:]) < 0.7 * ticks[0], ticks
    options = json.loads((tmp_path / "run" / "training_options.json").read_text())
    net = checkpoint.load_network(next((tmp_path / "run").glob("network-snapshot-*.pt")))
    assert isinstance(net, preconditioners.PFGMPrecond) and net.D == 1
    assert net.upper_norm == pytest.approx(options["precond_kwargs"]["upper_norm"]) and net.sigma_max > 1
    for solver, options in (("pfgm_rk45", {}), ("pfgm_euler", dict(num_steps=10)), ("pfgm_improved_euler", dict(num_steps=10))):
        latents = samplers.prior_latents(net, rng.seeded_generators(range(4)), solver=solver)
        info = samplers.SampleInfo()
        x = samplers.sample(net, latents, solver=solver, info=info, **options)
        assert torch.isfinite(x).all() and info.nfe > 0
    assert os.path.exists(tmp_path / "run" / "samples-000001.png")


@pytest.mark.parametrize("option", ["--data_norm=inf", "--tau=inf", "--sigma_end=nan"])
def test_hparams_cli_refuses_non_finite_values_in_one_line(option):
    main = _hparams_cli()
    result = CliRunner().invoke(main, ["--data_norm=32", option])
    assert result.exit_code != 0 and "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    assert "finite" in result.output or "Invalid value" in result.output, result.output


@pytest.mark.parametrize("solver, options", [("pfgm_euler", dict(num_steps=8)), ("pfgm_rk45", {})])
def test_a_z_range_beyond_the_network_is_clamped_for_prior_and_sampler_alike(solver, options):
    """z_max above the network's (or z_min below it) is the network's own, for the prior and the solver alike."""
    data = _points(4, shape=(3, 2, 2)).float()
    net = _pfgm_net(data, sigma_max=40.0, sigma_min=0.01)

    def run(**z_range):
        latents = samplers.prior_latents(net, rng.seeded_generators(range(3)), solver=solver, **z_range)
        return latents, samplers.sample(net, latents, solver=solver, **options, **z_range)

    inside, beyond = run(sigma_max=40.0, sigma_min=0.01), run(sigma_max=1000.0, sigma_min=1e-6)
    assert torch.equal(inside[0], beyond[0]) and torch.equal(inside[1], beyond[1])
