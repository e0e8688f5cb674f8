"""launch/: the torchrun and SLURM launchers, and the faults a cluster run must survive.

CPU, gloo, 127.0.0.1 only. Every run trains the same tiny network for 20 steps, one step per tick and a
training state per tick, and is compared bitwise with one uninterrupted 2-process run. The faults are
injected by tests/fault_injection.py (test-only monkeypatches; the library has no hooks), at fixed steps,
so nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

import train
from tests.helpers import ROOT, TINY, assert_weights, final_state, free_port, make_dataset, subprocess_env
from torch_utils import distributed
from training.train import setup

pytestmark = pytest.mark.slow
STEPS = 20  # batch 8: 160 images; more than 16, where a stop signal is acted on
FAULTS = str(ROOT / "tests" / "fault_injection.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny-8x8.zip")


def train_args(data: Path, outdir: Path, *extra: str, nosubdir: bool = True) -> list[str]:
    """train.py's options for the tiny run: one step per tick, a state per tick, no samples."""
    return [f"--outdir={outdir}", *(["--nosubdir"] if nosubdir else []), *TINY, f"--data={data}", "--batch=8",
            "--tick=0.008", "--grid=0", "--snap=1000", "--dump=1", f"--duration={STEPS * 8 / 1e6}", *extra]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process we started and everything under it (torchrun starts workers in new sessions)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True) + [psutil.Process(process.pid)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run_all(commands: list[list[str]], envs: list[dict], timeout: float = 400) -> list[tuple[int, str]]:
    """Run the commands side by side (the "nodes" of one job); (exit code, stdout + stderr) of each.

    Output goes to files, not pipes: a "node" blocked on a full pipe would stall the other one."""
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    procs = [subprocess.Popen(c, cwd=ROOT, env=subprocess_env(PYTHON=sys.executable, **e),
                              stdout=log, stderr=subprocess.STDOUT, text=True)
             for c, e, log in zip(commands, envs, logs)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            _kill_tree(p)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def launch(args: list[str], **env: str) -> tuple[int, str]:
    """launch/torchrun.sh on this machine as one node."""
    return run_all([["bash", str(ROOT / "launch" / "torchrun.sh"), *args]], [env])[0]


def stats(run_dir: Path) -> list[dict]:
    """The ticks of a run's stats.jsonl."""
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """The uninterrupted run: 2 processes on one node (torchrun --standalone through the launcher)."""
    out = tmp_path_factory.mktemp("reference")
    code, output = launch(train_args(data, out), NPROC_PER_NODE="2")
    assert code == 0, output
    return dict(state=final_state(out), stats=stats(out))


def assert_same_training(run_dir: Path, reference: dict) -> None:
    """Bitwise the reference's final state, and each step counted once in stats.jsonl with its loss."""
    state = final_state(run_dir)
    assert state["step"] == reference["state"]["step"] == STEPS and state["nimg"] == STEPS * 8
    assert_weights(state["net"], reference["state"]["net"], exact=True)
    assert_weights(state["ema"], reference["state"]["ema"], exact=True)
    ticks = stats(run_dir)
    assert [t["step"] for t in ticks] == list(range(1, STEPS + 1)) and [t["tick"] for t in ticks] == list(range(STEPS))
    assert [t["loss"] for t in ticks] == [t["loss"] for t in reference["stats"]]


# ----------------------------------------------------------------------------------------------
# The scripts themselves (bash only: fast).


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch", "quickstart.sh"])
def test_scripts_are_valid_bash_with_strict_mode(script):
    path = ROOT / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in path.read_text()


@pytest.mark.parametrize("script", ["torchrun.sh", "slurm.sbatch"])
def test_help_prints_the_usage(script):
    result = subprocess.run(["bash", str(ROOT / "launch" / script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Settings" in result.stdout and "train.py" in result.stdout


@pytest.mark.parametrize(
    "env, args, present, absent",
    [
        ({}, [], ["--standalone", "--nproc_per_node=1", "--max_restarts=0", "--resume=auto"], ["--rdzv"]),
        ({"NNODES": "2", "RDZV_ENDPOINT": "node0:29400", "RDZV_ID": "job7", "NPROC_PER_NODE": "8", "MAX_RESTARTS": "3"}, [],
         ["--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400", "--rdzv_id=job7", "--nproc_per_node=8",
          "--max_restarts=3"], ["--standalone", "--node_rank"]),
        ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0"}, [],
         ["--nnodes=2", "--node_rank=1", "--master_addr=node0", "--master_port=29500"], ["--standalone"]),
        ({}, ["--resume=state.pt"], ["--resume=state.pt"], ["--resume=auto"]),
        ({}, ["--transfer=net.pt"], ["--transfer=net.pt"], ["--resume"]),
        ({"RESUME": ""}, [], [], ["--resume"]),
    ],
)
def test_torchrun_command(env, args, present, absent):
    """DRY_RUN=1 prints the torchrun command the settings make, with train.py's arguments last."""
    result = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--outdir=runs", *args], capture_output=True,
                            text=True, env=subprocess_env(DRY_RUN="1", TORCHRUN=sys.executable, **env))
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words.index(str(ROOT / "train.py")) < words.index("--outdir=runs")
    assert all(p in words for p in present) and not any(w.startswith(a) for a in absent for w in words), words


@pytest.mark.parametrize(
    "script, env, message",
    [
        ("torchrun.sh", {"NNODES": "2"}, "set RDZV_ENDPOINT=host:port"),
        ("torchrun.sh", {"NNODES": "2", "MASTER_ADDR": "node0", "NODE_RANK": "2"}, "0 to 1"),
        ("torchrun.sh", {"NPROC_PER_NODE": "eight"}, "NPROC_PER_NODE=eight"),
        ("torchrun.sh", {"NNODES": "2", "RDZV_ENDPOINT": "node0"}, "host:port"),
        ("torchrun.sh", {"TORCHRUN": "no-such-torchrun"}, "not found"),
        ("slurm.sbatch", {}, "submit it with sbatch"),
        ("slurm.sbatch", {"SLURM_JOB_ID": "1", "PFGMPP_ROOT": "/nonexistent"}, "set PFGMPP_ROOT"),
    ],
)
def test_bad_settings_are_clear_errors(script, env, message):
    environment = {k: v for k, v in subprocess_env().items() if not k.startswith(("SLURM_", "NNODES", "MASTER_"))}
    result = subprocess.run(["bash", str(ROOT / "launch" / script)], capture_output=True, text=True,
                            env={**environment, "TORCHRUN": sys.executable, **env})
    assert result.returncode == 2 and message in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------
# The pieces of a restart (in process: fast).


@pytest.mark.parametrize("restarts, expected", [("0", "00000-d"), ("1", "00001-d")])
def test_a_restarted_worker_keeps_its_run_directory(tmp_path, monkeypatch, restarts, expected):
    """--resume=auto takes the newest run with a state; after a torchrun restart, the newest run of the
    description even before its first state (the run the worker was in), not a new one."""
    (tmp_path / "00000-d").mkdir()
    (tmp_path / "00000-d" / "training-state-000000.pt").write_bytes(b"")
    (tmp_path / "00001-d").mkdir()  # started, failed before its first state
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", restarts)
    assert train._run_dir(tmp_path, "d", nosubdir=False, resume="auto").name == expected
    assert train._run_dir(tmp_path, "d", nosubdir=False, resume=None).name == "00002-d"


def test_rewind_stats_drops_the_ticks_after_the_resumed_step(tmp_path):
    lines = [json.dumps(dict(tick=t, step=t + 1)) for t in range(5)] + ['{"tick": 5, "st']  # cut short by a kill
    (tmp_path / "stats.jsonl").write_text("\n".join(lines))
    assert setup.rewind_stats(tmp_path, step=3) == 3
    assert [json.loads(line)["step"] for line in (tmp_path / "stats.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert setup.rewind_stats(tmp_path / "nothing-here", step=3) == 0


def test_a_process_group_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout must be > 0"):
        distributed.init(timeout_s=0)


# ----------------------------------------------------------------------------------------------
# Multi-node: two "nodes" of one process each on 127.0.0.1.


def _fake_slurm(bin_dir: Path) -> Path:
    """Stand-ins for srun (the command once per node, here) and scontrol (every node is 127.0.0.1)."""
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n"
        "for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i \"$@\" & pids+=($!); done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait \"$p\" || rc=$?; done; exit $rc\n")
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n[[ $1 == show && $2 == hostnames ]] || exit 1\n"
        "for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do echo 127.0.0.1; done\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("launcher", ["torchrun.sh --nnodes --node_rank", "slurm.sbatch (c10d)"])
def test_two_nodes_train_like_one_node(data, reference, tmp_path, launcher):
    """--nnodes=2 with one process per node trains bitwise like 2 processes on one node."""
    out = tmp_path / "run"
    if launcher.startswith("torchrun.sh"):
        port = str(free_port())
        envs = [dict(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="1")
                for r in range(2)]
        results = run_all([["bash", str(ROOT / "launch" / "torchrun.sh"), *train_args(data, out)]] * 2, envs)
    else:
        fake = _fake_slurm(tmp_path / "bin")
        env = dict(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2",
                   SLURM_JOB_NODELIST="node[0-1]", SLURM_SUBMIT_DIR=str(ROOT), NPROC_PER_NODE="1", RDZV_PORT=str(free_port()))
        results = run_all([["bash", str(ROOT / "launch" / "slurm.sbatch"), *train_args(data, out)]], [env])
        assert "2 nodes x 1 processes, rendezvous at 127.0.0.1:" in results[0][1], results
    assert all(code == 0 for code, _ in results), results
    assert_same_training(out, reference)


# ----------------------------------------------------------------------------------------------
# Faults.


def test_killed_worker_is_restarted_and_the_run_resumes_exactly(data, reference, tmp_path):
    """SIGKILL rank 1 before step 5 under MAX_RESTARTS=1: torchrun restarts both ranks, --resume=auto picks
    the state of step 5 in the same run directory, and the run ends bitwise like the uninterrupted one,
    every step counted once."""
    outdir = tmp_path / "runs"
    code, output = launch(train_args(data, outdir, "--resume=auto", nosubdir=False), NPROC_PER_NODE="2",
                          MAX_RESTARTS="1", SCRIPT=FAULTS, PFGMPP_FAULT="die-at-step:5:1")
    assert code == 0, output
    assert "FAULT rank 1: die-at-step at step 5" in output and "EXIT rank 1 attempt 0" not in output
    # Ticks of one step (8 images): every state after the first carries its images, 000000.040 at step 5.
    assert re.search(r"resumed from \S+training-state-000000\.040\.pt at kimg 0\.040 \(step 5\)", output), output
    assert "EXIT rank 0 attempt 1 code 0" in output and "EXIT rank 1 attempt 1 code 0" in output
    (run_dir,) = outdir.iterdir()  # the restart found its run directory
    assert_same_training(run_dir, reference)


def test_kill_during_a_state_write_never_resumes_the_partial_file(data, reference, tmp_path):
    """Rank 0 is SIGKILLed halfway through writing the state of step 3: --resume=auto takes the complete state
    of step 2, removes the partial file the killed writer left, and the run ends like the uninterrupted one."""
    code, output = launch(train_args(data, tmp_path, "--resume=auto"), NPROC_PER_NODE="2", MAX_RESTARTS="1",
                          SCRIPT=FAULTS, PFGMPP_FAULT="kill-in-state-write:3")
    assert code == 0, output
    assert "FAULT rank 0: killed while writing" in output
    assert re.search(r"resumed from \S+ at kimg 0\.016 \(step 2\)", output), output
    assert re.search(r"removed \.tmp-training-state-000000\.024\.pt\.\S+, left by a writer that was killed", output), output
    assert not list(tmp_path.glob(".tmp-*"))
    assert_same_training(tmp_path, reference)


@pytest.mark.parametrize("fault", ["erofs", "chmod"])
def test_a_failing_state_write_is_a_clear_error(data, tmp_path, fault):
    """The run directory turns read-only before the second state write: exit 1 with a message that names
    the file, the cause and that earlier states are intact; the state of step 1 still loads."""
    if fault == "chmod" and os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory; the erofs case injects the same failure")
    try:
        result = subprocess.run([sys.executable, FAULTS, *train_args(data, tmp_path)], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env=subprocess_env(PFGMPP_FAULT=f"{fault}-in-state-write:2"))
    finally:
        tmp_path.chmod(0o755)
    reason = "Read-only file system" if fault == "erofs" else "Permission denied"
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Error: could not write" in result.stderr and reason in result.stderr and "are intact" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert final_state(tmp_path)["step"] == 1 and not list(tmp_path.glob(".tmp-*"))


def test_a_hung_rank_is_named_and_does_not_hang_the_others(data, tmp_path):
    """Rank 1 hangs before step 3: rank 0's collective times out after --dist_timeout, and its error names
    rank 1 (host, local rank, pid) and what to check; the job ends instead of hanging."""
    code, output = launch(train_args(data, tmp_path, "--dist_timeout=10"), NPROC_PER_NODE="2", SCRIPT=FAULTS,
                          PFGMPP_FAULT="hang-at-step:3:1")
    assert code != 0 and "FAULT rank 1: hang-at-step at step 3" in output, output
    assert re.search(r"rank 0 \(host .*\): a collective operation failed at step 3", output), output
    assert re.search(r"rank 1 \(host \S+, local rank 1, pid \d+\) did not answer a roll call within 10 s", output), output
    assert "--dist_timeout, now 10 s" in output and "EXIT rank 0 attempt 0 code 1" in output
    assert final_state(tmp_path)["step"] == 3


def test_sigterm_to_the_job_saves_a_state_and_every_rank_exits_cleanly(data, reference, tmp_path):
    """SIGTERM to torchrun and every worker (what SLURM does at preemption): all ranks agree to stop at the
    next check (step 16), rank 0 writes the state, every rank exits 0, and nothing is restarted. A second
    launch resumes and ends bitwise like the uninterrupted run."""
    code, output = launch(train_args(data, tmp_path), NPROC_PER_NODE="2", MAX_RESTARTS="1", SCRIPT=FAULTS,
                          PFGMPP_FAULT="sigterm-job-at-step:3")
    assert "FAULT rank 0: sigterm-job-at-step at step 3" in output, output
    assert "EXIT rank 0 attempt 0 code 0" in output and "EXIT rank 1 attempt 0 code 0" in output, output
    assert code == 0, output  # the launcher too: every worker stopped cleanly
    assert "received signal 15: wrote training-state-000000.128.pt" in output and "attempt 1" not in output
    assert final_state(tmp_path)["step"] == 16
    code, output = launch(train_args(data, tmp_path), NPROC_PER_NODE="2")
    assert code == 0 and "(step 16)" in output, output
    assert_same_training(tmp_path, reference)


def test_a_user_error_under_the_launcher_is_one_line_per_worker_and_a_summary(tmp_path):
    """torchrun printed its ChildFailedError traceback and report after the workers' own one-line errors."""
    code, output = launch([f"--outdir={tmp_path}", *TINY, f"--data={tmp_path / 'missing.zip'}"], NPROC_PER_NODE="2")
    assert code == 1, output
    assert output.count(f"Error: dataset {tmp_path / 'missing.zip'} does not exist") == 2, output
    assert re.search(r"launch/elastic\.py: train\.py failed: rank [01] \(local rank [01], pid \d+\) ended with exit "
                     r"status 1 and 1 other worker\(s\) failed; its error is printed above", output), output
    assert "Traceback" not in output and "ChildFailedError" not in output and "signal handlers" not in output
