"""Native snapshots round-trip exactly; EDM / PFGM++ checkpoints import safely into our classes."""

import json
import math
import os
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from tests import edm_fixtures as fx
from training import checkpoint, networks, preconditioners
from training.cli import convert

TINY_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)
TINY_ADM = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)


def _net(precond="EDMPrecond", model="SongUNet", D=128.0, label_dim=0, seed=0, **model_kwargs):
    torch.manual_seed(seed)
    channels = 3
    out = channels * 2 if precond == "iDDPMPrecond" else channels
    kwargs = {**(TINY_SONG if model == "SongUNet" else TINY_ADM), **model_kwargs}
    inner = networks.NETWORKS[model](img_resolution=16, in_channels=channels, out_channels=out, label_dim=label_dim, **kwargs)
    cls = preconditioners.by_class_name(precond)
    return cls(inner, img_resolution=16, img_channels=channels, label_dim=label_dim, D=D).eval()


def _outputs(net, label_dim=0):
    g = torch.Generator().manual_seed(7)
    x = torch.randn([3, 3, 16, 16], generator=g)
    labels = torch.eye(label_dim)[:3] if label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor([0.1, 1.0, 10.0]), labels)


@pytest.mark.parametrize(
    "precond, model, D, label_dim",
    [("EDMPrecond", "SongUNet", 128.0, 0), ("EDMPrecond", "DhariwalUNet", math.inf, 4),
     ("VPPrecond", "SongUNet", math.inf, 0), ("VEPrecond", "SongUNet", 2048.0, 0), ("iDDPMPrecond", "DhariwalUNet", math.inf, 0)],
)
def test_native_round_trip_is_exact(tmp_path, precond, model, D, label_dim):
    net = _net(precond, model, D, label_dim)
    path = tmp_path / "network-snapshot-000100.pt"
    checkpoint.save_network(path, net, provenance={"dataset": "cifar10-32x32.zip", "kimg": 100})
    payload = torch.load(path, weights_only=True)  # loads with no code execution
    config = json.loads(payload["config"])
    assert config["D"] == ("inf" if math.isinf(D) else D) and config["precond"]["class_name"] == precond
    assert config["resolution"] == 16 and config["channels"] == 3 and config["label_dim"] == label_dim
    loaded = checkpoint.load_network(path)
    assert type(loaded) is type(net) and type(loaded.model) is type(net.model) and loaded.D == net.D
    assert loaded.provenance == {"dataset": "cifar10-32x32.zip", "kimg": 100}
    assert torch.equal(_outputs(loaded, label_dim), _outputs(net, label_dim))


def _rewrite(path, mutate):
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.update(config=p["config"].replace('"SongUNet"', '"EvilNet"')), "unknown network class 'EvilNet'"),
        (lambda p: p.update(config=p["config"].replace('"EDMPrecond"', '"os.system"')), "unknown preconditioner"),
        (lambda p: p["state_dict"].pop("model.map_layer0.weight"), "missing keys: model.map_layer0.weight"),
        (lambda p: p["state_dict"].update(extra=torch.zeros(1)), "unexpected keys: extra"),
        (lambda p: p["state_dict"].update({"model.map_layer0.bias": torch.zeros(5)}), "wrong shapes: model.map_layer0.bias"),
        (lambda p: p.update(version=99), "version 99"),
    ],
)
def test_bad_snapshots_are_refused_with_the_reason(tmp_path, mutate, message):
    path = tmp_path / "snap.pt"
    checkpoint.save_network(path, _net())
    _rewrite(path, mutate)
    with pytest.raises(ValueError, match=message):
        checkpoint.load_network(path)


def test_snapshot_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "snap.pt"
    checkpoint.save_network(path, _net(seed=1))
    before = path.read_bytes()

    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError):
        checkpoint.save_network(path, _net(seed=2))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["snap.pt"]


