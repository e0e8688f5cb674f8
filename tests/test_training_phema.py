"""train.py with power-function EMAs (--ema_std) and metrics during training (--metrics); a tiny EDM2 run."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
from tests.detector_fixtures import write_detector
from tests.helpers import assert_weights, final_state, make_dataset, run_train
from tests.test_training_parts import _trainer
from training import checkpoint, phema

STEP_ARGS = ["--batch=4", "--tick=0.004", "--snap=1", "--dump=1", "--dropout=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "d.zip", count=16, resolution=8, labels=False)


def test_tracked_emas_are_the_power_weighted_average_of_the_training_history(tmp_path):
    """Each tracked EMA after k steps of batch B is sum_i ((iB)^(g+1) - ((i-1)B)^(g+1)) / (kB)^(g+1) theta_i, with
    theta_i the weights after step i (EDM2 eq. 121, the profile integrated over each step), computed in float64."""
    trainer = _trainer(tmp_path, augment=0, dropout=0, ema_std="0.05,0.15", lr=0.01, lr_rampup=0)
    averages = trainer.averages
    assert averages.classic is not None and [s for s, _ in averages.phema.items()] == [0.05, 0.15]
    batches, history = trainer.batches(), []
    for _ in range(6):
        trainer.advance(batches)
        history.append([p.detach().double().clone() for p in trainer.net.parameters()])
    t = np.arange(len(history) + 1, dtype=np.float64) * trainer.c.batch
    for sigma_rel, module in averages.phema.items():
        weights = np.diff((t / t[-1]) ** (phema.sigma_rel_to_gamma(sigma_rel) + 1))
        for j, p in enumerate(module.parameters()):
            direct = sum(float(w) * theta[j] for w, theta in zip(weights, history))
            torch.testing.assert_close(p.double(), direct, rtol=1e-5, atol=1e-7)
    assert not torch.equal(next(averages.phema.module(0.05).parameters()), next(averages.phema.module(0.15).parameters()))


def test_snapshots_per_profile_and_bitwise_resume(data, tmp_path):
    """One network file per tracked profile (and the classic EMA) at each snapshot, each readable by generate.py and
    none replacing another though they are under 1 kimg apart; a run resumed halfway ends bitwise equal to an
    uninterrupted one, tracked EMAs included, and names its snapshots as it would have."""
    args = [f"--data={data}", *STEP_ARGS, "--ema_std=0.050,0.100"]
    run_train(tmp_path / "straight", [*args, "--duration=0.000024"])
    run_train(tmp_path / "half", [*args, "--duration=0.000012"])
    half_state = checkpoint.find_resume_state(tmp_path / "half")
    run_train(tmp_path / "resumed", [*args, "--duration=0.000024", f"--resume={half_state}"])
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight["phema"]["sigma_rel"] == [0.05, 0.1]
    for a, b in zip(straight["phema"]["ema"], resumed["phema"]["ema"]):
        assert_weights(a, b, exact=True)
    assert_weights(straight["ema"], resumed["ema"], exact=True)
    names = sorted(p.name for p in (tmp_path / "straight").glob("network-snapshot-*.pt"))
    labels = ["000000", *(f"000000.{n:03d}" for n in (8, 12, 16, 20, 24))]  # six steps of 4 images, a snapshot each
    assert names == sorted(f"network-snapshot-{k}{s}.pt" for k in labels for s in ("", "-0.050", "-0.100"))
    snap = checkpoint.load_network(tmp_path / "straight" / "network-snapshot-000000.024-0.100.pt")
    assert_weights(snap.state_dict(), straight["phema"]["ema"][1], exact=True)
    resumed_names = sorted(p.name for p in (tmp_path / "resumed").glob("network-snapshot-*.pt"))
    assert resumed_names == [n for n in names if any(f"000000.{k}" in n for k in ("016", "020", "024"))]
    result = CliRunner().invoke(generate.main, [f"--network={tmp_path / 'straight' / names[-2]}", "--seeds=0-1", "--steps=2",
                                                f"--outdir={tmp_path / 'img'}"])
    assert result.exit_code == 0, result.output


def test_resume_with_other_profiles_is_refused(data, tmp_path):
    args = [f"--data={data}", *STEP_ARGS, "--duration=0.000008"]
    run_train(tmp_path, [*args, "--ema_std=0.050"])
    result = run_train(tmp_path, [*args, "--ema_std=0.060", "--resume=auto"], check=False)
    assert result.returncode != 0 and "--ema_std [0.05] in the state, [0.06] now" in result.stderr, result.stderr


def test_only_power_function_emas(data, tmp_path):
    """--ema=0 with --ema_std (EDM2's way): no classic EMA file; the state's readers get the widest profile."""
    run_train(tmp_path, [f"--data={data}", *STEP_ARGS, "--duration=0.000008", "--ema=0", "--ema_std=0.05,0.1"])
    names = sorted(p.name for p in tmp_path.glob("network-snapshot-*.pt"))
    assert names == ["network-snapshot-000000-0.050.pt", "network-snapshot-000000-0.100.pt",
                     "network-snapshot-000000.008-0.050.pt", "network-snapshot-000000.008-0.100.pt"]
    state = final_state(tmp_path)
    assert_weights(state["ema"], state["phema"]["ema"][1], exact=True)
    assert "ema_beta" not in json.loads((tmp_path / "stats.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize("value, message", [("0.5", "sigma_rel"), ("0.05,0.05", "tracked twice"), ("0.0505", "three decimals"),
                                            ("a,b", "comma-separated numbers")])
def test_bad_profiles_are_click_errors(data, tmp_path, value, message):
    result = run_train(tmp_path, [f"--data={data}", f"--ema_std={value}", "-n"], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr and message in result.stderr, result.stderr


def test_metrics_during_training_equal_fid_gen_on_the_snapshot(data, tmp_path, one_thread):
    """The same numbers as `fid.py gen` with its defaults on the snapshot file (one thread in both: the same sums)."""
    detector = write_detector(tmp_path / "det.pt")
    ref = tmp_path / "ref.npz"
    assert CliRunner().invoke(fid.main, ["ref", f"--data={data}", f"--dest={ref}", f"--detector={detector}",
                                         "--features=1", "--workers=0"]).exit_code == 0
    run_train(tmp_path / "run", [f"--data={data}", *STEP_ARGS, "--duration=0.000008", "--ema_std=0.1", "--metrics=fid,kid",
                                 f"--metrics_ref={ref}", "--metrics_num=6", f"--detector={detector}"])
    lines = {m: [json.loads(x) for x in (tmp_path / "run" / f"metric-{m}.jsonl").read_text().splitlines()] for m in ("fid", "kid")}
    assert [(r["step"], r["snapshot"], r["sigma_rel"]) for r in lines["fid"]] == [
        (step, f"network-snapshot-{label}{suffix}.pt", sigma_rel)  # a snapshot per tick of one step, under 1 kimg apart
        for step, label in ((1, "000000"), (2, "000000.008")) for suffix, sigma_rel in (("", None), ("-0.100", 0.1))]
    assert all(r["images"] == 6 for r in lines["fid"] + lines["kid"]) and len(lines["kid"]) == 4
    for record in lines["fid"][2:]:  # each record's own snapshot file: the last ones
        out = tmp_path / f"{record['snapshot']}.json"
        result = CliRunner().invoke(fid.main, ["gen", f"--network={tmp_path / 'run' / record['snapshot']}", "--seeds=0-5",
                                               f"--ref={ref}", "--metrics=fid", f"--detector={detector}", f"--out={out}"])
        assert result.exit_code == 0, result.output
        # The two paths sum the same features in a different order: equal up to float rounding.
        assert json.loads(out.read_text())["results"]["fid"] == pytest.approx(record["value"], rel=1e-12)


def test_metrics_during_training_take_the_robustness_perturbations(data, tmp_path, one_thread):
    """--metrics_solver/--metrics_steps/--metrics_alpha/--metrics_bits score as fid.py gen with --solver/--steps/
    --perturb_alpha/--quantize_bits on the snapshot file."""
    detector = write_detector(tmp_path / "det.pt")
    ref = tmp_path / "ref.npz"
    assert CliRunner().invoke(fid.main, ["ref", f"--data={data}", f"--dest={ref}", f"--detector={detector}",
                                         "--features=1", "--workers=0"]).exit_code == 0
    run_train(tmp_path / "run", [f"--data={data}", *STEP_ARGS, "--duration=0.000004", "--metrics=fid",
                                 f"--metrics_ref={ref}", "--metrics_num=6", f"--detector={detector}",
                                 "--metrics_solver=unipc", "--metrics_steps=5", "--metrics_alpha=0.1", "--metrics_bits=6"])
    record = [json.loads(x) for x in (tmp_path / "run" / "metric-fid.jsonl").read_text().splitlines()][-1]
    assert record["sampler"] == {"solver": "unipc", "num_steps": 5, "perturb_alpha": 0.1, "quantize_bits": 6}
    assert record["nfe_per_batch"] == 5
    out = tmp_path / "gen.json"
    result = CliRunner().invoke(fid.main, ["gen", f"--network={tmp_path / 'run' / record['snapshot']}", "--seeds=0-5",
                                           f"--ref={ref}", "--metrics=fid", f"--detector={detector}", f"--out={out}",
                                           "--solver=unipc", "--steps=5", "--perturb_alpha=0.1", "--quantize_bits=6"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["results"]["fid"] == pytest.approx(record["value"], rel=1e-12)


@pytest.mark.parametrize("args, message", [
    (["--metrics=fid"], "--metrics_ref is required for fid"),
    (["--metrics=kid", "--metrics_ref={data}", "--detector={detector}", "--metrics_solver=rk45", "--metrics_alpha=0.1"],
     "--metrics_alpha does not apply to --metrics_solver=rk45"),
    (["--metrics_alpha=0.1"], "--metrics_alpha has no effect without --metrics"),
    (["--metrics=fid", "--metrics_ref={missing}", "--detector={detector}"], "missing.npz"),
    (["--metrics=fid", "--metrics_ref={data}", "--detector={missing}"], "missing.npz"),
    (["--metrics_ref=x.npz"], "--metrics_ref has no effect without --metrics; add --metrics=... or leave --metrics_ref out"),
    (["--metrics=fad"], "choose among fid"),
])  # fmt: skip
def test_metrics_errors_come_before_training(data, tmp_path, args, message):
    paths = dict(missing=tmp_path / "missing.npz", detector=write_detector(tmp_path / "det.pt"), data=data)
    args = [a.format(**paths) for a in args]
    result = run_train(tmp_path / "run", [f"--data={data}", *STEP_ARGS, "--duration=0.000008", *args], check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr and message in result.stderr, result.stderr
    assert not list((tmp_path / "run").glob("training-state-*"))


def test_a_tiny_edm2_run_at_D128_trains_resumes_bitwise_and_generates(tmp_path):
    """EDM2's network, preconditioning (learned loss weighting), recipe and power-function EMAs, for PFGM++ D = 128."""
    labelled = make_dataset(tmp_path / "d.zip", count=16, resolution=8, labels=True)
    args = [f"--data={labelled}", "--arch=edm2-xs", "--cbase=16", "--cres=1,2", "--nblock=1", "--attn=", "--cond=1",
            "--pfgmpp=1", "--aug_dim=128", "--batch=4", "--tick=0.004", "--snap=1", "--dump=1", "--lr_decay=1",
            "--lr_rampup=0", "--label_dropout=0.1"]
    run_train(tmp_path / "straight", [*args, "--duration=0.000016"])
    run_train(tmp_path / "half", [*args, "--duration=0.000008"])
    run_train(tmp_path / "resumed", [*args, "--duration=0.000016",
                                     f"--resume={checkpoint.find_resume_state(tmp_path / 'half')}"])
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert_weights(straight["net"], resumed["net"], exact=True)
    for a, b in zip(straight["phema"]["ema"], resumed["phema"]["ema"]):
        assert_weights(a, b, exact=True)
    options = json.loads((tmp_path / "straight" / "training_options.json").read_text())
    assert (options["precond"], options["loss"], options["beta2"], options["ema_std"], options["D"]) == \
        ("edm2", "edm2", 0.99, [0.05, 0.1], 128.0)
    stats = [json.loads(x) for x in (tmp_path / "straight" / "stats.jsonl").read_text().splitlines()]
    assert [s["lr"] for s in stats] == pytest.approx([0.012 / np.sqrt(s["step"]) for s in stats])  # t_ref = 1 step
    snapshot = tmp_path / "straight" / "network-snapshot-000000-0.100.pt"
    net = checkpoint.load_network(snapshot)
    assert type(net).__name__ == "EDM2Precond" and net.D == 128.0
    result = CliRunner().invoke(generate.main, [f"--network={snapshot}", "--seeds=0-1", "--steps=2", "--guidance=1.5",
                                                f"--outdir={tmp_path / 'img'}"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "img").glob("*.png"))) == 2
