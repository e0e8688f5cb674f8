"""train.py end to end on CPU: rank/accumulation invariance, exact resume, preemption, CLI errors."""

import json
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train
from tests.helpers import ROOT, TINY, final_state, make_dataset, run_train, tiny_network
from tests.helpers import assert_weights as _assert_weights
from tests.helpers import subprocess_env as _env
from training import checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny-8x8.zip")


def test_two_ranks_equal_one_rank_and_accumulation(data, tmp_path):
    """Same seed and global batch: torchrun with 2 ranks, 1 process, and --batch-gpu accumulation agree, with
    augmentation on (each sample's augmentation, like its noise, depends on its global position only)."""
    args = [f"--data={data}", "--cond=1", "--pfgmpp=1", "--aug_dim=64", "--batch=8", "--duration=0.000032", "--tick=0.016",
            "--augment=0.5"]
    run_train(tmp_path / "one", args)
    run_train(tmp_path / "accum", [*args, "--batch-gpu=2"])
    run_train(tmp_path / "two", args, nproc=2)
    one, accum, two = (final_state(tmp_path / d) for d in ("one", "accum", "two"))
    assert one["step"] == accum["step"] == two["step"] == 4
    _assert_weights(one["net"], accum["net"], exact=False)
    _assert_weights(one["net"], two["net"], exact=False)
    _assert_weights(one["ema"], two["ema"], exact=False)
    other_seed = run_train(tmp_path / "seed", [*args, "--seed=4"]) and final_state(tmp_path / "seed")
    assert not torch.allclose(other_seed["net"]["model.map_layer0.weight"], one["net"]["model.map_layer0.weight"])


def test_resumed_run_is_bitwise_identical(data, tmp_path):
    """N steps straight == N/2 steps, then --resume, then N/2 (dropout on: it is seeded per step)."""
    args = [f"--data={data}", "--pfgmpp=1", "--aug_dim=128", "--batch=8", "--tick=0.016", "--dropout=0.1"]
    run_train(tmp_path / "straight", [*args, "--duration=0.000048"])
    run_train(tmp_path / "half", [*args, "--duration=0.000024"])
    half_state = checkpoint.find_resume_state(tmp_path / "half")
    run_train(tmp_path / "resumed", [*args, "--duration=0.000048", f"--resume={half_state}"])
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight["step"] == resumed["step"] == 6
    _assert_weights(straight["net"], resumed["net"], exact=True)
    _assert_weights(straight["ema"], resumed["ema"], exact=True)


def test_outputs_of_a_run(data, tmp_path):
    """A run writes its options, log, stats per tick, a safe EMA snapshot that loads, and a sample grid."""
    run_train(tmp_path, [f"--data={data}", "--cond=1", "--batch=8", "--duration=0.000032", "--tick=0.016", "--snap=1"])
    names = {p.name for p in tmp_path.iterdir()}
    assert {"training_options.json", "log.txt", "stats.jsonl", "network-snapshot-000000.pt", "samples-000000.png"} <= names
    ticks = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [t["tick"] for t in ticks] == [0, 1] and all(np.isfinite(t["loss"]) for t in ticks)
    assert ticks[-1]["nonfinite_grad_steps"] == 0 and set(ticks[-1]["loss_by_sigma"]) and ticks[-1]["steps"] == 2
    net = checkpoint.load_network(tmp_path / "network-snapshot-000000.pt")
    assert net.label_dim == 4 and net.img_resolution == 8
    # 2 x 2 images of 8 px, 1 px apart, enlarged 8 times so that each shows at 64 px
    assert PIL.Image.open(tmp_path / "samples-000000.png").size == (17 * 8, 17 * 8)


