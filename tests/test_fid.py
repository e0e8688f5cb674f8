"""fid.py end to end with a stand-in detector: calc, ref, gen; gen == generate + calc; 2 ranks == 1 rank."""

import functools
import json
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from dnnlib import util
from tests.detector_fixtures import write_detector
from tests.helpers import ROOT, subprocess_env, tiny_network, torchrun
from training import checkpoint, generation, metrics, samplers
from training.datasets import ImageFolderDataset
from training.metrics import detector

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
SAMPLER = ["--steps=3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny network, 24 of its images as PNGs (seeds 0-23), and a stand-in detector file."""
    root = tmp_path_factory.mktemp("fid")
    checkpoint.save_network(root / "net.pt", tiny_network())
    result = CliRunner().invoke(generate.main, [f"--network={root / 'net.pt'}", f"--outdir={root / 'images'}",
                                                "--seeds=0-23", "--batch=5", *SAMPLER])
    assert result.exit_code == 0, result.output
    return dict(root=root, net=root / "net.pt", images=root / "images", detector=write_detector(root / "det.pt"))


def run(args, ok=True):
    result = CliRunner().invoke(fid.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code != 0 and "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.output.rstrip().splitlines()[-1].startswith("Error: "), result.output  # ends in one line
    return result


def _results(path):
    return json.loads(path.read_text())["results"]


def test_fid_of_a_set_with_itself_is_zero_and_the_reference_is_edm_compatible(setup, tmp_path):
    s = setup
    run(["ref", f"--data={s['images']}", f"--dest={tmp_path / 'ref.npz'}", f"--detector={s['detector']}", "--workers=0"])
    with np.load(tmp_path / "ref.npz") as data:
        assert {"mu", "sigma"} <= set(data.files) and data["mu"].shape == (2048,) and data["sigma"].dtype == np.float64
    run(["calc", f"--images={s['images']}", f"--ref={tmp_path / 'ref.npz'}", "--num=24", f"--detector={s['detector']}",
         "--workers=0", f"--out={tmp_path / 'self.json'}"])
    assert abs(_results(tmp_path / "self.json")["fid"]) < 1e-6


def test_gen_equals_generate_then_calc_bit_for_bit(setup, tmp_path):
    """Features of in-memory samples equal those of the saved PNGs, so every metric is identical."""
    s = setup
    device = torch.device("cpu")
    det = detector.load_detector(str(s["detector"]))
    net = checkpoint.load_network(s["net"])
    settings = samplers.SamplerSettings("heun", dict(num_steps=3))
    in_memory = ((b.indices, b.images.permute(0, 3, 1, 2)) for b in generation.generate(net, range(24), 5, device, settings))
    from_png = metrics.dataset_batches(metrics.image_dataset(str(s["images"]), 24, 0), 5, 0)
    a = metrics.statistics(in_memory, det, 24, device, ["fid", "kid"])
    b = metrics.statistics(from_png, det, 24, device, ["fid", "kid"])
    assert torch.equal(a.features, b.features)
    assert torch.equal(a.sum, b.sum) and torch.equal(a.outer, b.outer)
    ref = tmp_path / "ref.npz"
    run(["ref", f"--data={s['images']}", f"--dest={ref}", f"--detector={s['detector']}", "--features=1", "--workers=0"])
    common = [f"--ref={ref}", f"--detector={s['detector']}", "--batch=5", "--metrics=fid,kid,is"]
    run(["calc", f"--images={s['images']}", "--num=24", "--workers=0", f"--out={tmp_path / 'calc.json'}", *common])
    run(["gen", f"--network={s['net']}", "--num=24", f"--out={tmp_path / 'gen.json'}", *SAMPLER, *common])
    assert _results(tmp_path / "gen.json") == _results(tmp_path / "calc.json")


def test_two_ranks_equal_one_rank(setup, tmp_path):
    """torchrun with 2 gloo ranks sums the same float64 statistics (up to the order of additions)."""
    s = setup
    args = ["calc", f"--images={s['images']}", "--num_images=24", "--batch=5", f"--detector={s['detector']}", "--workers=0",
            f"--ref={s['images']}", "--metrics=fid,kid,is"]
    run([*args, f"--out={tmp_path / 'one.json'}"])
    result = torchrun("fid.py", [*args, f"--out={tmp_path / 'two.json'}"])
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = _results(tmp_path / "one.json"), _results(tmp_path / "two.json")
    assert one.keys() == two.keys() == {"fid", "kid", "is_mean", "is_std"}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-9), key


def test_a_failure_on_rank_0_stops_every_rank_with_its_message(setup, tmp_path):
    """A missing detector under 2 ranks: both exit with the reason; nobody waits for a collective."""
    result = torchrun("fid.py", ["calc", f"--images={setup['images']}", "--num_images=24",
                                 f"--detector={tmp_path / 'missing.pkl'}", "--metrics=is", "--workers=0"], timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("no detector file") + result.stdout.count("no detector file") >= 2, result.stderr
    assert "Traceback" not in result.stdout


def test_reference_by_url(setup, tmp_path, http_dir, monkeypatch):
    folder, base = http_dir
    s = setup
    monkeypatch.setenv("PFGMPP_CACHE_DIR", str(tmp_path / "cache"))
    run(["ref", f"--data={s['images']}", f"--dest={folder / 'ref.npz'}", f"--detector={s['detector']}", "--workers=0"])
    run(["calc", f"--images={s['images']}", f"--ref={base}/ref.npz", "--num=20", "--seed=3", f"--detector={s['detector']}",
         "--workers=0", f"--out={tmp_path / 'r.json'}"])
    assert _results(tmp_path / "r.json")["fid"] > 0  # 20 of the 24 images against all 24


def test_detector_from_the_environment(setup, tmp_path, monkeypatch):
    monkeypatch.setenv(detector.ENV_VAR, str(setup["detector"]))
    run(["calc", f"--images={setup['images']}", "--num=24", "--metrics=is", "--workers=0", f"--out={tmp_path / 'is.json'}"])
    assert _results(tmp_path / "is.json")["is_mean"] >= 1


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """Files a careless user may pass: broken references, a text file, an empty folder, a random blob."""
    folder = tmp_path_factory.mktemp("bad")
    np.savez(folder / "edm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (folder / "junk.npz").write_text("junk")
    (folder / "notes.txt").write_text("not statistics")
    (folder / "empty").mkdir()
    (folder / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    np.savez(folder / "small.npz", mu=np.zeros(10), sigma=np.eye(10))  # another detector's dimension
    whole = (folder / "edm.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    bad = {"nan": dict(mu=np.full(2048, np.nan), sigma=np.eye(2048)),
           "inf": dict(mu=np.zeros(2048), sigma=np.full([2048, 2048], np.inf)),
           "asymmetric": dict(mu=np.zeros(2048), sigma=np.eye(2048) + np.triu(np.ones([2048, 2048]), 1)),
           "features": dict(mu=np.zeros(2048), sigma=np.eye(2048), features=np.zeros([4, 10], np.float32))}
    for name, arrays in bad.items():
        np.savez(folder / f"{name}.npz", **arrays)
    return folder


def _bad_inputs(s, folder, base_url) -> dict:
    """Command lines a careless user may type, by case; each must end in a one-line error."""
    det, edm, images = f"--detector={s['detector']}", f"--ref={folder / 'edm.npz'}", f"--images={s['images']}"
    missing_det = f"--detector={folder / 'x.pkl'}"  # a check that must come before loading the detector
    calc = lambda *a: ["calc", images, "--num=24", "--workers=0", *a]  # noqa: E731
    return {
        "too_few": ["calc", images, "--num=25", edm, det, "--workers=0"],
        "no_ref": calc(det),
        "kid_without_features": calc(edm, "--metrics=kid", det),
        "bad_metric": ["calc", images, "--metrics=fid,precision", det],
        "bad_ref": calc(f"--ref={folder / 'junk.npz'}", det),
        "missing_images": ["calc", f"--images={folder / 'none'}", "--num=24", edm, det, "--workers=0"],
        "missing_detector": calc(edm, missing_det),
        "seeds_vs_num": ["gen", f"--network={s['net']}", "--seeds=0-2", "--num=4", edm, det],
        "gen_class": ["gen", f"--network={s['net']}", "--num=4", "--class=1", edm, det],
        "images_not_a_dataset": ["calc", f"--images={folder / 'notes.txt'}", "--num=24", edm, det, "--workers=0"],
        "images_empty": ["calc", f"--images={folder / 'empty'}", "--num=24", edm, det, "--workers=0"],
        "ref_text_file": calc(f"--ref={folder / 'notes.txt'}", det),
        "ref_truncated": calc(f"--ref={folder / 'truncated.npz'}", det),
        "ref_other_detector": calc(f"--ref={folder / 'small.npz'}", det),
        "ref_nan": calc(f"--ref={folder / 'nan.npz'}", det),
        "ref_inf": calc(f"--ref={folder / 'inf.npz'}", det),
        "ref_asymmetric": calc(f"--ref={folder / 'asymmetric.npz'}", det),
        "ref_features_of_another_size": calc(f"--ref={folder / 'features.npz'}", "--metrics=kid", det),
        "ref_url_404": calc(f"--ref={base_url}/missing.npz", det),
        "ref_empty_dataset": calc(f"--ref={folder / 'empty'}", det),
        "detector_random_file": calc(edm, f"--detector={folder / 'random.bin'}"),
        "batch_zero": calc(edm, det, "--batch=0"),
        "gen_unknown_network": ["gen", f"--network={folder / 'nope.pt'}", "--num=4", edm, det],
        "out_folder_missing": calc(edm, missing_det, f"--out={folder / 'none' / 'r.json'}"),
        "out_is_a_folder": calc(edm, missing_det, f"--out={folder / 'empty'}"),
        "gen_out_folder_missing": ["gen", f"--network={folder / 'nope.pt'}", "--num=4", edm, missing_det,
                                   f"--out={folder / 'none' / 'r.json'}"],
        "dest_exists": ["ref", f"--data={s['images']}", f"--dest={folder / 'edm.npz'}", missing_det],
        "dest_folder_missing": ["ref", f"--data={s['images']}", f"--dest={folder / 'none' / 'r.npz'}", missing_det],
    }


@pytest.mark.parametrize("case, message", [
    ("too_few", "found 24 images .* but --num=25"),
    ("no_ref", "--ref is required"),
    ("kid_without_features", "holds no features"),
    ("bad_metric", "choose among fid, kid, is"),
    ("bad_ref", "not reference statistics"),
    ("missing_images", "does not exist"),
    ("missing_detector", "no detector file"),
    ("seeds_vs_num", "lists 3 seeds but --num=4"),
    ("gen_class", "unconditional"),
    ("images_not_a_dataset", "neither a folder nor a ZIP"),
    ("images_empty", "holds no images"),
    ("ref_text_file", "notes.txt: not reference statistics"),
    ("ref_truncated", "truncated.npz: not reference statistics"),
    ("ref_other_detector", "small.npz holds statistics of 10 features per image, but the detector gives 2048"),
    ("ref_nan", "nan.npz: mu holds NaN or inf.*fid.py ref"),
    ("ref_inf", "inf.npz: sigma holds NaN or inf.*fid.py ref"),
    ("ref_asymmetric", "asymmetric.npz: sigma is not symmetric.*fid.py ref"),
    ("ref_features_of_another_size", "features.npz: features .4, 10. do not fit mu .2048,."),
    ("ref_url_404", "could not download .*missing.npz"),
    ("ref_empty_dataset", "holds no images"),
    ("detector_random_file", "not a detector"),
    ("batch_zero", "--batch"),
    ("gen_unknown_network", "no such file"),
    ("out_folder_missing", "--out=.* does not exist"),
    ("out_is_a_folder", "--out.* is a directory"),
    ("gen_out_folder_missing", "--out=.* does not exist"),
    ("dest_exists", "--dest=.* exists; pass --overwrite"),
    ("dest_folder_missing", "--dest=.* does not exist"),
])
def test_bad_input_gives_a_clear_error(setup, bad_files, http_dir, monkeypatch, case, message):
    """Every mistake ends in one line naming it, with a non-zero exit; output checks come before any work."""
    monkeypatch.setattr(util, "download", functools.partial(util.download, attempts=1))  # no retries of a 404
    result = run(_bad_inputs(setup, bad_files, http_dir[1])[case], ok=False)
    assert re.search(message, result.output.rstrip().splitlines()[-1]), result.output


def test_an_existing_dest_is_replaced_only_with_overwrite(setup, tmp_path):
    """fid.py ref refuses an existing --dest (left untouched) and replaces it with --overwrite."""
    s = setup
    dest = tmp_path / "ref.npz"
    dest.write_bytes(b"keep me")
    args = ["ref", f"--data={s['images']}", f"--dest={dest}", f"--detector={s['detector']}", "--workers=0"]
    run(args, ok=False)
    assert dest.read_bytes() == b"keep me"
    run([*args, "--overwrite"])
    assert metrics.load_reference(dest).count == 24


@pytest.mark.parametrize("command", [[], ["calc"], ["ref"], ["gen"], ["sweep"]])
def test_short_help_option(command):
    """-h works like --help for the group and every subcommand, as in the other CLIs."""
    result = run([*command, "-h"])
    assert result.output.startswith("Usage: ") and "-h, --help" in result.output


@pytest.mark.parametrize("command", ["calc", "ref"])
def test_feature_extraction_shows_progress(setup, tmp_path, command):
    """calc and ref show a bar over the images while the detector runs (gen has generation's bar)."""
    s = setup
    args = {"calc": ["calc", f"--images={s['images']}", "--num=24", "--metrics=is"],
            "ref": ["ref", f"--data={s['images']}", f"--dest={tmp_path / 'ref.npz'}"]}[command]
    result = run([*args, f"--detector={s['detector']}", "--workers=0", "--batch=5"])
    assert re.search(r"24/24 \[", result.output), result.output


_SIGTERM_DURING_WRITE = """
import json, os, signal, sys, time
import numpy as np
import fid

def killed(*args, **kwargs):
    f = next(a for a in args if hasattr(a, "write"))
    f.write(b"partial" if "b" in f.mode else "partial")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

np.savez = killed
json.dump = killed
fid.main(sys.argv[1:])
"""


@pytest.mark.parametrize("command", ["ref", "calc"])
def test_sigterm_while_writing_leaves_no_temporary_file(setup, tmp_path, command):
    """SIGTERM during the write of --dest / --out: exit 143, no partial file, no .tmp-* left behind."""
    s = setup
    target = tmp_path / ("ref.npz" if command == "ref" else "r.json")
    args = {"ref": ["ref", f"--data={s['images']}", f"--dest={target}"],
            "calc": ["calc", f"--images={s['images']}", "--num=24", "--metrics=is", f"--out={target}"]}[command]
    result = subprocess.run([sys.executable, "-c", _SIGTERM_DURING_WRITE, *args, f"--detector={s['detector']}",
                             "--workers=0"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, (result.returncode, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], result.stderr


def test_calc_picks_a_seeded_subset_like_edm(setup):
    """More images than --num: a seeded choice of exactly num, the same one for the same seed."""
    a = metrics.image_dataset(str(setup["images"]), 10, seed=1)
    b = metrics.image_dataset(str(setup["images"]), 10, seed=1)
    c = metrics.image_dataset(str(setup["images"]), 10, seed=2)
    names = lambda d: [d._image_names[i] for i in d._raw_idx]  # noqa: E731
    assert len(a) == 10 and names(a) == names(b) != names(c)
    assert len(ImageFolderDataset(str(setup["images"]))) == 24
