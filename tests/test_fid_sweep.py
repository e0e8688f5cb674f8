"""fid.py sweep with a stand-in detector: equal to fid.py gen, resumable after a kill, settings-keyed, best marked, plot."""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
from tests.detector_fixtures import stand_in_reference
from tests.helpers import tiny_network, torchrun
from tests.test_fid import run
from training import checkpoint, metrics, sweep
from training.samplers import SamplerSettings

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
SAMPLER = ["--steps=3"]
RUN = ["network-snapshot-000001-0.050.pt", "network-snapshot-000001-0.100.pt", "network-snapshot-000002.pt"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run directory of three tiny snapshots (two power-function profiles, one classic EMA), one more snapshot
    elsewhere, a stand-in detector and reference statistics with features. One intra-op thread throughout (the
    `one_thread` fixture's reason, for the module's fixtures too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sweep")
    (root / "run").mkdir()
    (root / "more").mkdir()
    for i, name in enumerate([*RUN, "../more/network-snapshot-000002-0.050.pt"]):
        torch.manual_seed(i)
        checkpoint.save_network(root / "run" / name, tiny_network())
    (root / "run" / "training-state-000002.pt").write_bytes(b"not a network")  # never picked from a run directory
    detector, ref = stand_in_reference(root)
    common = [f"--ref={ref}", f"--detector={detector}", "--batch=6", "--metrics=kid", *SAMPLER]
    yield dict(root=root, run=root / "run", more=root / "more", common=common)
    torch.set_num_threads(threads)


def records(path):
    return json.loads(path.read_text())["records"]


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A completed sweep: the run directory on two seed ranges (KID: FID's 2048x2048 eigendecompositions take 2 s a
    time on one core); its JSON is copied by the tests that read it."""
    out = tmp_path_factory.mktemp("finished") / "sweep.json"
    run(["sweep", f"--networks={setup['run']}", "--seeds=0-9,10-19", f"--out={out}", *setup["common"]])
    return out


def test_sweep_equals_gen_for_each_seed_range(setup, tmp_path):
    """A record's results are those of fid.py gen for the same network and seeds, bit for bit (the second of two
    ranges: each range is sampled on its own)."""
    net = setup["run"] / RUN[2]
    metric_args = [*setup["common"], "--metrics=fid,kid,is"]
    out = tmp_path / "sweep.json"
    run(["sweep", f"--networks={net}", "--seeds=0-11", "--seeds=12-23", f"--out={out}", *metric_args])
    found = {r["seeds"]: r for r in records(out)}
    assert sorted(found) == ["0-11", "12-23"] and found["0-11"]["results"] != found["12-23"]["results"]
    run(["gen", f"--network={net}", "--seeds=12-23", f"--out={tmp_path / 'gen.json'}", *metric_args])
    assert found["12-23"]["results"] == json.loads((tmp_path / "gen.json").read_text())["results"]
    assert (found["12-23"]["network"], found["12-23"]["kimg"], found["12-23"]["sigma_rel"]) == (str(net), 2, None)


def test_a_killed_sweep_resumes_without_recomputing(setup, tmp_path, count_evaluations):
    """Killed at its third evaluation, a sweep keeps the two before; the rerun does the other four only, and a
    later sweep with one more network evaluates that network only. Kept records are never rewritten."""
    out = tmp_path / "sweep.json"
    args = ["sweep", f"--networks={setup['run']}", "--seeds=0-9,10-19", f"--out={out}", *setup["common"]]
    count_evaluations["fail_at"] = 3
    result = CliRunner().invoke(fid.main, args)
    assert result.exit_code == 143, result.output
    first = records(out)
    assert len(first) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]  # no temporary files

    count_evaluations.update(count=0, fail_at=None)
    result = run(args)
    assert count_evaluations["count"] == 4 and records(out)[:2] == first
    assert "6 evaluations: 2 found" in result.output
    second = records(out)

    count_evaluations["count"] = 0
    run([*args[:2], f"--networks={setup['more']}", *args[2:]])
    assert count_evaluations["count"] == 2 and records(out)[:6] == second and len(records(out)) == 8
    assert [r["network"].rsplit("/", 1)[1] for r in records(out)[::2]] == [*RUN, "network-snapshot-000002-0.050.pt"]


@pytest.mark.parametrize("change, evaluations, added", [
    (["--steps=2"], 2, 2),              # another sampler: new records, the old ones kept
    (["--ref=DATA"], 2, 2),             # another reference
    (["--precision=fp32"], 2, 2),
    (["--metrics=kid,is"], 2, 0),       # the records lack is: evaluated again, the new records replace them
    (["--metrics=kid", "--batch=4"], 0, 0),  # the batch size is not a setting (it changes results by rounding only)
])
def test_records_are_reused_only_with_the_same_settings(setup, finished, tmp_path, count_evaluations, change, evaluations,
                                                        added):
    """Another sampler, reference or precision: evaluated again, the old records kept; more metrics: evaluated again."""
    out = tmp_path / "sweep.json"
    shutil.copy(finished, out)
    change = [c.replace("DATA", str(setup["root"] / "data.zip")) for c in change]
    args = ["sweep", f"--networks={setup['run'] / RUN[0]}", "--seeds=0-9,10-19", f"--out={out}", *setup["common"]]
    result = run([*args, *change])
    assert count_evaluations["count"] == evaluations
    assert len(records(out)) == len(records(finished)) + added
    assert ("have other settings: kept, not used" in result.output) == (added > 0)


def test_a_replaced_network_or_reference_is_evaluated_again(setup, finished, tmp_path, count_evaluations):
    """Records are keyed by contents: a snapshot rewritten under its name (reconstruct_phema.py --overwrite) or a --ref
    file whose contents changed gives new evaluations, not the old FID (issue 25)."""
    root = tmp_path / "copy"
    shutil.copytree(setup["run"], root)
    out = tmp_path / "sweep.json"
    ref = tmp_path / "ref.npz"
    shutil.copy(setup["root"] / "ref.npz", ref)
    common = [f"--ref={ref}" if c.startswith("--ref=") else c for c in setup["common"]]
    args = ["sweep", f"--networks={root / RUN[0]}", "--seeds=0-9", f"--out={out}", *common]
    run(args)
    assert count_evaluations["count"] == 1
    run(args)
    assert count_evaluations["count"] == 1  # unchanged: reused
    torch.manual_seed(99)
    checkpoint.save_network(root / RUN[0], tiny_network())
    run(args)
    assert count_evaluations["count"] == 2
    with np.load(ref) as data:
        moments = {k: data[k] for k in data.files}
    np.savez(ref, **{**moments, "features": moments["features"][::-1].copy()})  # other contents, same path
    run(args)
    assert count_evaluations["count"] == 3 and len(records(out)) == 3  # the older records kept, unused


def test_a_sweep_of_fewer_ranges_reuses_the_records(setup, finished, tmp_path, count_evaluations):
    """One of the two ranges again: nothing evaluated, the table has that range only."""
    out = tmp_path / "sweep.json"
    shutil.copy(finished, out)
    result = run(["sweep", f"--networks={setup['run']}", "--seeds=10-19", f"--out={out}", *setup["common"]])
    assert count_evaluations["count"] == 0 and records(out) == records(finished)
    assert "0-9 " not in result.output and "10-19" in result.output


def _record(name, seeds, value, metric):
    key = {"fid": "fid", "is": "is_mean"}[metric]
    return {"network": f"/runs/{name}", "identity": f"/runs/{name}",  # no such file: its path is its identity
            "seeds": seeds, "settings": {}, "metrics": [metric], "results": {key: value}}


@pytest.mark.parametrize("metric, higher", [("fid", False), ("is", True)])
def test_the_best_value_and_the_best_mean(metric, higher):
    """Constructed values: the best single value is not in the best mean's row; a network missing a range is
    left out of the means. IS ranks the other way."""
    values = {"network-snapshot-000001-0.050.pt": [3.0, 1.0, 5.0],  # the extreme single value (1 or 5), mean 3
              "network-snapshot-000001-0.100.pt": [2.0, 2.5, 3.0],  # mean 2.5: best for FID
              "network-snapshot-000002.pt": [3.2, 3.4, 3.6],        # mean 3.4: best for IS
              "network-snapshot-000002-0.050.pt": [0.5, None, None]}  # incomplete: only its single value counts
    if higher:
        values["network-snapshot-000002-0.050.pt"] = [9.0, None, None]
    ranges = [range(0, 10), range(10, 20), range(20, 30)]
    texts = ["0-9", "10-19", "20-29"]
    found = sweep.Records("unused.json", [_record(n, t, v, metric) for n, vs in values.items() for t, v in zip(texts, vs)
                                          if v is not None])
    networks = [sweep.snapshot_of(f"/runs/{n}") for n in values]
    rows = sweep.table_rows(found, networks, ranges, {}, [metric], metric)
    top = sweep.best(rows, metric)
    assert top.single == (3, 0)
    assert top.mean == (2 if higher else 1)
    assert rows[1].mean == pytest.approx(2.5) and rows[1].std == pytest.approx(0.5)  # sample std over the ranges
    table = sweep.format_table(metric, rows, ranges, top).splitlines()
    assert ("higher is better" if higher else "lower is better") in table[0]
    stars = [line.count("*") for line in table[2:]]  # after the legend and the header
    assert stars == ([0, 0, 2, 1] if higher else [0, 2, 0, 1])
    best = sweep.best_record(metric, rows, ranges, top)
    assert best["single"]["seeds"] == "0-9" and best["single"]["value"] == (9.0 if higher else 0.5)
    assert best["mean"]["network"] == networks[top.mean].path and best["higher_is_better"] == higher


def test_the_best_is_stored_in_the_json(finished):
    data = json.loads(finished.read_text())
    best = data["best"]["metrics"]["kid"]
    values = {(r["network"], r["seeds"]): r["results"]["kid"] for r in data["records"]}
    assert best["single"]["value"] == min(values.values())
    means = {n: (values[n, "0-9"] + values[n, "10-19"]) / 2 for n, _ in values}
    assert best["mean"]["network"] == min(means, key=means.get)
    assert data["best"]["seeds"] == ["0-9", "10-19"] and data["best"]["settings"]["sampler"] == {"solver": "heun", "num_steps": 3}


def test_plot_is_written_from_the_records(setup, finished, tmp_path, count_evaluations):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "sweep.json", tmp_path / "fid.png"
    shutil.copy(finished, out)
    run(["sweep", f"--networks={setup['run']}", "--seeds=0-9,10-19", f"--out={out}", f"--plot={png}", *setup["common"]])
    assert count_evaluations["count"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fid.png", "sweep.json"]


def test_plot_without_matplotlib_fails_before_any_work(setup, tmp_path, monkeypatch, count_evaluations):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "sweep.json"
    result = run(["sweep", f"--networks={setup['run']}", "--seeds=0-9", f"--out={out}", f"--plot={tmp_path / 'f.png'}",
                  *setup["common"]], ok=False)
    assert "pip install matplotlib" in result.output.splitlines()[-1]
    assert count_evaluations["count"] == 0 and not out.exists()


def test_networks_of_a_run_directory_sorted_by_kimg_then_sigma_rel(setup, tmp_path):
    """A folder gives its snapshot files (not training states, not other files), the classic EMA first at a kimg."""
    for name in ["phema-000003-0.070.pt", "network-snapshot-000002-0.100.pt", "network-snapshot-000002.pt",
                 "network-snapshot-000010.pkl", "training-state-000002.pt", "notes.txt", "net.pt"]:
        (tmp_path / name).write_bytes(b"")
    found = sweep.find_networks([str(tmp_path), f"{tmp_path}/net.pt,{tmp_path}/network-snapshot-000002.pt"])
    assert [(n.name, n.kimg, n.sigma_rel) for n in found] == [
        ("network-snapshot-000002.pt", 2, None), ("network-snapshot-000002-0.100.pt", 2, 0.1),
        ("phema-000003-0.070.pt", 3, 0.07), ("network-snapshot-000010.pkl", 10, None), ("net.pt", None, None)]


@pytest.mark.parametrize("change, message", [
    (["--networks=MISSING"], "no such file or folder"),
    (["--networks=EMPTY"], "holds no network snapshots"),
    (["--networks=EMPTY/*.pt"], "matches no file"),
    (["--networks=,"], "no network given"),
    (["--seeds=7"], "'7' is not a seed range"),
    (["--seeds=0-9,5-14"], "seed ranges 0-9 and 5-14 overlap"),
    (["--seeds=9-0"], "ends before it starts"),
    (["--seeds=0-9", "--num=5"], "range 0-9 holds 10 seeds but --num=5"),
    (["--out=NOT_SWEEP"], "is not a fid.py sweep file"),
    (["--out=CUT"], "is not a fid.py sweep file"),
    (["--ref=EDM"], "holds no features"),
])
def test_bad_input_gives_a_clear_error(setup, tmp_path, change, message, count_evaluations):
    """Each mistake ends in one line naming it, before any evaluation."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "gen.json").write_text(json.dumps({"results": {"fid": 1.0}}))  # fid.py gen's --out
    (tmp_path / "cut.json").write_text('{"format": "pfgmpp-fid-sweep", "version": 1, "records": [{"net')
    np.savez(tmp_path / "edm.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # no features
    files = {"MISSING": "nope", "EMPTY": "empty", "NOT_SWEEP": "gen.json", "CUT": "cut.json", "EDM": "edm.npz"}
    for key, name in files.items():
        change = [c.replace(key, str(tmp_path / name)) for c in change]
    networks = [] if any(c.startswith("--networks") for c in change) else [f"--networks={setup['run'] / RUN[0]}"]
    seeds = [] if any(c.startswith("--seeds") for c in change) else ["--seeds=0-9"]
    result = run(["sweep", *networks, *seeds, f"--out={tmp_path / 'sweep.json'}", *setup["common"], *change], ok=False)
    assert message in result.output.splitlines()[-1], result.output
    assert count_evaluations["count"] == 0


def test_settings_key_ignores_what_does_not_change_a_result(tmp_path, monkeypatch):
    """Paths compare absolute; guidance 1 ignores --gnet; the detector resolves $PFGMPP_DETECTOR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(metrics.detector.ENV_VAR, "det.pt")
    heun = SamplerSettings("heun", {"num_steps": 3})
    a = sweep.settings("ref.npz", None, heun, 1.0, "guide.pt")
    assert a == sweep.settings(str(tmp_path / "ref.npz"), str(tmp_path / "det.pt"), heun)
    assert a != sweep.settings("ref.npz", None, heun, 1.5, "guide.pt")


def test_two_ranks_equal_one_rank(setup, finished, tmp_path):
    """Under torchrun both ranks evaluate, rank 0 writes: the same records as one process."""
    out = tmp_path / "sweep.json"
    result = torchrun("fid.py", ["sweep", f"--networks={setup['run'] / RUN[0]}", "--seeds=0-9,10-19", f"--out={out}",
                                 *setup["common"]])
    assert result.returncode == 0, result.stdout + result.stderr
    ours = {r["seeds"]: r["results"]["kid"] for r in records(out)}
    one = {r["seeds"]: r["results"]["kid"] for r in records(finished) if r["network"] == str(setup["run"] / RUN[0])}
    assert ours.keys() == one.keys() and all(ours[k] == pytest.approx(one[k], rel=1e-9) for k in one)
    assert result.stdout.count("kid (lower is better)") == 1  # rank 0 alone prints the table
