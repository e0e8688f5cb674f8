"""fid.py end to end with a stand-in detector: calc, ref, gen; gen == generate + calc; 2 ranks == 1 rank."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from tests.detector_fixtures import write_detector
from tests.helpers import tiny_network, torchrun
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
    from_png = metrics.dataset_batches(metrics.open_images(str(s["images"]), 24, 0), 5, 0)
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
])
def test_bad_input_gives_a_clear_error(setup, tmp_path, case, message):
    s = setup
    np.savez(tmp_path / "edm.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "junk.npz").write_text("junk")
    det = f"--detector={s['detector']}"
    args = {
        "too_few": ["calc", f"--images={s['images']}", "--num=25", f"--ref={tmp_path / 'edm.npz'}", det],
        "no_ref": ["calc", f"--images={s['images']}", "--num=24", det],
        "kid_without_features": ["calc", f"--images={s['images']}", "--num=24", f"--ref={tmp_path / 'edm.npz'}", "--metrics=kid", det],
        "bad_metric": ["calc", f"--images={s['images']}", "--metrics=fid,precision", det],
        "bad_ref": ["calc", f"--images={s['images']}", "--num=24", f"--ref={tmp_path / 'junk.npz'}", det],
        "missing_images": ["calc", f"--images={tmp_path / 'none'}", "--num=24", f"--ref={tmp_path / 'edm.npz'}", det],
        "missing_detector": ["calc", f"--images={s['images']}", "--num=24", f"--ref={tmp_path / 'edm.npz'}", f"--detector={tmp_path / 'x.pkl'}"],
        "seeds_vs_num": ["gen", f"--network={s['net']}", "--seeds=0-2", "--num=4", f"--ref={tmp_path / 'edm.npz'}", det],
        "gen_class": ["gen", f"--network={s['net']}", "--num=4", "--class=1", f"--ref={tmp_path / 'edm.npz'}", det],
    }[case]
    result = run([*args, "--workers=0"] if args[0] != "gen" else args, ok=False)
    assert re.search(message, result.output), result.output


def test_calc_picks_a_seeded_subset_like_edm(setup):
    """More images than --num: a seeded choice of exactly num, the same one for the same seed."""
    a = metrics.open_images(str(setup["images"]), 10, seed=1)
    b = metrics.open_images(str(setup["images"]), 10, seed=1)
    c = metrics.open_images(str(setup["images"]), 10, seed=2)
    names = lambda d: [d._image_names[i] for i in d._raw_idx]  # noqa: E731
    assert len(a) == 10 and names(a) == names(b) != names(c)
    assert len(ImageFolderDataset(str(setup["images"]))) == 24
