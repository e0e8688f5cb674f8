"""generate.py and training/generation/: seeded images independent of batch and ranks; clear errors."""

import math
import pickle
import re

import numpy as np
import PIL.Image
import pytest
import scipy.stats
import torch
from click.testing import CliRunner

import generate
from tests import edm_fixtures as fx
from tests.helpers import tiny_network, torchrun
from torch_utils import distributed, rng
from training import checkpoint, generation, samplers


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.pt"
    checkpoint.save_network(path, tiny_network())
    return path


@pytest.fixture(scope="module")
def cond_snapshot(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "cond.pt"
    checkpoint.save_network(path, tiny_network(channels=1, label_dim=5, D=math.inf))
    return path


def run(args, ok=True):
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _pngs(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_batches_cover_every_position_once(world):
    positions = [i for rank in range(world) for b in distributed.rank_batches(23, 4, rank, world) for i in b]
    assert sorted(positions) == list(range(23))
    assert all(len(b) <= 4 for rank in range(world) for b in distributed.rank_batches(23, 4, rank, world))


def test_images_do_not_depend_on_batch_size_or_seed_order(snapshot, tmp_path):
    """The PNG of seed s is the same byte for byte with --batch 1, 3 or 10 and within any seed list."""
    for batch in (1, 3, 10):
        run(["--network", snapshot, "--outdir", tmp_path / f"b{batch}", "--seeds=0-9", f"--batch={batch}", "--steps=4"])
    run(["--network", snapshot, "--outdir", tmp_path / "some", "--seeds=7,2", "--steps=4"])
    reference = _pngs(tmp_path / "b1")
    assert list(reference) == [f"{s:06d}.png" for s in range(10)]
    assert _pngs(tmp_path / "b3") == reference and _pngs(tmp_path / "b10") == reference
    assert _pngs(tmp_path / "some") == {k: reference[k] for k in ("000002.png", "000007.png")}
    assert len(set(reference.values())) == 10  # different seeds, different images


def test_float_samples_agree_across_batch_sizes(snapshot):
    """Below the uint8 quantisation the batch composition changes only rounding."""
    net = checkpoint.load_network(snapshot)
    settings = samplers.SamplerSettings("heun", dict(num_steps=3))
    together, _ = generation.sample_seeds(net, list(range(6)), "cpu", settings)
    alone = torch.cat([generation.sample_seeds(net, [s], "cpu", settings)[0] for s in range(6)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_subdirs_grid_and_grayscale(cond_snapshot, tmp_path):
    run(["--network", cond_snapshot, "--outdir", tmp_path, "--seeds=998-1001", "--subdirs", "--steps=2",
         "--grid", tmp_path / "grid.png"])
    assert sorted(_pngs(tmp_path)) == ["000000/000998.png", "000000/000999.png", "001000/001000.png",
                                       "001000/001001.png", "grid.png"]
    image = PIL.Image.open(tmp_path / "001000" / "001001.png")
    assert image.mode == "L" and image.size == (8, 8)
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png"))
    assert grid.shape == (17, 17)  # 2 x 2 tiles of 8 with 1 pixel between
    np.testing.assert_array_equal(grid[9:, 9:], np.asarray(image))


def test_random_class_labels_come_from_the_seed():
    """Without --class, each seed's label is drawn from its own generator: uniform, and batch-independent."""
    net = tiny_network(label_dim=5)
    seeds = list(range(2000))
    labels = generation.class_labels(net, rng.seeded_generators(seeds), None, "cpu").argmax(1)
    again = generation.class_labels(net, rng.seeded_generators(seeds[:7]), None, "cpu").argmax(1)
    assert torch.equal(labels[:7], again)
    assert scipy.stats.chisquare(torch.bincount(labels, minlength=5).numpy()).pvalue > 1e-3
    fixed = generation.class_labels(net, rng.seeded_generators(seeds[:3]), 4, "cpu")
    assert torch.equal(fixed.argmax(1), torch.full([3], 4))


def test_edm_checkpoint_generates_like_its_converted_snapshot(tmp_path):
    """An EDM-format .pkl goes through the safe importer; its images equal those of the converted snapshot."""
    net = tiny_network(D=64.0)
    marker = tmp_path / "executed"
    pkl = fx.write_pickle(tmp_path / "edm.pkl", {"ema": fx.edm_precond_record(net, fx.marker_source(marker), pfgmpp_D=64.0)})
    checkpoint.save_network(tmp_path / "ours.pt", net)
    run(["--network", pkl, "--outdir", tmp_path / "a", "--seeds=0-3", "--steps=3", "--aug_dim=64", "--pfgmpp=1"])
    run(["--network", tmp_path / "ours.pt", "--outdir", tmp_path / "b", "--seeds=0-3", "--steps=3"])
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b")
    assert not marker.exists()


def _unsafe_pickle(path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"ema": Evil()}))
    return path


@pytest.mark.parametrize("case, message", [
    ("class_uncond", "unconditional"),
    ("class_range", "out of range"),
    ("aug_dim", "trained with D=128"),
    ("pfgmpp", "contradicts the network"),
    ("seeds", "cannot read"),
    ("seeds_twice", "listed twice"),
    ("missing", "no such file"),
    ("unsafe", "not on the allow-list"),
    ("outdir_file", "cannot write to --outdir"),
    ("no_output", "--outdir"),
])
def test_bad_input_gives_a_clear_error(snapshot, cond_snapshot, tmp_path, case, message):
    (tmp_path / "file").write_text("x")
    args = {
        "class_uncond": ["--network", snapshot, "--outdir", tmp_path / "o", "--class=1"],
        "class_range": ["--network", cond_snapshot, "--outdir", tmp_path / "o", "--class=5"],
        "aug_dim": ["--network", snapshot, "--outdir", tmp_path / "o", "--aug_dim=2048"],
        "pfgmpp": ["--network", snapshot, "--outdir", tmp_path / "o", "--pfgmpp=0"],
        "seeds": ["--network", snapshot, "--outdir", tmp_path / "o", "--seeds=0-x"],
        "seeds_twice": ["--network", snapshot, "--outdir", tmp_path / "o", "--seeds=1,0-3"],
        "missing": ["--network", tmp_path / "nope.pkl", "--outdir", tmp_path / "o"],
        "unsafe": ["--network", _unsafe_pickle(tmp_path / "evil.pkl"), "--outdir", tmp_path / "o"],
        "outdir_file": ["--network", snapshot, "--outdir", tmp_path / "file" / "sub"],
        "no_output": ["--network", snapshot],
    }[case]
    result = run([*args, "--steps=2", "--seeds=0"] if case not in ("seeds", "seeds_twice") else [*args, "--steps=2"], ok=False)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert "pwned" not in result.output


@pytest.mark.parametrize("solver, options, D, precond", [
    ("rk45", ["--rtol=1e-3", "--atol=1e-3"], 128.0, "edm"),
    ("pc", ["--steps=4", "--snr=0.1", "--corrector=ald"], math.inf, "ve"),
    ("pfgm_rk45", ["--rtol=1e-2", "--atol=1e-2"], 1.0, "pfgm"),
    ("pfgm_improved_euler", ["--steps=3"], 1.0, "pfgm"),
    ("heun", ["--steps=3"], 1.0, "pfgm"),
])
def test_every_solver_generates_seeded_images(tmp_path, solver, options, D, precond):
    """Each sampler family runs from the CLI, and the same seed gives the same PNG again."""
    checkpoint.save_network(tmp_path / "net.pt", tiny_network(D=D, precond=precond))
    for out in ("a", "b"):
        result = run(["--network", tmp_path / "net.pt", "--outdir", tmp_path / out, "--seeds=0-2", f"--solver={solver}", *options])
    assert "network evaluations per batch" in result.output
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b") and len(_pngs(tmp_path / "a")) == 3


@pytest.mark.parametrize("solver, options", [
    ("dpmpp-2m", []), ("dpmpp-3m", []), ("unipc", ["--order=3"]),
    ("restart", ["--restart_info={\"0\": [3, 1, 0.06, 0.3]}", "--S_noise=1.003"]),
])  # fmt: skip
def test_fast_solvers_give_the_same_pngs_in_any_batch(snapshot, tmp_path, solver, options):
    """generate.py --solver=dpmpp-2m|dpmpp-3m|unipc|restart: seed s gives the same PNG with --batch 1 or 3."""
    for batch in (1, 3):
        result = run(["--network", snapshot, "--outdir", tmp_path / f"b{batch}", "--seeds=0-3", f"--batch={batch}",
                      "--steps=6", f"--solver={solver}", *options])
    expected = 6 if solver != "restart" else 2 * 6 - 1 + 2 * (3 - 1)
    assert f"{solver}: {expected:g} network evaluations per batch" in result.output
    assert _pngs(tmp_path / "b1") == _pngs(tmp_path / "b3") and len(_pngs(tmp_path / "b1")) == 4


@pytest.mark.parametrize("args, message", [
    (["--solver=rk45", "--S_churn=1"], "--S_churn does not apply to --solver=rk45"),
    (["--solver=heun", "--snr=0.2"], "--snr does not apply to --solver=heun"),
    (["--solver=pc", "--steps=2"], "D = inf|D=inf|finite D|diffusion"),
    (["--solver=pfgm_euler"], "networks trained with --precond=pfgm"),
    (["--solver=pfgm_rk45", "--steps=5"], "--steps does not apply to --solver=pfgm_rk45; it reads --sigma_min, --sigma_max, --rtol"),
    (["--solver=rk4"], r"Invalid value for '--solver': choose one of heun, euler, dpmpp-2m, dpmpp-3m, unipc, "
                       r"restart, rk45, pc, pfgm_rk45, pfgm_euler, pfgm_improved_euler; got 'rk4'"),
    (["--solver=restart", "--restart_info={bad"], "restart_info must be JSON"),
    (["--solver=unipc", "--order=4"], "--order"),
    (["--solver=dpmpp-2m", "--order=2"], "--order does not apply to --solver=dpmpp-2m"),
])
def test_solver_option_mismatch_is_a_clear_error(snapshot, tmp_path, args, message):
    result = run(["--network", snapshot, "--outdir", tmp_path, "--seeds=0", *args], ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert re.search(message, result.output), result.output


def test_two_ranks_write_the_images_of_one_rank(snapshot, tmp_path):
    """torchrun with 2 gloo ranks on CPU writes the same PNGs as one process."""
    run(["--network", snapshot, "--outdir", tmp_path / "one", "--seeds=0-6", "--batch=2", "--steps=3"])
    result = torchrun("generate.py", [f"--network={snapshot}", f"--outdir={tmp_path / 'two'}", "--seeds=0-6", "--batch=2",
                                      "--steps=3", f"--grid={tmp_path / 'grid.png'}"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert _pngs(tmp_path / "two") == _pngs(tmp_path / "one")
    assert np.asarray(PIL.Image.open(tmp_path / "grid.png")).std() > 0