def test_loss_falls_on_a_tiny_dataset(tmp_path):
    data = make_dataset(tmp_path / "d.zip", count=32, labels=False)
    run_train(tmp_path / "run", [f"--data={data}", "--batch=16", "--lr=0.002", "--lr_rampup=0", "--duration=0.0032",
                                 "--tick=0.32", "--grid=0", "--snap=100"])
    ticks = [json.loads(line)["loss"] for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert len(ticks) == 10 and np.mean(ticks[-3:]) < 0.7 * ticks[0], ticks


def test_sigterm_writes_a_state_that_resumes(data, tmp_path):
    out = tmp_path / "run"
    args = [f"--data={data}", "--batch=8", "--duration=10", "--tick=0.008", "--grid=0", "--snap=1000"]
    launcher = [sys.executable, str(ROOT / "train.py"), f"--outdir={out}", "--nosubdir", *TINY, *args]
    proc = subprocess.Popen(launcher, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("tick 2") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "received signal" in output
    state = final_state(out)
    assert state["step"] >= 3
    resumed = run_train(out, [*args, "--duration=0.000064", "--resume=auto"])
    assert "resumed from" in resumed.stdout and final_state(out)["step"] == 8


def test_truncated_state_is_skipped_with_a_warning(data, tmp_path):
    run_train(tmp_path, [f"--data={data}", "--batch=8", "--duration=0.000016", "--tick=0.008", "--grid=0"])
    good = checkpoint.find_resume_state(tmp_path)
    newer = tmp_path / "training-state-000099.pt"
    newer.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert checkpoint.find_resume_state(tmp_path) == good
    assert any("training-state-000099.pt" in str(w.message) for w in caught)


def test_dry_run_prints_the_config(data, tmp_path):
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={data}", "--attn=4", "--pfgmpp=1", "--aug_dim=2048",
                                             "--dry_run"])  # the primary spelling; --dry-run and -n are aliases
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[: result.output.rindex("}") + 1])
    assert config["D"] == 2048 and config["loss_kwargs"]["D"] == 2048 and config["precond_kwargs"]["D"] == 2048
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--aug_dim=128"], "--aug_dim has no effect without --pfgmpp=1 (the reference silently trains a diffusion model)"),
        (["--pfgmpp=1", "--aug_dim=0"], "D must be > 0"),
        (["--pfgmpp=1", "--aug_dim=-2"], "D must be > 0"),
        (["--pfgmpp=1", "--aug_dim=abc"], "not a number"),
        (["--pfgmpp=1"], "--aug_dim"),
        (["--batch=10", "--batch-gpu=4"], "not divisible"),
        (["--transfer=x.pt", "--resume=auto"], "cannot be combined"),
        (["--stf=1", "--cond=1"], "--stf"),
        (["--precond=vp", "--P_mean=0"], "--P_mean applies only to --precond=edm or edm2, not to --precond=vp"),
        (["--precond=ve", "--stf=1"], "--stf applies only to --precond=edm"),
        (["--gamma=3"], "--gamma applies only to --precond=pfgm, not to --precond=edm"),
        (["--precond=pfgm", "--fp_reg=1"], "--fp_reg applies only to --precond=edm, edm2, vp or ve"),
        (["--precond=iddpm"], "Invalid value for '--precond': choose one of edm, edm2, vp, ve, pfgm; got 'iddpm'"),
        (["--resume=missing.pt"], "no such training state"),
        (["--arch=unet"], "Invalid value for '--arch': choose one of ddpmpp, ncsnpp, adm, edm2-xs, edm2-s, edm2-m, edm2-l, "
                          "edm2-xl, edm2-xxl; got 'unet'"),
        (["--attn=64"], "attn_resolutions [64] do not occur in this network"),  # found before the run, not in it
    ],
)
def test_bad_options_are_click_errors(data, tmp_path, args, message):
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={data}", "--attn=4", *args, "--dry-run"])
    assert result.exit_code == 2 if "Invalid value" in result.output or "Usage" in result.output else result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("problem", ["missing", "unlabelled"])
def test_bad_data_is_a_click_error(tmp_path, problem):
    path = tmp_path / "nothing.zip" if problem == "missing" else make_dataset(tmp_path / "u.zip", count=4, labels=False)
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path}", f"--data={path}", "--cond=1", "--dry-run"])
    assert result.exit_code == 1 and "Error" in result.output and "Traceback" not in result.output


def test_grid_tiles_images_in_order():
    from training.generation import images

    tiles = np.stack([np.full([2, 3, 1], 10 * (i + 1), dtype=np.uint8) for i in range(5)])
    picture = np.asarray(images.grid(tiles, cols=3, pad=1))
    assert picture.shape == (5, 11)  # 2 rows of 2 px + 1 pad; 3 columns of 3 px + 2 pads
    assert picture[0, 0] == 10 and picture[0, 4] == 20 and picture[0, 8] == 30 and picture[3, 0] == 40 and picture[3, 4] == 50
    assert picture[2, 0] == 128 and picture[0, 3] == 128 and picture[3, 8] == 128  # separators and the empty slot


def test_stable_target_field_training_runs(data, tmp_path):
    """--stf draws a reference batch each step (the same on every rank) and trains to finite losses."""
    run_train(tmp_path, [f"--data={data}", "--stf=1", "--rbatch=16", "--pfgmpp=1", "--aug_dim=32", "--batch=8",
                         "--duration=0.000016", "--tick=0.008", "--grid=0"])
    ticks = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert len(ticks) == 2 and all(np.isfinite(t["loss"]) for t in ticks)


def test_a_failing_state_write_keeps_earlier_states(data, tmp_path, monkeypatch):
    """Disk full while writing a state: a clear error, and the previous state is untouched."""
    run_train(tmp_path, [f"--data={data}", "--batch=8", "--duration=0.000016", "--tick=0.008", "--grid=0"])
    previous = checkpoint.find_resume_state(tmp_path)
    before = previous.read_bytes()
    state = checkpoint.read_state(previous)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        net = tiny_network()
        checkpoint.write_state(previous, net=net, ema=net, optimizer=torch.optim.Adam(net.parameters()), step=1, nimg=8,
                               config={})
    assert previous.read_bytes() == before and checkpoint.read_state(previous)["step"] == state["step"]
    assert sorted(p.name for p in tmp_path.glob(".tmp-*")) == []
