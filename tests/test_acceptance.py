"""bench/acceptance.py cannot rot: --quick runs every stage at toy sizes on the CPU and writes every figure."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from bench import acceptance
from tests.helpers import ROOT, subprocess_env


@pytest.mark.slow
def test_quick_acceptance_writes_every_figure(tmp_path):
    # Ten times the quick budget (and every stage's cap): a check that each stage runs and writes its figures, not of
    # how fast, so that a loaded machine (the suite's other processes) cannot make it fail.
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "acceptance.py"), "--quick", "--budget=600",
                           f"--out={tmp_path}"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "acceptance.json").read_text())
    stages = report["stages"]
    assert report["quick"] and list(stages) == [name for name, _, _ in acceptance.STAGES]
    assert all(s["status"] == "ok" for s in stages.values()), {k: s["status"] for k, s in stages.items()}
    assert stages["gpu_tests"]["exit_code"] in (0, 5) and "skipped" in stages["gpu_tests"]["summary"]  # no CUDA here
    assert stages["kernel"]["kernel_ratio"] > 0 and [r["ranks"] for r in stages["kernel"]["per_rank_draws"]] == [1, 8, 64]
    draws = stages["kernel"]["per_rank_draws"]
    assert draws[0]["own_rows_mb"] == pytest.approx(64 * draws[-1]["own_rows_mb"])  # each rank draws its rows only
    assert all(r["global_mb"] == draws[0]["global_mb"] for r in draws)  # the former way: the whole batch on every rank
    variants = stages["train"]["variants"]
    assert variants["fp32"]["status"] == "ok" and variants["fp32"]["img_per_sec"] > 0
    assert variants["fp32 compile"]["status"] == "skipped"
    assert stages["torchrun"]["backend"] == "gloo" and stages["torchrun"]["img_per_sec"] > 0
    assert stages["sampling"]["precisions"]["fp32"]["projected_50k_s"] > 0 and stages["sampling"]["evaluations"] == 5
    assert stages["features"]["img_per_sec"] > 0
    assert stages["sampling"]["precisions"]["fp32, guided"]["img_per_sec"] > 0
    presets = stages["networks"]["presets"]
    assert presets["edm2-xs"]["status"] == presets["ddpmpp-64"]["status"] == "ok" and presets["edm2-xs"]["step_img_per_sec"] > 0
    table = (tmp_path / "acceptance.md").read_text()
    assert "toy sizes" in table and "| train | fp32 img/s" in table and "torch 2" in table


def _run(budget: float) -> acceptance.Run:
    return acceptance.Run(ROOT, True, torch.device("cpu"), time.monotonic() + budget)


def test_a_stage_that_overruns_fails_or_finds_no_budget_is_recorded_and_the_run_goes_on():
    run = _run(100)

    def too_slow(run, cap):
        raise subprocess.TimeoutExpired("train.py", cap)

    def broken(run, cap):
        raise RuntimeError("CUDA error: out of memory")

    acceptance.run_stage(run, "slow", 5, too_slow)
    acceptance.run_stage(run, "broken", 5, broken)
    acceptance.run_stage(run, "fine", 5, lambda run, cap: dict(value=1.0))
    assert run.stages["slow"]["status"] == "overran" and run.stages["broken"]["status"] == "failed"
    assert "out of memory" in run.stages["broken"]["reason"] and run.stages["fine"] == dict(
        status="ok", seconds=pytest.approx(run.stages["fine"]["seconds"]), cap_s=5, value=1.0)
    spent = _run(0)
    acceptance.run_stage(spent, "late", 5, lambda run, cap: pytest.fail("ran without budget"))
    assert spent.stages["late"]["status"] == "overran"
