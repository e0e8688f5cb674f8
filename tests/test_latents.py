"""Latents: encode/decode through the ODE for any D, interpolation, temperature, latent files and generate.py."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from tests.helpers import snapshot_and_dataset, tiny_network
from tests.oracles import AnalyticDenoiser, GaussianDenoiser
from torch_utils import rng
from training import pfgmpp, samplers
from training.generation import latents

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("D", [1.0, 128.0, math.inf])
def test_decode_of_encode_returns_the_input(D):
    """Analytic denoiser of 4 points: x ~ p_sigma_min -> latent at sigma_max -> x, to the solver's tolerance, any D.

    (x is perturbed at sigma_min: the data points themselves are the modes, whose latents sit near the prior's centre.)
    """
    g = torch.Generator().manual_seed(0)
    data = torch.rand([4, 1, 4, 4], generator=g, dtype=F64) * 2 - 1
    net = AnalyticDenoiser(data, D)
    x = data + pfgmpp.sample_perturbation(data, 0.002, D, g)
    z, nfe = latents.encode(net, x)
    back, _ = latents.decode(net, z)
    assert nfe > 10 and z.flatten(1).norm(dim=1).min() > 10 * x.flatten(1).norm(dim=1).max()
    torch.testing.assert_close(back, x, rtol=0, atol=1e-4)


def test_encode_of_gaussian_data_is_the_closed_form():
    """D = inf, N(0, s^2 I) data: x(sigma) = x sqrt((s^2 + sigma^2) / (s^2 + sigma_min^2)), exactly linear."""
    net = GaussianDenoiser(0.5, channels=1, resolution=2)
    x = torch.randn([5, 1, 2, 2], generator=torch.Generator().manual_seed(1), dtype=F64) * 0.5
    z, _ = latents.encode(net, x, sigma_min=0.01, sigma_max=20.0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(z, x * math.sqrt((0.25 + 400) / (0.25 + 1e-4)), rtol=1e-6, atol=0)


def test_interpolation_slerps_the_direction_and_the_radius_geometrically():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn([1, 3, 4, 4], generator=g, dtype=F64), 3 * torch.randn([1, 3, 4, 4], generator=g, dtype=F64)
    w = torch.linspace(0, 1, 7, dtype=F64)
    path = latents.interpolate(a, b, w)
    torch.testing.assert_close(path[0], a.reshape(-1))
    torch.testing.assert_close(path[-1], b.reshape(-1))
    radius = path.norm(dim=1)
    torch.testing.assert_close(radius, a.norm() ** (1 - w) * b.norm() ** w)
    u_a = a.reshape(-1) / a.norm()
    angle = torch.arccos(((path / radius[:, None]) @ u_a).clamp(-1, 1))
    torch.testing.assert_close(angle, w * angle[-1])  # constant angular speed on the great circle
    same = latents.interpolate(a, 2 * a, [0.5])  # one direction: only the radius moves
    torch.testing.assert_close(same[0], math.sqrt(2) * a.reshape(-1))
    with pytest.raises(ValueError, match="differ in size"):
        latents.interpolate(a, b[:, :2], w)
    with pytest.raises(ValueError, match="zero"):
        latents.interpolate(a, torch.zeros_like(a), w)


def test_temperature_scales_the_radius_only():
    z = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latents.temperature(z, 0.7), 0.7 * z)
    for tau in (0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            latents.temperature(z, tau)


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_latent_files_round_trip_and_unsafe_files_are_refused(tmp_path, suffix):
    z = torch.randn([3, 4, 4], generator=torch.Generator().manual_seed(4))
    latents.save_latent(tmp_path / f"z{suffix}", z)
    torch.testing.assert_close(latents.load_latent(tmp_path / f"z{suffix}", [1, 3, 4, 4]), z.reshape(1, 3, 4, 4).double())
    with pytest.raises(ValueError, match="not a latent of shape"):
        latents.load_latent(tmp_path / f"z{suffix}", [1, 3, 8, 8])
    if suffix == ".pt":
        torch.save({"code": object()}, tmp_path / "evil.pt")  # a pickle that would need arbitrary globals
        with pytest.raises(ValueError, match="cannot read"):
            latents.load_latent(tmp_path / "evil.pt", [1, 3, 4, 4])
    else:
        np.save(tmp_path / "evil.npy", np.array([object()], dtype=object), allow_pickle=True)
        with pytest.raises(ValueError, match="cannot read"):
            latents.load_latent(tmp_path / "evil.npy", [1, 3, 4, 4])


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return snapshot_and_dataset(tmp_path_factory.mktemp("latents"), count=3)


def run(args, ok=True):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_generate_encode_writes_latents_that_decode_to_the_images(snapshot, tmp_path):
    """--encode: one latent per image; decoding gives every image back exactly in 8 bits; the grid shows both."""
    net, data = snapshot
    result = run(["--network", net, "--encode", data, "--outdir", tmp_path / "z", "--grid", tmp_path / "rt.png",
                  "--batch", 2, "--latent_format", "pt"])
    assert "3 exact in 8 bits" in result.output
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == ["000000.pt", "000001.pt", "000002.pt"]
    assert PIL.Image.open(tmp_path / "rt.png").size == (3 * 9 - 1, 2 * 9 - 1)  # inputs over reconstructions


def test_generate_interpolate_and_temperature_grids(snapshot, tmp_path):
    """--interpolate's first frame is generate.py's image of seed A; --temperature=1 reproduces the plain grid."""
    net, _ = snapshot
    steps = ["--steps", 4]
    run(["--network", net, "--interpolate", "3,5", "--frames", 4, "--grid", tmp_path / "walk.png", *steps])
    walk = np.asarray(PIL.Image.open(tmp_path / "walk.png"))
    assert walk.shape == (8, 4 * 9 - 1, 3)
    run(["--network", net, "--seeds", "3", "--grid", tmp_path / "three.png", *steps])
    assert np.abs(walk[:, :8].astype(int) - np.asarray(PIL.Image.open(tmp_path / "three.png")).astype(int)).max() <= 1
    run(["--network", net, "--seeds", "0-2", "--temperature", "1,0.5", "--grid", tmp_path / "t.png", *steps])
    grid = np.asarray(PIL.Image.open(tmp_path / "t.png"))
    assert grid.shape == (2 * 9 - 1, 3 * 9 - 1, 3)
    run(["--network", net, "--seeds", "0-2", "--grid", tmp_path / "plain.png", *steps])
    plain = np.asarray(PIL.Image.open(tmp_path / "plain.png"))
    assert np.abs(grid[:8, :17].astype(int) - plain[:8, :17].astype(int)).max() <= 1  # seeds 0 and 1 (plain is 2 x 2)


def test_generate_interpolates_encoded_latents(snapshot, tmp_path):
    net, data = snapshot
    run(["--network", net, "--encode", data, "--outdir", tmp_path / "z"])
    run(["--network", net, "--interpolate", f"{tmp_path / 'z' / '000000.npy'},1", "--frames", 3,
         "--grid", tmp_path / "w.png", "--steps", 4])
    assert PIL.Image.open(tmp_path / "w.png").size == (3 * 9 - 1, 8)


@pytest.mark.parametrize("args, message", [
    (["--encode", "x.zip", "--temperature", "1", "--outdir", "o"], "cannot be combined"),
    (["--interpolate", "1,2"], "give --grid"),
    (["--encode", "x.zip", "--grid", "g.png"], "give --outdir"),
    (["--temperature", "0,1", "--grid", "g.png"], "finite numbers > 0"),
    (["--interpolate", "1,2,3", "--grid", "g.png"], "two seeds or latent files"),
    (["--interpolate", "1,missing.npy", "--grid", "g.png"], "cannot read the latent"),
])
def test_latent_mode_errors_are_click_errors(snapshot, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = run(["--network", snapshot[0], *args], ok=False)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_seed_latent_is_generate_pys_prior_draw():
    """The latent of seed s is the prior draw generate.py makes for s (one generator per seed)."""
    net = tiny_network(channels=1, D=64.0)
    settings = samplers.SamplerSettings("heun", dict(num_steps=4))
    z, label = latents.seed_latent(net, 7, "cpu", settings)
    torch.testing.assert_close(z, samplers.prior_latents(net, rng.seeded_generators([7]), num_steps=4))
    assert label is None