@pytest.mark.parametrize("layout", ["edm-pkl", "edm-training-state", "pfgmpp-training-state", "pfgmpp-pkl"])
def test_import_of_published_formats(tmp_path, layout):
    """EDM / PFGM++ files load into our classes with identical weights and outputs; their code never runs."""
    D = None if layout.startswith("edm") else 128.0
    net = _net(D=D if D is not None else math.inf, seed=3)
    marker = tmp_path / "MARKER"
    record = fx.edm_precond_record(net, fx.marker_source(marker), pfgmpp_D=D)
    if layout == "edm-pkl":
        path = fx.write_pickle(tmp_path / "network-snapshot-000200.pkl",
                               {"ema": record, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": {"path": "c.zip"}})
    elif layout == "edm-training-state":
        path = fx.write_torch(tmp_path / "training-state-000200.pt", {"net": record, "optimizer_state": {"state": {}}})
    elif layout == "pfgmpp-training-state":
        path = fx.write_torch(tmp_path / "training-state-000200.pt",
                              {"net": record, "ema": record, "optimizer_state": {"state": {}}, "step": 200000})
    else:
        path = fx.write_pickle(tmp_path / "training-state-000200.pkl", {"ema": record})
    loaded = checkpoint.load_network(path)
    assert not marker.exists()
    assert loaded.D == net.D and type(loaded.model) is type(net.model)
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(_outputs(loaded), _outputs(net))


def test_import_refuses_foreign_globals(tmp_path):

    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    path = fx.write_pickle(tmp_path / "network-snapshot-000000.pkl", {"ema": Evil()})
    with pytest.raises(ValueError, match="system"):
        checkpoint.load_network(path)


def test_convert_command(tmp_path):
    net = _net(D=64.0, seed=4)
    src = fx.write_pickle(tmp_path / "edm.pkl", {"ema": fx.edm_precond_record(net, "", pfgmpp_D=64.0)})
    dest = tmp_path / "converted.pt"
    result = CliRunner().invoke(convert.main, [str(src), str(dest)])
    assert result.exit_code == 0, result.output
    assert zipfile.is_zipfile(dest) and "D=64.0" in result.output
    assert torch.equal(_outputs(checkpoint.load_network(dest)), _outputs(net))
    bad = CliRunner().invoke(convert.main, [str(tmp_path / "missing.pkl"), str(tmp_path / "other.pt")])
    assert bad.exit_code == 1 and "no such file" in bad.output and "Traceback" not in bad.output


def test_convert_never_replaces_a_file_without_overwrite(tmp_path):
    src = tmp_path / "net.pt"
    checkpoint.save_network(src, _net(D=64.0, seed=4))
    dest = tmp_path / "unrelated.npz"
    dest.write_bytes(b"a user's file")
    refused = CliRunner().invoke(convert.main, [str(src), str(dest)])
    assert refused.exit_code == 1 and "--overwrite" in refused.output and dest.read_bytes() == b"a user's file"
    done = CliRunner().invoke(convert.main, [str(src), str(dest), "--overwrite"])
    assert done.exit_code == 0, done.output
    assert torch.equal(_outputs(checkpoint.load_network(dest)), _outputs(checkpoint.load_network(src)))


def test_safetensors_export_and_import(tmp_path):
    """A .safetensors snapshot holds the tensors and the configuration JSON in its metadata; it loads back exactly,
    and the safetensors library itself reads it."""
    from safetensors import safe_open

    net = _net(D=32.0, seed=6)
    checkpoint.save_network(tmp_path / "a.pt", net)
    result = CliRunner().invoke(convert.main, [str(tmp_path / "a.pt"), str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == checkpoint.FORMAT and json.loads(f.metadata()["config"])["D"] == 32.0
        assert set(f.keys()) == set(net.state_dict())
    loaded = checkpoint.load_network(tmp_path / "a.safetensors")
    assert isinstance(loaded, type(net)) and loaded.D == 32.0
    assert torch.equal(_outputs(loaded), _outputs(net))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="network configuration"):
        checkpoint.load_network(tmp_path / "foreign.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "truncated-safetensors", "undecodable", *(f"random{i}" for i in range(8))])
def test_a_damaged_network_file_is_a_one_line_error(tmp_path, damage):
    """Random bytes (seeded: each case is the same on every run) reach the unpickler in many shapes; every one is a
    one-line error. 'undecodable' is the shape os.urandom once produced in CI: a protocol-0 string the unpickler
    decodes as ASCII (a UnicodeDecodeError, which is a ValueError)."""
    net = _net(D=32.0, seed=7)
    suffix = ".safetensors" if "safetensors" in damage else ".pt"
    checkpoint.save_network(tmp_path / f"good{suffix}", net)
    data = (tmp_path / f"good{suffix}").read_bytes()
    if damage.startswith("random"):
        data = np.random.default_rng(int(damage.removeprefix("random"))).bytes(5000)
    elif damage == "undecodable":
        data = b"U\x01\xc9."  # SHORT_BINSTRING of one byte 0xC9, then STOP
    else:
        data = data[: len(data) * 2 // 3]
    (tmp_path / "bad.pt").write_bytes(data)
    with pytest.raises(ValueError, match="not a readable|not a network|not a torch checkpoint"):
        checkpoint.load_network(tmp_path / "bad.pt")
    result = CliRunner().invoke(convert.main, [str(tmp_path / "bad.pt"), str(tmp_path / "out.pt")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_load_from_url_uses_the_cache(tmp_path, http_dir, monkeypatch):
    folder, url = http_dir
    monkeypatch.setenv("PFGMPP_CACHE_DIR", str(tmp_path / "cache"))
    net = _net(D=32.0, seed=5)
    checkpoint.save_network(folder / "network-snapshot-000001.pt", net)
    loaded = checkpoint.load_network(f"{url}/network-snapshot-000001.pt")
    assert torch.equal(_outputs(loaded), _outputs(net))
    (folder / "network-snapshot-000001.pt").unlink()  # the second load comes from the cache
    assert torch.equal(_outputs(checkpoint.load_network(f"{url}/network-snapshot-000001.pt")), _outputs(net))
