"""Hardening, round 3 (issue 25), the cases fixed so far: each failed before its fix (a traceback, a silent
replacement, black PNGs, a profile list that tracks nothing) and is now one line, a non-zero exit and nothing written."""

import json
import math
import re

import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from tests.helpers import make_dataset, run_train, tiny_network
from tests.test_fid import run as run_fid
from training import checkpoint


def _generate(args):
    return CliRunner().invoke(generate.main, [str(a) for a in args])


def _one_line_error(result, message):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and message in result.output, result.output


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.pt"
    torch.manual_seed(0)
    checkpoint.save_network(path, tiny_network())
    return path


@pytest.mark.parametrize("option, message", [
    ("--rho=0.1", "reach 0 in float64 arithmetic: narrow the range or raise --rho"),
    ("--sigma_max=1e20", "the range is too wide; lower --sigma_max"),
])  # fmt: skip
def test_sampler_ranges_that_underflow_are_one_line_errors(net, tmp_path, option, message):
    """Were ZeroDivisionError tracebacks."""
    _one_line_error(_generate(["--network", net, "--outdir", tmp_path, "--seeds=0", "--steps=3", option]), message)
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("options, message", [
    (["--rho=0.1"], "reach 0 in float64 arithmetic"),
    (["--solver=restart", '--restart_info={"0": [3, 2, 100, 200]}'], "an interval must end below the start"),
    (["--solver=pc"], "the reverse SDE needs the Gaussian kernel (D = inf)"),
])  # fmt: skip
def test_a_sampler_plan_the_network_refuses_is_found_before_any_work(net, tmp_path, monkeypatch, options, message):
    """Found at the first batch: the progress bar had started, and an empty --outdir was left behind."""
    from training.generation import seeded

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(seeded, "sample_seeds", no_sampling)
    out = tmp_path / "images"
    _one_line_error(_generate(["--network", net, "--outdir", out, "--seeds=0-3", *options]), message)
    assert not out.exists()
    _one_line_error(CliRunner().invoke(fid.main, ["gen", f"--network={net}", "--seeds=0-3", "--metrics=is",
                                                  f"--detector={tmp_path / 'none.pt'}", *options]), message)


def test_a_picture_or_a_folder_as_the_network_is_named_as_such(net, tmp_path):
    """Were "unexpected persistent id 'NG\\r'" and "no such file" for a folder that exists."""
    import numpy as np
    import PIL.Image

    PIL.Image.fromarray(np.zeros([8, 8, 3], np.uint8)).save(tmp_path / "x.png")
    _one_line_error(_generate(["--network", tmp_path / "x.png", "--outdir", tmp_path / "o", "--seeds=0"]),
                    "is a PNG image, not a network checkpoint")
    _one_line_error(_generate(["--network", tmp_path, "--outdir", tmp_path / "o", "--seeds=0"]),
                    "is a folder, not a file")
    _one_line_error(_generate(["--network", net, "--gnet", tmp_path / "x.png", "--guidance=2", "--outdir",
                               tmp_path / "o", "--seeds=0", "--steps=2"]), "is a PNG image")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.png"))


@pytest.mark.parametrize("solver", ["heun", "rk45"])
def test_a_network_with_nan_weights_is_refused_before_sampling(tmp_path, solver):
    """Were all-black PNGs with exit 0 (heun) and a solver that never ended (rk45)."""
    torch.manual_seed(0)
    checkpoint.save_network(tmp_path / "nan.pt", tiny_network())
    payload = torch.load(tmp_path / "nan.pt", weights_only=True)  # this program never writes one: another did
    next(t for n, t in payload["state_dict"].items() if n.endswith("conv.weight")).view(-1)[0] = math.nan
    torch.save(payload, tmp_path / "nan.pt")
    _one_line_error(_generate(["--network", tmp_path / "nan.pt", "--outdir", tmp_path / "o", "--seeds=0",
                               f"--solver={solver}"]), "weights are not finite")
    assert not list(tmp_path.rglob("*.png"))


