"""The allow-listed unpickler: EDM-format records load as data, nothing in a file is executed."""

import os
import pickle

import numpy as np
import pytest
import torch

from tests import edm_fixtures as fx
from training.checkpoint import legacy


class Leaf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
        self.register_buffer("resample_filter", torch.tensor([1.0, 3.0, 3.0, 1.0]))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


class Tree(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.ModuleDict({"32x32_conv": Leaf(), "16x16_down": Leaf()})
        self.bias = torch.nn.Parameter(torch.tensor([0.5, -0.5], dtype=torch.float64))


def _record(tmp_path):
    marker = tmp_path / "MARKER"
    return fx.as_edm_record(Tree(), fx.marker_source(marker), init_kwargs={"channels": 3}), marker


@pytest.mark.parametrize("container", ["pkl", "pt"])
def test_records_load_as_data_and_source_is_never_run(tmp_path, container):
    record, marker = _record(tmp_path)
    data = {"ema": record, "step": 1234, "dataset_kwargs": {"path": "x.zip", "xflip": False}}
    path = (fx.write_pickle if container == "pkl" else fx.write_torch)(tmp_path / f"ckpt.{container}", data)
    loaded = legacy.safe_load(path)
    assert not marker.exists()
    assert loaded["step"] == 1234 and loaded["dataset_kwargs"]["path"] == "x.zip"
    ema = loaded["ema"]
    assert isinstance(ema, legacy.PersistentRecord) and ema.class_name == "Tree"
    assert "pathlib" in ema.module_src and ema.state["_init_kwargs"] == {"channels": 3}
    state = legacy.module_state_dict(ema)
    expected = Tree().state_dict()
    assert sorted(state) == sorted(expected)  # non-persistent buffers are skipped
    for key, value in expected.items():
        assert torch.equal(state[key], value) and state[key].dtype == value.dtype


def test_the_fixture_really_runs_code_under_a_plain_unpickler(tmp_path):
    """The danger we guard against: EDM's loader execs module_src. The marker proves the fixture is live."""
    record, marker = _record(tmp_path)
    path = fx.write_pickle(tmp_path / "ckpt.pkl", {"ema": record})
    with fx.persistence_module(reconstruct=lambda meta: exec(meta["module_src"], {})):
        pickle.loads(path.read_bytes())
    assert marker.exists()


class _Exploit:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def test_a_pickle_calling_os_system_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Exploit()}))
    with pytest.raises(legacy.UnsafeCheckpointError, match=r"(posix|os)\.system"):
        legacy.safe_load(path)


@pytest.mark.parametrize("spelling", [b"numpy._core.multiarray", b"numpy.core.multiarray"])
def test_numpy_scalars_in_both_spellings(tmp_path, spelling):
    """numpy >= 2 writes numpy._core.multiarray.scalar, numpy 1 numpy.core.multiarray.scalar."""
    raw = pickle.dumps({"lr": np.float64(0.001), "n": np.int64(7)}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray\nscalar", spelling + b"\nscalar")
    assert spelling + b"\nscalar" in raw
    path = tmp_path / "scalars.pkl"
    path.write_bytes(raw)
    loaded = legacy.safe_load(path)
    assert loaded == {"lr": 0.001, "n": 7} and isinstance(loaded["lr"], np.float64)


def test_object_dtype_scalars_are_refused(tmp_path):
    raw = pickle.dumps(np.float64(1.0), protocol=2).replace(b"f8", b"O8")
    path = tmp_path / "obj.pkl"
    path.write_bytes(raw)
    with pytest.raises(legacy.UnsafeCheckpointError, match="object"):
        legacy.safe_load(path)


def test_shared_storage_views_stay_views(tmp_path):
    base = torch.arange(10.0)
    path = tmp_path / "views.pt"
    torch.save({"a": base, "b": base[2:5]}, path)
    loaded = legacy.safe_load(path)
    assert torch.equal(loaded["b"], torch.tensor([2.0, 3.0, 4.0]))
    loaded["a"][3] = -1
    assert loaded["b"][1] == -1


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        legacy.safe_load(path)
