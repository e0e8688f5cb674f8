"""train.py refuses, in one line and before it writes anything, what would give a wrong run or a traceback: a
resume with other options or from a damaged file, a --transfer that does not load or does not fit, and a run
directory that already holds a run."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import torch
from click.testing import CliRunner

import train
from tests.helpers import TINY, make_dataset, run_train, tiny_network
from training import checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (D = 64) with its training state and network snapshot."""
    root = tmp_path_factory.mktemp("errors")
    data = make_dataset(root / "data.zip")
    args = [f"--data={data}", "--pfgmpp=1", "--aug_dim=64", "--batch=8", "--duration=0.000016", "--tick=0.008", "--snap=1"]
    run_train(root / "run", args)
    state = checkpoint.find_resume_state(root / "run")  # the last, training-state-000000.016.pt: two ticks of 8
    return dict(root=root, args=args, state=state,
                snapshot=root / "run" / state.name.replace("training-state-", "network-snapshot-"))


class Shell:
    """Pickles as a call to os.system: what a malicious checkpoint holds."""

    def __reduce__(self):
        return os.system, ("echo pwned",)


def _damaged(run, kind: str, folder):
    """A file of `kind` in `folder`: a cut-short state, random bytes, a pickle that runs code."""
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        data = run["state"].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_bytes(pickle.dumps({"ema": Shell()}))
    return path


def _other_width_snapshot(folder):
    torch.manual_seed(0)
    net = tiny_network(D=64.0)  # model_channels 8 with other levels than the run's network
    checkpoint.save_network(folder / "other.pt", net)
    return folder / "other.pt"


CASES = {
    "resume with another D": (lambda run, tmp: ["--aug_dim=2048", f"--resume={run['state']}"],
                              "--aug_dim 64 in the state, 2048 now"),
    "resume with another preconditioner": (lambda run, tmp: ["--precond=vp", f"--resume={run['state']}"],
                                           '--precond "edm" in the state, "vp" now'),
    "resume with another width": (lambda run, tmp: ["--cbase=16", f"--resume={run['state']}"],
                                  "--cbase 8 in the state, 16 now"),
    "resume from a cut-short state": (lambda run, tmp: [f"--resume={_damaged(run, 'truncated', tmp)}"],
                                      "is not a readable training state"),
    "resume from random bytes": (lambda run, tmp: [f"--resume={_damaged(run, 'random', tmp)}"],
                                 "is not a readable training state"),
    "resume from a network snapshot": (lambda run, tmp: [f"--resume={run['snapshot']}"],
                                       "is a network snapshot, not a training state"),
    "transfer of a cut-short state": (lambda run, tmp: [f"--transfer={_damaged(run, 'truncated', tmp)}"],
                                      "is not a readable network checkpoint"),
    "transfer of a malicious pickle": (lambda run, tmp: [f"--transfer={_damaged(run, 'malicious', tmp)}"],
                                       "not on the allow-list"),
    "transfer of another architecture": (lambda run, tmp: [f"--transfer={_other_width_snapshot(tmp)}"],
                                         "do not fit the network"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_anything_is_written(run, tmp_path, case):
    make_args, message = CASES[case]
    extra = make_args(run, tmp_path)
    outdir = tmp_path / "new-run"
    base = [a for a in run["args"] if "--precond=vp" not in extra or not a.startswith(("--pfgmpp", "--aug_dim"))]
    args = [f"--outdir={outdir}", "--nosubdir", *TINY, *base, *extra]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not outdir.exists()


def test_auto_resume_with_other_options_leaves_the_run_as_it_was(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run["root"] / "run", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = [f"--outdir={folder}", "--nosubdir", *TINY, *run["args"], "--aug_dim=128", "--resume=auto"]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 1 and "64 in the state, 128 now" in result.output, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_run_directory_is_never_overwritten_without_resume(run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run["root"] / "run", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = CliRunner().invoke(train.main, [f"--outdir={folder}", "--nosubdir", *TINY, *run["args"]])
    assert result.exit_code == 1 and "already holds a run" in result.output and "--resume=auto" in result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_options_a_resume_may_change_are_accepted(run, tmp_path):
    """A longer duration, other tick/snapshot/state intervals and workers continue the run (docs/errors.md)."""
    folder = tmp_path / "run"
    shutil.copytree(run["root"] / "run", folder)
    args = [a for a in run["args"] if not a.startswith("--duration")]
    run_train(folder, [*args, "--duration=0.000024", "--tick=0.004", "--snap=2", "--dump=3", "--resume=auto"])
    assert checkpoint.read_state(checkpoint.find_resume_state(folder))["step"] == 3


def test_generate_reads_the_ema_of_a_training_state(run):
    """A training state names its network: it loads like a snapshot (its EMA, or its trained network)."""
    from_state = checkpoint.load_network(run["state"])
    from_snapshot = checkpoint.load_network(run["snapshot"])
    assert from_state.D == 64
    for key, value in from_snapshot.state_dict().items():
        assert torch.equal(from_state.state_dict()[key], value), key
    trained = checkpoint.load_network(run["state"], entry="net")
    assert any(not torch.equal(trained.state_dict()[k], v) for k, v in from_snapshot.state_dict().items())


def test_a_dataset_with_images_of_two_sizes_is_refused_before_the_run(tmp_path):
    """One odd image in a training ZIP: refused naming it, before any run directory exists (not mid-training)."""
    import io
    import json
    import zipfile

    import numpy as np
    import PIL.Image

    data = tmp_path / "mixed.zip"
    with zipfile.ZipFile(data, "w") as z:
        for i, side in enumerate([8] * 15 + [16]):
            buffer = io.BytesIO()
            PIL.Image.fromarray(np.zeros([side, side, 3], np.uint8)).save(buffer, format="PNG")
            z.writestr(f"00000/img{i:08d}.png", buffer.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": None}))
    outdir = tmp_path / "run"
    result = CliRunner().invoke(train.main, [f"--outdir={outdir}", "--nosubdir", *TINY, f"--data={data}", "--batch=8",
                                             "--duration=0.000016"])
    assert result.exit_code == 1 and "img00000015.png is 16x16" in result.output and "Traceback" not in result.output
    assert not outdir.exists()


def test_a_training_state_can_seed_a_new_run_with_other_options(run, tmp_path):
    """What the resume refusal advises: --transfer=STATE starts a new run (other --ema here) from the state's EMA."""
    args = [*run["args"], "--ema=0.1", f"--transfer={run['state']}"]
    run_train(tmp_path / "new", args)
    assert checkpoint.read_state(checkpoint.find_resume_state(tmp_path / "new"))["step"] == 2
