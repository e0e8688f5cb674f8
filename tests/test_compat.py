"""What users bring from EDM, EDM2 and the PFGM++ reference: EDM's stats.jsonl keys, every command of the PFGM++
reference's README (at tiny sizes), EDM2's snapshot pickles in reconstruct_phema.py and fid.py sweep; and the
plots and W&B logging of a run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
import reconstruct_phema
import train
from tests import edm_fixtures as fx
from tests.detector_fixtures import write_detector
from tests.helpers import ROOT, make_dataset, run_train, subprocess_env, tiny_network
from tests.test_edm2_precond import edm2_net, write_edm2_snapshot
from training import checkpoint, phema, sweep
from training.cli.plot import main as plot_main
from training.datasets import ImageFolderDataset
from training.generation import images
from training.train import config
from training.train.report import strict

TINY_NET = ["--cbase=8", "--cres=1", "--nblock=1", "--attn=", "--workers=0", "--precision=fp32", "--grid=4"]

# A line of EDM's stats.jsonl as its training loop writes it (NVlabs/edm training/training_loop.py: json.dumps of
# torch_utils.training_stats' collector as a dict, {num, mean, std} per reported name, and a timestamp).
EDM_LINE = ('{"Loss/loss": {"num": 4718592, "mean": 0.5128346085548401, "std": 0.8215925693511963}, '
            '"Progress/tick": {"num": 1, "mean": 1.0, "std": 0.0}, "Progress/kimg": {"num": 1, "mean": 50.176, "std": 0.0}, '
            '"Timing/total_sec": {"num": 1, "mean": 337.5, "std": 0.0}, "Timing/sec_per_tick": {"num": 1, "mean": 301.2, '
            '"std": 0.0}, "Timing/sec_per_kimg": {"num": 1, "mean": 6.003, "std": 0.0}, "Timing/maintenance_sec": '
            '{"num": 1, "mean": 36.3, "std": 0.0}, "Resources/cpu_mem_gb": {"num": 1, "mean": 5.1, "std": 0.0}, '
            '"Resources/peak_gpu_mem_gb": {"num": 1, "mean": 4.2, "std": 0.0}, "Resources/peak_gpu_mem_reserved_gb": '
            '{"num": 1, "mean": 4.8, "std": 0.0}, "Timing/total_hours": {"num": 1, "mean": 0.09375, "std": 0.0}, '
            '"Timing/total_days": {"num": 1, "mean": 0.00390625, "std": 0.0}, "timestamp": 1669914381.1234}')


def _strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "d.zip", count=16, labels=False)


def test_stats_jsonl_holds_edms_keys_as_edm_writes_them(data, tmp_path):
    run_train(tmp_path, [f"--data={data}", "--batch=8", "--duration=0.000016", "--tick=0.008"])
    ours = [_strict_json(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    edm = _strict_json(EDM_LINE)
    for line in ours:
        assert set(edm) <= set(line)  # every key EDM writes, with EDM's layout
        for key, value in edm.items():
            assert type(line[key]) is type(value) and (not isinstance(value, dict) or set(line[key]) == set(value)), key
    # What an EDM user's script reads: the loss over the tick's loss elements (8 images of 3x8x8 per step, one step a
    # tick), its mean equal to ours up to float32 rounding (ours averages per-sample means taken in the loss's dtype),
    # the progress in kimg.
    assert [line["Loss/loss"]["num"] for line in ours] == [8 * 3 * 8 * 8] * 2
    assert all(math.isclose(line["Loss/loss"]["mean"], line["loss"], rel_tol=1e-6) and line["Loss/loss"]["std"] > 0
               for line in ours)
    assert [line["Progress/kimg"]["mean"] for line in ours] == [0.008, 0.016]
    assert [line["Progress/tick"]["mean"] for line in ours] == [0.0, 1.0]
    assert ours[1]["Timing/total_sec"]["mean"] >= ours[1]["Timing/sec_per_tick"]["mean"] > 0


def test_stats_lines_are_strict_json():
    assert strict({"loss": math.nan, "by": {"a": math.inf, "b": 1.0}, "list": [-math.inf]}) == {
        "loss": None, "by": {"a": None, "b": 1.0}, "list": [None]}


# ------------------------------------------------------------------------------------------------
# The PFGM++ reference's README, command by command (its sizes shrunk to a tiny network and a few images).


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """`train.py --outdir=training-runs --name exp_name ... --pfgmpp=1 --batch 512 --aug_dim aug_dim`, tiny."""
    root = tmp_path_factory.mktemp("reference")
    args = ["--outdir=training-runs", "--name", "exp_name", f"--data={data}", "--cond=0", "--arch=ncsnpp", "--pfgmpp=1",
            "--batch", "8", "--aug_dim", "128", *TINY_NET, "--duration=0.000016", "--tick=0.008", "--dump=1"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "training-runs" / "exp_name"


def test_train_name_is_the_run_directory(reference_run):
    assert (reference_run / "training_options.json").is_file()  # training-runs/exp_name, no number
    assert sorted(p.name for p in reference_run.glob("training-state-*.pt")) == [
        "training-state-000000.016.pt", "training-state-000000.pt"]  # two ticks of 8 images: 8 and 16


def test_train_lsun_is_sigma_scale_and_resume_of_a_reference_state_names_transfer(data, tmp_path):
    c = config.training_config(data=str(data), pfgmpp=True, aug_dim=128.0, lsun=True)
    assert c.sigma_scale == 380 / 80 and c.loss_kwargs["sigma_scale"] == 380 / 80 and "lsun" not in c
    with pytest.raises(ValueError, match="--lsun has no effect without --pfgmpp=1"):
        config.training_config(data=str(data), lsun=True)
    with pytest.raises(ValueError, match="give one of them"):
        config.training_config(data=str(data), pfgmpp=True, aug_dim=128.0, lsun=True, sigma_scale=2.0)
    # --resume resume_path with the reference's own training state: refused in one line, naming --transfer.
    net = edm2_net()  # any network: the state's format is what is refused
    state = fx.write_torch(tmp_path / "training-state-000100.pt", {"net": fx.as_edm_record(net, ""), "step": 100})
    result = CliRunner().invoke(train.main, [f"--outdir={tmp_path / 'runs'}", f"--data={data}", "--pfgmpp=1",
                                             "--aug_dim=128", *TINY_NET, f"--resume={state}"])
    assert result.exit_code != 0 and "--transfer" in result.output and len(result.output.strip().splitlines()) == 1


def test_generate_samples_every_checkpoint_of_a_run_directory(reference_run):
    """`generate.py --seeds=0-49999 --outdir=./training-runs/exp_name --pfgmpp=1 --aug_dim=aug_dim (--save_images)`."""
    args = ["--seeds=0-3", f"--outdir={reference_run}", "--pfgmpp=1", "--aug_dim=128", "--steps=4", "--batch=2"]
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code == 0, result.output
    images = sorted(p.relative_to(reference_run).as_posix() for p in reference_run.glob("ckpt_*/*/*.png"))
    assert images == [f"ckpt_000000/000000/{s:06d}.png" for s in range(4)]  # both states are at kimg 0: the first
    # The same images as generate.py --network on that state.
    state = reference_run / "training-state-000000.pt"
    result = CliRunner().invoke(generate.main, [f"--network={state}", "--seeds=0-3", "--steps=4", "--batch=2",
                                                f"--outdir={reference_run.parent / 'direct'}"])
    assert result.exit_code == 0, result.output
    for s in range(4):
        assert (reference_run / f"ckpt_000000/000000/{s:06d}.png").read_bytes() == \
            (reference_run.parent / "direct" / f"{s:06d}.png").read_bytes()
    # A rerun skips what exists; --save_images writes one grid per checkpoint; the seeds 50000-... go to ckpt_2_.
    assert "exists, skipped" in CliRunner().invoke(generate.main, args).output
    result = CliRunner().invoke(generate.main, [*args, "--save_images", "--ckpt=0", "--end_ckpt=0"])
    assert result.exit_code == 0 and (reference_run / "ode_images_0.png").is_file(), result.output
    result = CliRunner().invoke(generate.main, ["--seeds=50000-50001", f"--outdir={reference_run}", "--steps=4"])
    assert result.exit_code == 0 and len(list(reference_run.glob("ckpt_2_000000/050000/*.png"))) == 2, result.output


def test_generate_with_use_pickle_reads_the_references_pickles_safely(tmp_path):
    """`generate.py ... --use_pickle=1`: the run's training-state-*.pkl through the allow-listed unpickler."""
    marker = tmp_path / "MARKER"
    net = tiny_network(D=64.0)
    fx.write_pickle(tmp_path / "training-state-000010.pkl", {"ema": fx.edm_precond_record(net, fx.marker_source(marker),
                                                                                          pfgmpp_D=64.0)})
    result = CliRunner().invoke(generate.main, ["--seeds=0-1", f"--outdir={tmp_path}", "--pfgmpp=1", "--aug_dim=64",
                                                "--use_pickle=1", "--steps=3"])
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("ckpt_000010/000000/*.png"))) == 2 and not marker.exists()
    # --aug_dim other than the network's: the reference asserts it; here a one-line error.
    result = CliRunner().invoke(generate.main, ["--seeds=0-1", f"--outdir={tmp_path}", "--pfgmpp=1", "--aug_dim=128",
                                                "--use_pickle=1", "--edm=1", "--overwrite"])
    assert result.exit_code != 0 and "D=64" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--resume=5"], "--resume is a flag of the PFGM++ reference's generate.py that it never uses"),
    (["--network=x.pt", "--ckpt=3"], "--ckpt select(s) checkpoints of the run directory"),
    (["--grid=g.png"], "--grid need(s) --network"),
])
def test_generate_reference_flags_that_cannot_keep_their_meaning_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(generate.main, ["--seeds=0-1", f"--outdir={tmp_path}", *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_fid_calc_scores_each_checkpoint_folder_of_a_run_directory(reference_run, data, tmp_path):
    """`fid.py calc --images=training-runs/exp_name --ref=... --num 50000 [--ckpt --end_ckpt --gen_seed 1]`."""
    images = reference_run.parent / "fid-run"
    folder = images / "ckpt_000000" / "000000"
    folder.mkdir(parents=True)
    for i, (image, _) in enumerate(ImageFolderDataset(str(data))):
        PIL.Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    (images / "ckpt_2_000000").mkdir()  # another seed range: not scored with --gen_seed 1
    detector, ref = write_detector(tmp_path / "det.pt"), tmp_path / "ref.npz"
    assert CliRunner().invoke(fid.main, ["ref", f"--data={data}", f"--dest={ref}", f"--detector={detector}",
                                         "--workers=0"]).exit_code == 0
    common = [f"--ref={ref}", "--num", "16", f"--detector={detector}", "--workers=0"]
    result = CliRunner().invoke(fid.main, ["calc", f"--images={images}", *common, f"--out={tmp_path / 'a.json'}"])
    assert result.exit_code == 0 and "ckpt_000000 (kimg 0): fid" in result.output, result.output
    found = json.loads((tmp_path / "a.json").read_text())["checkpoints"]
    assert [r["kimg"] for r in found] == [0] and found[0]["results"]["fid"] == pytest.approx(0, abs=1e-3)  # the data
    result = CliRunner().invoke(fid.main, ["calc", f"--images={images}", *common, "--ckpt", "1", "--end_ckpt", "5",
                                           "--gen_seed", "1"])
    assert result.exit_code != 0 and "no checkpoint folder" in result.output
    result = CliRunner().invoke(fid.main, ["calc", f"--images={folder}", *common, "--gen_seed", "2"])
    assert result.exit_code != 0 and "holds none" in result.output


# ------------------------------------------------------------------------------------------------
# EDM2's snapshots: network-snapshot-NNNNNNN-S.SSS.pkl, float16, read through the allow-listed unpickler.


def _edm2_snapshot_net(seed: int):
    """One network of a run at another time: the same buffers (Fourier features), other weights."""
    net = edm2_net(seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net


def test_reconstruct_phema_reads_edm2_snapshot_pickles(tmp_path):
    marker = tmp_path / "MARKER"
    run = tmp_path / "edm2-run"
    run.mkdir()
    expected = {}
    for i, kimg in enumerate((1024, 2048)):
        for j, sigma_rel in enumerate((0.05, 0.1)):
            name = f"network-snapshot-{kimg:07d}-{sigma_rel:.3f}.pkl"
            expected[(kimg, sigma_rel)] = write_edm2_snapshot(run / name, _edm2_snapshot_net(2 * i + j),
                                                             fx.marker_source(marker))
    snapshots = phema.find_snapshots(run)
    assert [(s.kimg, s.sigma_rel, s.nimg) for s in snapshots] == [(1024, 0.05, None), (1024, 0.1, None),
                                                                  (2048, 0.05, None), (2048, 0.1, None)]
    result = CliRunner().invoke(reconstruct_phema.main, [f"--indir={run}", f"--outdir={tmp_path / 'out'}",
                                                         "--outstd=0.05,0.07"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    # A tracked profile at a snapshot time is that snapshot; an untracked one the solve's combination of them.
    same = checkpoint.load_network(tmp_path / "out" / "phema-002048-0.050.pt")
    for key, value in expected[(2048, 0.05)].state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=1e-5, atol=1e-6)
    weights, _ = phema.solve_weights([1024, 1024, 2048, 2048], [0.05, 0.1, 0.05, 0.1], [2048], [0.07])
    mixed = checkpoint.load_network(tmp_path / "out" / "phema-002048-0.070.pt").state_dict()
    key = "model.out_conv.weight"
    combined = sum(float(w) * expected[k].state_dict()[key] for w, k in zip(weights[:, 0], sorted(expected)))
    torch.testing.assert_close(mixed[key], combined, rtol=1e-5, atol=1e-6)


def test_fid_sweep_finds_edm2_snapshot_pickles(tmp_path):
    for kimg in (1024, 2048):
        write_edm2_snapshot(tmp_path / f"network-snapshot-{kimg:07d}-0.050.pkl", _edm2_snapshot_net(kimg), "")
    found = sweep.find_networks([str(tmp_path)])
    assert [(s.name, s.kimg, s.sigma_rel) for s in found] == [("network-snapshot-0001024-0.050.pkl", 1024, 0.05),
                                                              ("network-snapshot-0002048-0.050.pkl", 2048, 0.05)]
    assert sweep.snapshot_of("run/network-snapshot-000123.456.pt").kimg == 123


# ------------------------------------------------------------------------------------------------
# Looking at a run: the plot, and Weights & Biases offline.


def test_a_run_is_plotted_and_logged_to_wandb_offline(data, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_train(run, [f"--data={data}", "--batch=8", "--duration=0.000016", "--tick=0.008", "--wandb=pfgmpp-test"])
    losses = [json.loads(line)["loss"] for line in (run / "stats.jsonl").read_text().splitlines()]
    (logged,) = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    content = logged.read_bytes()
    assert b"train/loss" in content and all(json.dumps(v).encode() in content for v in losses)
    # The same id when the run goes on (resumed), so W&B continues it.
    run_train(run, [f"--data={data}", "--batch=8", "--duration=0.000024", "--tick=0.008", "--wandb=pfgmpp-test",
                    "--resume=auto"])
    assert len({p.name.rsplit("-", 1)[-1] for p in run.glob("wandb/offline-run-*")}) == 1
    # The plot: a PNG of every panel; an existing one is kept without --overwrite.
    result = CliRunner().invoke(plot_main, [str(run)])
    assert result.exit_code == 0, result.output
    picture = PIL.Image.open(run / "stats.png")
    assert picture.size[0] > 1000 and np.asarray(picture).std() > 0
    result = CliRunner().invoke(plot_main, [str(run)])
    assert result.exit_code != 0 and "--overwrite" in result.output
    result = CliRunner().invoke(plot_main, [str(tmp_path)])
    assert result.exit_code != 0 and "no stats.jsonl" in result.output


def test_the_quick_start_grid_is_enlarged_for_small_images(data, tmp_path):
    run_train(tmp_path, [f"--data={data}", "--batch=8", "--duration=0.000008", "--tick=0.008", "--grid=4"])
    assert PIL.Image.open(tmp_path / "samples-000000.png").size == (17 * 8, 17 * 8)  # 8x8 images shown at 64 px
    assert [images.view_scale(r) for r in (8, 16, 32, 64, 256)] == [8, 4, 2, 1, 1]

