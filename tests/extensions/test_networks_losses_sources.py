"""The extension points work as docs/architecture.md says: a new network, a new loss with its train option and a
new dataset source are each one file (tests/extensions/) plus one registry line (and, for the option, one entry of
train.py's options table), and train.py, generate.py and dataset_tool.py use them without another change."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
import train
from tests.extensions import toy_loss, toy_network, toy_source
from tests.helpers import make_dataset
from training import checkpoint, datasets, losses, networks
from training.datasets import ImageFolderDataset
from training.train import config, setup
from training.train import options as train_options

SMALL = ["--batch=4", "--duration=0.000008", "--tick=0.004", "--snap=1", "--workers=0", "--precision=fp32", "--grid=4",
         "--seed=1"]  # two steps of 4 images


def _train(args: list[str], command=None):
    return CliRunner().invoke(command or train.main, [*SMALL, *args])


@pytest.fixture
def toy_net(monkeypatch):
    monkeypatch.setitem(networks.NETWORKS, "ToyNet", toy_network.ToyNet)  # the registry line


def test_a_new_network_is_one_file_and_one_registry_line(tmp_path, toy_net, one_thread):
    data = make_dataset(tmp_path / "data.zip", count=8, labels=False)
    result = _train([f"--outdir={tmp_path / 'runs'}", f"--data={data}", "--arch=toy-s"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert "-toy-edm-" in run.name  # the network's short name in the run directory's name

    # Its snapshot loads through the allow-list of the registry, and generate.py samples it.
    net = checkpoint.load_network(run / "network-snapshot-000000.pt")
    assert type(net.model) is toy_network.ToyNet and net.model.conv0.out_channels == 8  # the preset's width
    result = CliRunner().invoke(generate.main, [f"--network={run / 'network-snapshot-000000.pt'}", "--seeds=0-2",
                                                f"--outdir={tmp_path / 'images'}", "--steps=4", "--precision=fp32"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]

    # Its own check runs before anything is written; its initial weights are a function of --seed.
    result = _train([f"--outdir={tmp_path / 'big'}", f"--data={data}", "--arch=toy-s", "--cbase=100"])
    assert result.exit_code != 0 and "ToyNet takes model_channels <= 64" in result.output
    assert not (tmp_path / "big").exists()
    c = config.training_config(data=str(data), arch="toy-s")
    dataset = ImageFolderDataset(str(data))
    a, b = (setup.build_denoiser(c, dataset, torch.device("cpu")).state_dict() for _ in range(2))
    other = setup.build_denoiser(c, dataset, torch.device("cpu"), seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["model.conv0.weight"], other["model.conv0.weight"])


@pytest.fixture
def toy(monkeypatch):
    """The toy loss and its option, registered: one registry line and one table entry."""
    monkeypatch.setitem(losses.LOSSES, "toy", toy_loss.ToyLoss)
    monkeypatch.setitem(train_options.OPTIONS, "toy_sigma", toy_loss.OPTION)
    return train.command()  # train.py's command, made from the table as it now is


def test_a_new_loss_and_its_option_are_one_file_a_registry_line_and_a_table_entry(tmp_path, toy, one_thread):
    data = make_dataset(tmp_path / "data.zip", count=8, labels=False)
    tiny = ["--arch=ddpmpp", "--cbase=8", "--cres=1", "--nblock=1", "--attn=", "--augment=0", "--dropout=0"]
    assert "--toy_sigma" in CliRunner().invoke(toy, ["--help"]).output
    out = tmp_path / "run"
    result = _train([f"--outdir={out}", "--nosubdir", f"--data={data}", *tiny, "--loss=toy", "--toy_sigma=3"], toy)
    assert result.exit_code == 0, result.output

    # The configuration holds the option under its flag's name, and the loss got it.
    options = json.loads((out / "training_options.json").read_text())
    assert options["loss"] == "toy" and options["toy_sigma"] == 3.0 and options["loss_kwargs"]["toy_sigma"] == 3.0
    assert isinstance(config.build_loss(options), toy_loss.ToyLoss)
    # Every sample was trained at sigma = 3: only the 1-5 bucket of the per-sigma loss saw any.
    for line in (out / "stats.jsonl").read_text().splitlines():
        seen = {name for name, value in json.loads(line)["loss_by_sigma"].items() if value is not None}
        assert seen == {"1-5"}

    # It defines the objective: another loss refuses it, naming the loss that reads it, and a resume may not change it.
    result = _train([f"--outdir={tmp_path / 'other'}", f"--data={data}", *tiny, "--toy_sigma=3"], toy)
    assert result.exit_code != 0 and "--toy_sigma applies only to --loss=toy, not to --precond=edm" in result.output
    result = _train([f"--outdir={out}", "--nosubdir", "--resume=auto", f"--data={data}", *tiny, "--loss=toy",
                     "--toy_sigma=2", "--duration=0.000016"], toy)
    assert result.exit_code != 0 and "--toy_sigma 3 in the state, 2 now" in result.output
    # Its range is checked in the command line and in the library.
    result = _train([f"--outdir={tmp_path / 'bad'}", f"--data={data}", *tiny, "--loss=toy", "--toy_sigma=0"], toy)
    assert result.exit_code != 0 and "--toy_sigma" in result.output and "Traceback" not in result.output
    with pytest.raises(ValueError, match="--toy_sigma must be > 0, got -1"):
        config.training_config(data=str(data), loss="toy", toy_sigma=-1.0)


def test_a_new_dataset_source_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets.SOURCES, "npy", toy_source.NPY_KIND)  # the registry line
    pixels = np.random.default_rng(0).integers(0, 256, size=[5, 8, 8, 3], dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    result = CliRunner().invoke(dataset_tool.main, [f"--source={tmp_path / 'images.npy'}", f"--dest={tmp_path / 'out.zip'}"])
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(str(tmp_path / "out.zip"))
    assert len(dataset) == 5 and dataset.label_dim == 0
    assert np.array_equal(np.stack([dataset[i][0] for i in range(5)]), pixels.transpose(0, 3, 1, 2))

    # Messages that list the kinds of source name it; its own errors say what is wrong.
    result = CliRunner().invoke(dataset_tool.main, [f"--source={tmp_path / 'missing'}", f"--dest={tmp_path / 'x.zip'}"])
    assert result.exit_code != 0 and "a .npy array of images" in result.output
    np.save(tmp_path / "floats.npy", pixels.astype(np.float32))
    result = CliRunner().invoke(dataset_tool.main, [f"--source={tmp_path / 'floats.npy'}", f"--dest={tmp_path / 'y.zip'}"])
    assert result.exit_code != 0 and "give uint8 images" in result.output and "Traceback" not in result.output