def test_ema_std_with_separators_only_is_an_error(tmp_path):
    """Was a run that tracked no profile, silently."""
    data = make_dataset(tmp_path / "d.zip", count=8, labels=False)
    result = run_train(tmp_path / "run", [f"--data={data}", "--ema_std=,,", "-n"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "--ema_std lists no number" in result.stderr


def test_fid_out_is_not_replaced_without_overwrite(tmp_path):
    """`fid.py calc --out` (and gen's) replaced an existing file."""
    from tests.detector_fixtures import write_detector

    images = make_dataset(tmp_path / "images.zip", count=10, labels=False)
    detector = write_detector(tmp_path / "det.pt")
    out = tmp_path / "r.json"
    out.write_text('{"kept": true}')
    args = ["calc", f"--images={images}", "--num=10", "--metrics=is", "--workers=0", f"--detector={detector}",
            f"--out={out}"]
    result = CliRunner().invoke(fid.main, args)
    _one_line_error(result, "exists; pass --overwrite to replace it")
    assert json.loads(out.read_text()) == {"kept": True}
    run_fid([*args, "--overwrite"])
    assert "results" in json.loads(out.read_text())


def test_an_fid_of_fewer_images_than_features_says_so(tmp_path):
    """`fid.py calc` on 2 images printed an FID from a singular covariance without a word."""
    from tests.detector_fixtures import write_detector

    images = make_dataset(tmp_path / "images.zip", count=2, labels=False)
    detector = write_detector(tmp_path / "det.pt")
    run_fid(["ref", f"--data={images}", f"--dest={tmp_path / 'ref.npz'}", f"--detector={detector}", "--workers=0"])
    result = CliRunner().invoke(fid.main, ["calc", f"--images={images}", "--num=2", "--workers=0",
                                           f"--detector={detector}", f"--ref={tmp_path / 'ref.npz'}"])
    assert result.exit_code == 0, result.output
    assert "warning: FID from 2 images" in result.output and "not comparable" in result.output


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_resume_of_a_malicious_file_names_the_refused_global(tmp_path):
    """Passed on torch's advice to load with weights_only=False."""
    torch.save({"state": _Evil()}, tmp_path / "training-state-000000.pt")
    data = make_dataset(tmp_path / "d.zip", count=8, labels=False)
    result = run_train(tmp_path / "run", [f"--data={data}", f"--resume={tmp_path / 'training-state-000000.pt'}",
                                          "--duration=0.000004"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "asks for the global posix.system" in result.stderr and "nothing in it was executed" in result.stderr
    assert "weights_only" not in result.stderr and "pwned" not in result.stdout + result.stderr


def test_a_run_directory_in_use_is_refused_naming_its_holder(tmp_path):
    """Two train.py in one --outdir --nosubdir both ran, interleaving stats.jsonl and overwriting snapshots."""
    from dnnlib.util import DirectoryLock

    data = make_dataset(tmp_path / "d.zip", count=8, labels=False)
    (tmp_path / "run").mkdir()
    lock = DirectoryLock(tmp_path / "run")
    lock.acquire()  # this process stands for the first run
    try:
        result = run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000004"], check=False)
    finally:
        lock.release()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "is in use by train.py (pid" in result.stderr and "give another --outdir" in result.stderr
    assert not list((tmp_path / "run").glob("stats.jsonl"))
    run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000004"])  # released: it runs


@pytest.mark.parametrize("resume", [[], ["--resume=auto"]])
def test_an_old_run_without_states_is_not_overwritten(tmp_path, resume):
    """--nosubdir into an old run folder whose training states were deleted replaced its snapshots and options and
    appended to its stats.jsonl, exit 0."""
    data = make_dataset(tmp_path / "d.zip", count=8, labels=False)
    run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000004"])
    for state in (tmp_path / "run").glob("training-state-*.pt"):
        state.unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    result = run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000004", *resume], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert ("already holds a run" if not resume else "no training state to continue it from") in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_reconstruct_phema_refuses_snapshots_of_two_runs(tmp_path):
    """It combined snapshots of two runs of one architecture silently (their provenance names both run directories)."""
    from click.testing import CliRunner as Runner

    import reconstruct_phema
    from training import phema

    torch.manual_seed(0)
    net = tiny_network()
    for kimg, run in ((1, "runs/a"), (2, "runs/a"), (3, "runs/b")):
        for sigma_rel in (0.05, 0.1):
            checkpoint.save_network(tmp_path / phema.snapshot_name(kimg, sigma_rel), net, {"run_dir": run, "kimg": kimg})
    with pytest.raises(ValueError, match="holds the snapshots of 2 runs: runs/a .*runs/b"):
        phema.find_snapshots(tmp_path)
    result = Runner().invoke(reconstruct_phema.main, [f"--indir={tmp_path}", f"--outdir={tmp_path / 'out'}",
                                                      "--outstd=0.07"])
    _one_line_error(result, "holds the snapshots of 2 runs")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_full_disk_names_the_file_and_what_was_kept(tmp_path, monkeypatch):
    """Disk full while writing a snapshot was a bare '[Errno 28] No space left on device'."""
    import errno
    import os

    from dnnlib import util

    target = tmp_path / "network-snapshot-000010.pt"
    target.write_bytes(b"the previous snapshot")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device while writing .*network-snapshot-000010.pt "
                                      r"\(its previous version is kept\)"):
        with util.atomic_write(target) as f:
            f.write(b"new")
    assert target.read_bytes() == b"the previous snapshot" and not util.stale_temporaries(target)


def test_a_diverged_run_stops_and_writes_nothing_of_that_tick(tmp_path):
    """--lr=1e6: loss NaN, most steps with non-finite gradients, exit 0, snapshots of garbage."""
    data = make_dataset(tmp_path / "d.zip", count=16, labels=False)
    run = tmp_path / "run"
    result = run_train(run, [f"--data={data}", "--duration=0.0002", "--lr=1e8", "--batch=4", "--tick=0.008",
                             "--snap=1", "--dump=1", "--grid=0"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    message = ("training diverged at kimg 0.016 (step 4): the loss is nan. Nothing of this tick was written (its "
               "statistics are in stats.jsonl); the last training state is training-state-000000.pt: start a new run "
               f"from its weights with --transfer={run / 'training-state-000000.pt'}")
    assert message in result.stderr
    assert sorted(p.name for p in run.glob("*.pt")) == ["network-snapshot-000000.pt", "training-state-000000.pt"]
    ticks = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [t["loss"] is None for t in ticks] == [False, True]
    assert message in (run / "log.txt").read_text()


def test_every_rank_stops_together_when_the_run_diverges(tmp_path):
    """The ranks decide on the same reduced statistics: none waits in a collective for another that stopped."""
    import subprocess
    import sys

    from tests.helpers import ROOT, TINY, free_port, subprocess_env

    data = make_dataset(tmp_path / "d.zip", count=16, labels=False)
    result = subprocess.run([sys.executable, str(ROOT / "launch" / "elastic.py"), "--nproc_per_node=2", "--nnodes=1",
                             "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "train.py"),
                             f"--outdir={tmp_path / 'run'}", "--nosubdir", *TINY, f"--data={data}", "--duration=0.0002",
                             "--lr=1e8", "--batch=4", "--tick=0.008", "--snap=1", "--dump=1", "--grid=0"],
                            cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert "Error: training diverged at kimg 0.016 (step 4)" in output and "Rank 0 says which training state" in output
    assert "the last training state is training-state-000000.pt" in output and "launch/elastic.py: train.py failed" in output


@pytest.mark.parametrize("loss, skipped, seen", [
    (1.0, 0, None), (1.0, 2, None), (1.0, 3, "3 of its 4 steps had non-finite gradients"),
    (math.inf, 0, "the loss is inf"), (math.nan, 4, "the loss is nan; 4 of its 4 steps had non-finite gradients"),
])  # fmt: skip
def test_the_divergence_rule(loss, skipped, seen):
    from training.train.stats import divergence

    assert divergence({"loss": loss, "steps": 4, "nonfinite_grad_steps": skipped}) == seen


def test_weights_that_are_not_finite_are_never_written(tmp_path):
    torch.manual_seed(0)
    net = tiny_network()
    with torch.no_grad():
        next(net.parameters())[0] = math.nan
    with pytest.raises(ValueError, match="was not written: the weights are not finite"):
        checkpoint.save_network(tmp_path / "net.pt", net)
    with pytest.raises(ValueError, match=r"was not written \(net\): the weights are not finite"):
        checkpoint.write_state(tmp_path / "state.pt", net=net, ema=tiny_network(), step=0, nimg=0, config={},
                               optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# Data is what the user sees: turned as viewers turn it, each image once, the same images in the tool and the loader.


def _folder(root, names, size=(4, 4)):
    """PNGs of distinct colours at `names` below `root`."""
    import numpy as np
    import PIL.Image

    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full((*size[::-1], 3), 20 * i + 10, dtype=np.uint8)).save(root / name)
    return root


def _dataset_tool(*args):
    import dataset_tool

    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])


def test_exif_rotated_jpegs_are_stored_as_viewers_show_them(tmp_path):
    """A camera's JPEG with EXIF orientation 6 was stored as its sensor wrote it: turned 90 degrees."""
    import numpy as np
    import PIL.Image
    import PIL.ImageOps

    from training.datasets import ImageFolderDataset

    pixels = np.zeros((8, 8, 3), dtype=np.uint8)  # white on the left, black on the right, as the sensor wrote it
    pixels[:, :4] = 255
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    src = tmp_path / "photos"
    src.mkdir()
    PIL.Image.fromarray(pixels).save(src / "a.jpg", exif=exif, quality=100)
    with PIL.Image.open(src / "a.jpg") as image:
        viewed = np.asarray(PIL.ImageOps.exif_transpose(image))  # what a viewer shows: white on top
    assert viewed[:4].mean() > 200 and viewed[4:].mean() < 50
    result = _dataset_tool(f"--source={src}", f"--dest={tmp_path / 'd.zip'}")
    assert result.exit_code == 0, result.output
    assert np.array_equal(ImageFolderDataset(tmp_path / "d.zip")[0][0].transpose(1, 2, 0), viewed)
    assert np.array_equal(ImageFolderDataset(src)[0][0].transpose(1, 2, 0), viewed)  # the loader on the JPEG folder


@pytest.mark.parametrize("link, message", [
    ("a/loop", "a folder that contains it: its images would be read more than once; remove the link"),
    ("again", "(one of them a symbolic link): its images would be read more than once; remove the link"),
])  # fmt: skip
def test_a_folder_reached_twice_through_links_is_an_error(tmp_path, link, message):
    """A symlink loop turned 4 files into 164 images."""
    from training.datasets import DatasetError, ImageFolderDataset

    src = _folder(tmp_path / "src", ["a/0.png", "a/1.png", "b/2.png", "b/3.png"])
    (src / link).symlink_to(src if link == "a/loop" else src / "a", target_is_directory=True)
    result = _dataset_tool(f"--source={src}", f"--dest={tmp_path / 'd.zip'}")
    assert result.exit_code == 1 and "Traceback" not in result.output and message in result.output, result.output
    assert not (tmp_path / "d.zip").exists()
    with pytest.raises(DatasetError, match=re.escape(message)):
        ImageFolderDataset(src)


def test_a_symlinked_subfolder_is_read_by_the_tool_and_the_loader_alike(tmp_path):
    """dataset_tool.py followed a linked class folder, the training loader did not: half the images, no labels."""
    import json as json_

    import numpy as np

    from training.datasets import ImageFolderDataset

    src = _folder(tmp_path / "src", ["cat/0.png", "cat/1.png"])
    (src / "dog").symlink_to(_folder(tmp_path / "elsewhere", ["dog/2.png", "dog/3.png"]) / "dog", target_is_directory=True)
    (src / "dataset.json").write_text(json_.dumps({"labels": [[f"{k}/{i}.png", int(k == "dog")] for k, i in
                                                              (("cat", 0), ("cat", 1), ("dog", 2), ("dog", 3))]}))
    result = _dataset_tool(f"--source={src}", f"--dest={tmp_path / 'd.zip'}")
    assert result.exit_code == 0, result.output
    tool = ImageFolderDataset(tmp_path / "d.zip", use_labels=True)
    loader = ImageFolderDataset(src, use_labels=True)
    assert len(tool) == len(loader) == 4
    for i in range(4):
        assert np.array_equal(tool[i][0], loader[i][0]) and np.array_equal(tool[i][1], loader[i][1])
    assert [int(loader.get_label(i).argmax()) for i in range(4)] == [0, 0, 1, 1]


def test_a_dest_inside_the_source_folder_is_refused(tmp_path):
    """Rerun, a --dest inside --source ingested its own output."""
    src = _folder(tmp_path / "src", ["0.png", "1.png"])
    for dest in (src / "out", src / "sub" / "d.zip"):
        result = _dataset_tool(f"--source={src}", f"--dest={dest}")
        assert result.exit_code == 1 and "lies inside the source folder" in result.output, result.output
        assert not dest.exists()
    assert sorted(p.name for p in src.iterdir()) == ["0.png", "1.png"]


def _damaged_zip(tmp_path, how):
    """An EDM-format ZIP of 8 images whose fourth PNG is cut short (`how` = "cut") or has a broken IDAT."""
    import zipfile

    data = make_dataset(tmp_path / "good.zip", count=8, labels=False)
    out = tmp_path / f"{how}.zip"
    with zipfile.ZipFile(data) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dest:
        for i, info in enumerate(n for n in source.infolist() if not n.is_dir()):
            raw = source.read(info)
            if i == 3 and info.filename.endswith(".png"):
                raw = raw[: len(raw) // 2] if how == "cut" else raw[:41] + bytes(b ^ 0xFF for b in raw[41:-12]) + raw[-12:]
            dest.writestr(info.filename, raw)
    return out


def test_a_cut_short_png_is_found_before_training_and_fid(tmp_path):
    """It passed train.py's check and crashed mid-training with a traceback; fid.py printed the worker's traceback."""
    data = _damaged_zip(tmp_path, "cut")
    result = run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000016", "--batch=4", "--workers=1"],
                       check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is cut short (a PNG without its end)" in result.stderr and not (tmp_path / "run").exists()
    result = run_fid(["ref", f"--data={data}", f"--dest={tmp_path / 'ref.npz'}", "--workers=1"], ok=False)
    assert "is cut short (a PNG without its end)" in result.output and not (tmp_path / "ref.npz").exists()


def test_an_image_unreadable_mid_run_is_one_line(tmp_path):
    """A PNG with its end intact but broken data is found only when decoded, in a DataLoader worker."""
    from tests.detector_fixtures import write_detector

    data = _damaged_zip(tmp_path, "broken")
    result = run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000016", "--batch=4", "--workers=1"],
                       check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: cannot read "), result.stderr
    assert "rebuild the dataset with dataset_tool.py" in result.stderr and "DataLoader worker" not in result.stderr
    result = run_fid(["ref", f"--data={data}", f"--dest={tmp_path / 'ref.npz'}", "--workers=1",
                      f"--detector={write_detector(tmp_path / 'det.pt')}"], ok=False)
    assert "Error: cannot read " in result.output and "Original Traceback" not in result.output, result.output


def test_a_metrics_sampler_the_network_refuses_stops_training_before_its_first_step(tmp_path):
    """It would have ended the run at its first snapshot, after the first --snap ticks of training."""
    from tests.detector_fixtures import write_detector

    data = make_dataset(tmp_path / "d.zip", count=8, labels=False)
    result = run_train(tmp_path / "run", [f"--data={data}", "--duration=0.000008", "--batch=4", "--metrics=is",
                                          f"--detector={write_detector(tmp_path / 'det.pt')}",
                                          "--metrics_solver=pfgm_euler"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the pfgm_* solvers are PFGM's sampler" in result.stderr and not (tmp_path / "run" / "stats.jsonl").exists()


def test_likelihood_out_is_not_replaced_without_overwrite(net, tmp_path, monkeypatch):
    """pfgmpp-likelihood --out replaced an existing file (the rule of fid.py calc --out, applied to every --out)."""
    from training.cli import likelihood

    data = make_dataset(tmp_path / "d.zip", count=4, labels=False)
    out = tmp_path / "bpd.json"
    out.write_text("an earlier result")
    monkeypatch.setattr(likelihood, "dataset_bpd", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    result = CliRunner().invoke(likelihood.main, [f"--network={net}", f"--data={data}", f"--out={out}"])
    _one_line_error(result, "exists; pass --overwrite to replace it")
    assert out.read_text() == "an earlier result"
