"""The extension points work as docs/architecture.md says: a new solver and a new metric are each one file
(tests/extensions/) plus one registry line, and the command-line tools use them without another change; every
registered solver, loss and preconditioner declares what the rest of the code reads of it."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from tests.detector_fixtures import write_detector
from tests.extensions import toy_metric, toy_solver
from tests.helpers import make_dataset, tiny_network
from torch_utils import rng
from training import checkpoint, metrics, samplers
from training.generation import images
from training.metrics import detector


def test_a_new_solver_is_one_file_and_one_registry_line(tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(samplers.SOLVERS, "toy", toy_solver.TOY)  # the registry line
    torch.manual_seed(0)
    checkpoint.save_network(tmp_path / "net.pt", tiny_network(D=64.0))
    args = [f"--network={tmp_path / 'net.pt'}", f"--outdir={tmp_path / 'out'}", "--seeds=0-5", "--batch=4",
            "--solver=toy", "--sigma_max=20", "--precision=fp32"]
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code == 0, result.output
    assert "toy: 1 network evaluations per batch" in result.output

    # Each image is the denoiser's output at sigma_max on its seed's prior draw, as the toy file defines it.
    net = checkpoint.load_network(tmp_path / "net.pt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device)
    latents = torch.cat([toy_solver.prior_latents(net, rng.seeded_generators([s], device), sigma_max=20.0) for s in range(6)])
    assert latents.flatten(1).std(dim=1).mean() > 10  # the prior at sigma_max = 20, not at sigma = 0
    expected = images.to_uint8(net(latents, 20.0)).cpu().numpy()
    written = np.stack([np.asarray(PIL.Image.open(tmp_path / "out" / f"{s:06d}.png")) for s in range(6)])
    tolerance = 0 if device.type == "cpu" else 1
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= tolerance

    # The library protocol counts its evaluations; an option it does not read is refused, by the CLI too.
    info = samplers.SampleInfo()
    samplers.sample(net, latents, solver="toy", info=info)
    assert info.nfe == 1
    with pytest.raises(samplers.UnknownOptions, match="num_steps"):
        samplers.sample(net, latents, solver="toy", num_steps=4)
    result = CliRunner().invoke(generate.main, [*args, "--steps=4"])
    assert result.exit_code != 0 and "--steps does not apply to --solver=toy; it reads --sigma_max" in result.output


def test_a_new_metric_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(metrics.METRICS, "toy", toy_metric.TOY)  # the registry line
    generated = make_dataset(tmp_path / "generated.zip", count=12, resolution=8, labels=False)
    reference = make_dataset(tmp_path / "reference.zip", count=20, resolution=16, labels=False)
    det_path = write_detector(tmp_path / "det.pt")
    args = ["calc", f"--images={generated}", "--num=12", f"--ref={reference}", f"--detector={det_path}", "--workers=0",
            "--metrics=toy,fid", f"--out={tmp_path / 'out.json'}"]
    result = CliRunner().invoke(fid.main, args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    assert list(results) == ["fid", "toy"]  # registry order

    # |mu - mu_ref| of the stand-in detector's features, computed here directly.
    det = detector.load_detector(str(det_path))
    from training.datasets import ImageFolderDataset

    def mean_features(path):
        pixels = torch.stack([torch.as_tensor(image) for image, _ in ImageFolderDataset(path)])
        return det.features(pixels).double().mean(dim=0)

    expected = float((mean_features(generated) - mean_features(reference)).norm())
    assert expected > 0 and results["toy"] == pytest.approx(expected, rel=1e-6)

    # It declared that it needs a reference: without --ref it is refused before any work.
    result = CliRunner().invoke(fid.main, [a for a in args if not a.startswith("--ref")])
    assert result.exit_code != 0 and "--ref is required for toy" in result.output


@pytest.mark.parametrize("name", list(samplers.SOLVERS))
def test_each_solver_declares_options_its_functions_take(name):
    """A registry entry names only keywords its functions take (a method that shares a function with its
    family may read fewer: pfgm_rk45 no num_steps, euler no alpha); a function that forwards **options to
    `noise_levels` takes its own keywords and that function's."""
    import inspect

    from training.samplers.levels import noise_levels

    entry = samplers.SOLVERS[name]

    def keywords(fn, positional):
        params = inspect.signature(fn).parameters
        bound = set(getattr(fn, "keywords", {}))  # functools.partial's fixed argument (the family's method)
        own = {p for p, v in params.items() if p not in positional and p not in bound and v.kind is not v.VAR_KEYWORD}
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # forwards the rest to noise_levels
            return own | keywords(noise_levels, {"net"})
        return own

    assert set(entry.options) <= keywords(entry.run, {"net", "latents", "class_labels", "generator"})
    assert set(entry.prior_options) <= keywords(entry.prior, {"net", "generator", "batch", "device"})
    assert set(entry.prior_options) <= set(entry.options)


def test_each_preconditioner_and_loss_declares_what_training_needs():
    """A loss reads objective options train.py has; each trainable preconditioner's default loss is registered and
    trains what it computes; output channels follow the preconditioner's own rule."""
    from training import losses, preconditioners
    from training.train import options

    for name, cls in losses.LOSSES.items():
        assert set(cls.options) <= set(options.objective()), name
        assert cls.needs is None or any(cls.needs in p.outputs for p in preconditioners.PRECONDITIONERS.values()), name
    for kind in preconditioners.trainable():
        precond = preconditioners.get(kind)
        assert losses.get(precond.default_loss).compatible(precond), kind
    assert [kind for kind, p in preconditioners.PRECONDITIONERS.items() if p.default_loss is None] == ["iddpm"]
    assert preconditioners.EDMPrecond.out_channels(3) == 3
    assert preconditioners.iDDPMPrecond.out_channels(3) == 6  # a mean and a variance per channel
    assert preconditioners.PFGMPrecond.out_channels(3) == 4  # v_x and the channel whose mean is v_z
    assert preconditioners.trainable() == ["edm", "edm2", "vp", "ve", "pfgm"]  # iDDPM: imported networks only
    # The losses' compatibility: an extra output of the preconditioner must be trained, and only by a loss that needs it.
    assert losses.EDMLoss.compatible(preconditioners.VPPrecond) and losses.VPLoss.compatible(preconditioners.EDMPrecond)
    assert not losses.EDMLoss.compatible(preconditioners.EDM2Precond)
    assert not losses.EDM2Loss.compatible(preconditioners.EDMPrecond)
    assert not losses.PFGMLoss.compatible(preconditioners.EDMPrecond)
