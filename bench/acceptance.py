"""GPU acceptance: every GPU figure of this project from one command, within a wall budget it enforces itself.

    python bench/acceptance.py --out acceptance/              # on a CUDA machine: the full run (5 minutes)
    python bench/acceptance.py --quick --out /tmp/acceptance  # anywhere: every stage at toy sizes (1 minute)

Stages, each with a time cap (a stage that overruns is recorded as such and the run goes on):

- gpu_tests: `pytest -m gpu` (the CUDA tests: no host sync in a training and a sampling step, devices, dtypes);
- kernel: the PFGM++ kernel draw (D = 128) against torch.randn for a CIFAR batch (goal <= 2x on a GPU), and the
  per-rank cost of training's draws at 1, 8 and 64 simulated ranks (bench/bench_draws.py);
- train: train.py itself on a synthetic 32x32 ZIP, DDPM++ at its CIFAR-10 configuration, batch 512 on one GPU,
  tf32 and bf16, without and with --compile: steady img/s from stats.jsonl, MFU from 127 GFLOP per image
  (forward + backward), peak memory;
- torchrun: the same through torchrun with one rank (the NCCL set-up; NCCL refuses two ranks on one GPU);
- sampling: generate.py's path, DDPM++ 32x32, 35 evaluations, batch 1024, tf32 and bf16: img/s and the
  projected time for 50,000 images (goal <= 235 s on one H100-class GPU); and guided by a second DDPM++ (w = 2,
  70 evaluations), the cost of guidance;
- networks: EDM2-XS beside DDPM++ at 64x64 (bench/bench_networks.py), forward and forward+backward img/s, bf16
  with channels_last, batch 64;
- features: the FID statistics path with an Inception-v3-sized stand-in detector (torchvision's Inception-v3
  with random weights; the real weights cannot be fetched here): img/s, projected 50k (goal <= 60 s).

It writes acceptance.json and acceptance.md (device, driver, torch, date) into --out, ready for
docs/performance.md. --quick shrinks every stage (tiny networks, a few images) and marks its figures as CPU
toy values. It prints figures and asserts nothing about them.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.bench_draws import per_rank_costs  # noqa: E402
from bench.bench_generate import cifar_network, time_features, time_generation  # noqa: E402
from bench.bench_networks import measure_preset  # noqa: E402
from bench.bench_perturbation import device_name, time_cases  # noqa: E402
from bench.bench_training import PEAKS  # noqa: E402
from training.pfgmpp import sample_perturbation  # noqa: E402
from training.samplers.guidance import guided  # noqa: E402

GFLOP_PER_IMAGE = 127.0  # DDPM++ at CIFAR-10, forward + backward (bench/bench_training.py counts it)
GOALS = {"kernel_ratio": 2.0, "sampling_50k_s": 235.0, "features_50k_s": 60.0}


@dataclass
class Run:
    """Where a run stands: its settings, its deadline, and what each stage measured."""

    out: Path
    quick: bool
    device: torch.device
    deadline: float
    stages: dict = field(default_factory=dict)

    def left(self) -> float:
        """Seconds left in the whole budget."""
        return self.deadline - time.monotonic()


def _env(run: Run | None = None) -> dict:
    """This process's environment for the subprocesses, this checkout first on the path; one thread each for a
    CPU run (two threads per process spin against each other on a busy small machine)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if run is not None and run.device.type != "cuda":
        env["OMP_NUM_THREADS"] = "1"
    return env


def stage_gpu_tests(run: Run, cap: float) -> dict:
    """pytest -m gpu: the CUDA tests (skipped without CUDA)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
                          cwd=ROOT, env=_env(run), capture_output=True, text=True, timeout=cap)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", summary)}
    return dict(summary=summary, exit_code=done.returncode, **counts)


def stage_kernel(run: Run, cap: float) -> dict:
    """The kernel draw against torch.randn, and the per-rank cost of training's draws."""
    shape = (64, 3, 8, 8) if run.quick else (512, 3, 32, 32)
    generator = torch.Generator(run.device).manual_seed(0)
    x = torch.zeros(shape, device=run.device)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn([shape[0]], generator=generator, device=run.device))
    repeats = 3 if run.quick else 21
    randn_ms, kernel_ms = time_cases([lambda: torch.randn(shape, generator=generator, device=run.device),
                                      lambda: sample_perturbation(x, sigma, 128.0, generator)], run.device, 2, repeats, 1)
    draws = per_rank_costs(run.device, 64 if run.quick else 2048, 8 if run.quick else 256, repeats=1 if run.quick else 3)
    return dict(shape=list(shape), randn_ms=randn_ms, kernel_ms=kernel_ms, kernel_ratio=kernel_ms / randn_ms,
                goal_ratio=GOALS["kernel_ratio"], per_rank_draws=draws)


def synthetic_zip(path: Path, count: int, resolution: int) -> Path:
    """A dataset ZIP of random RGB PNGs (the training cost does not depend on the pixels)."""
    import io

    import PIL.Image

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(count):
            buffer = io.BytesIO()
            PIL.Image.fromarray(rng.integers(0, 256, [resolution, resolution, 3], dtype=np.uint8)).save(buffer, format="PNG")
            z.writestr(f"{i // 1000:05d}/img{i:08d}.png", buffer.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": None}))
    return path


def _train_args(run: Run, data: Path, outdir: Path, precision: str, compile_: bool) -> list[str]:
    if run.quick:
        size = ["--arch=ddpmpp", "--cbase=8", "--cres=1", "--nblock=1", "--attn=", "--batch=16", "--duration=0.000096",
                "--tick=0.032"]
    else:
        size = ["--arch=ddpmpp", "--batch=512", "--duration=0.03072", "--tick=0.01024"]  # 60 steps, ticks of 20
    return [f"--outdir={outdir}", "--nosubdir", f"--data={data}", "--pfgmpp=1", "--aug_dim=128", "--augment=0.12",
            "--workers=2", "--grid=0", "--snap=1000", "--dump=1000", f"--precision={precision}", f"--compile={int(compile_)}",
            *size]


def _steady(outdir: Path, precision: str, device: torch.device) -> dict:
    """Figures of the last tick of a run (the first includes start-up and compilation)."""
    ticks = [json.loads(line) for line in (outdir / "stats.jsonl").read_text().splitlines()]
    last = ticks[-1]
    peak = next((v for (k, p), v in PEAKS.items() if k in device_name(device) and p == precision), None)
    mfu = last["img_per_sec"] * GFLOP_PER_IMAGE / 1e3 / peak if peak and device.type == "cuda" else None
    return dict(img_per_sec=last["img_per_sec"], sec_per_kimg=last["sec_per_kimg"], peak_gpu_gib=last["peak_gpu_gib"],
                mfu=mfu, ticks=len(ticks), loss=last["loss"])


def stage_train(run: Run, cap: float) -> dict:
    """train.py on a synthetic ZIP, for each precision, without and with --compile."""
    start = time.monotonic()
    folder = Path(tempfile.mkdtemp(prefix="acceptance-train-", dir=run.out))
    data = synthetic_zip(folder / "data.zip", 64 if run.quick else 2048, 8 if run.quick else 32)
    precisions = ("fp32",) if run.quick and run.device.type != "cuda" else ("tf32", "bf16")
    variants = [(p, False) for p in precisions] + [(p, True) for p in precisions]
    results = {}
    for precision, compile_ in variants:
        name = f"{precision}{' compile' if compile_ else ''}"
        if compile_ and run.quick and run.device.type != "cuda":
            results[name] = dict(status="skipped", reason="inductor compiles for about a minute on a CPU; the GPU run times it")
            continue
        left = cap - (time.monotonic() - start)
        if left < 5:
            results[name] = dict(status="overran", reason="no time left in the stage")
            continue
        outdir = folder / name.replace(" ", "-")
        try:
            done = subprocess.run([sys.executable, str(ROOT / "train.py"), *_train_args(run, data, outdir, precision, compile_)],
                                  cwd=ROOT, env=_env(run), capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            results[name] = dict(status="overran", reason=f"did not finish in {left:.0f} s")
            continue
        if done.returncode:
            results[name] = dict(status="failed", reason=(done.stdout + done.stderr)[-800:])
            continue
        results[name] = dict(status="ok", **_steady(outdir, precision, run.device))
    return dict(gflop_per_image=GFLOP_PER_IMAGE, variants=results)


def stage_torchrun(run: Run, cap: float) -> dict:
    """train.py through torchrun with one rank: the process-group set-up (NCCL on a GPU, gloo otherwise)."""
    folder = Path(tempfile.mkdtemp(prefix="acceptance-torchrun-", dir=run.out))
    data = synthetic_zip(folder / "data.zip", 64 if run.quick else 2048, 8 if run.quick else 32)
    precision = "bf16" if run.device.type == "cuda" else "fp32"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "train.py"),
               *_train_args(run, data, folder / "run", precision, False)]
    done = subprocess.run(command, cwd=ROOT, env=_env(run), capture_output=True, text=True, timeout=cap)
    if done.returncode:
        return dict(status="failed", exit_code=done.returncode, reason=(done.stdout + done.stderr)[-800:])
    return dict(backend="nccl" if run.device.type == "cuda" else "gloo", **_steady(folder / "run", precision, run.device))


def stage_sampling(run: Run, cap: float) -> dict:
    """generate.py's path: 35 evaluations (18 noise levels), img/s and the projected time for 50k images."""
    if run.quick:
        from tests.helpers import tiny_network  # noqa: PLC0415 (the toy network of the test suite)

        net, batch, count, steps = tiny_network(D=128.0).eval().requires_grad_(False).to(run.device), 8, 8, 3
    else:
        net, batch, count, steps = cifar_network("ddpmpp", run.device), 1024, 4096, 18
    results = {}
    precisions = ("tf32", "bf16") if run.device.type == "cuda" else ("fp32",)
    for precision in precisions:
        rate = time_generation(net, run.device, batch, count, steps, precision)
        results[precision] = dict(img_per_sec=rate, projected_50k_s=50000 / rate)
    pair = guided(net, copy.deepcopy(net), 2.0)  # autoguidance's cost: a second network of the same size
    rate = time_generation(pair, run.device, batch, count, steps, precisions[-1])
    results[f"{precisions[-1]}, guided"] = dict(img_per_sec=rate, projected_50k_s=50000 / rate)
    return dict(evaluations=2 * steps - 1, batch=batch, goal_50k_s=GOALS["sampling_50k_s"], precisions=results)


def stage_networks(run: Run, cap: float) -> dict:
    """EDM2-XS and DDPM++ at 64x64 (16x16 and narrower with --quick): forward and forward+backward img/s."""
    cuda = run.device.type == "cuda"
    variant, batch, repeats = ("bf16+cl", 64, 5) if cuda else ("fp32", 2, 1)
    overrides = {} if not run.quick else dict(img_resolution=16, model_channels=64)
    found = {}
    for name in ("ddpmpp-64", "edm2-xs"):
        m = measure_preset(name, run.device, batch, [variant], 1, repeats, **overrides)
        found[name] = dict(resolution=m["resolution"], params=m["params"], gflop_step=m["gflop_step"], **m["variants"][variant])
    return dict(variant=variant, batch=batch, presets=found)


class _Features(torch.nn.Module):
    """A detector with the Inception-v3 port's interface (uint8 NCHW in, 2048 features out) around torchvision's
    Inception-v3 with random weights: the cost of the real detector, which cannot be fetched here."""

    def __init__(self, quick: bool):
        super().__init__()
        if quick:
            self.side = 32
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten(), torch.nn.Linear(16, 2048))
        else:
            from torchvision.models import inception_v3  # noqa: PLC0415 (the GPU machines have torchvision)

            model = inception_v3(weights=None, aux_logits=False, init_weights=False)
            model.fc = torch.nn.Identity()
            self.side, self.body = 299, model
        self.classes = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=[self.side, self.side], mode="bilinear",
                                            align_corners=False)
        features = self.body((x - 128) / 128)
        if return_features:
            return features
        return torch.softmax(self.classes(features), dim=1)


def stage_features(run: Run, cap: float) -> dict:
    """The FID statistics path (detector features and the float64 sums) with the stand-in detector."""
    from training.metrics.detector import Detector  # noqa: PLC0415

    module = torch.jit.script(_Features(run.quick).eval())
    det = Detector(module, device=run.device, source="Inception-v3-sized stand-in" if not run.quick else "toy stand-in")
    batch, count = (8, 16) if run.quick else (250, 4000)
    rate = time_features(det, run.device, batch, count)
    return dict(detector=det.source, img_per_sec=rate, projected_50k_s=50000 / rate, goal_50k_s=GOALS["features_50k_s"])


STAGES: list[tuple[str, float, Callable[[Run, float], dict]]] = [
    ("gpu_tests", 75.0, stage_gpu_tests),
    ("kernel", 20.0, stage_kernel),
    ("train", 105.0, stage_train),
    ("torchrun", 30.0, stage_torchrun),
    ("sampling", 25.0, stage_sampling),
    ("features", 20.0, stage_features),
    ("networks", 25.0, stage_networks),
]
QUICK_CAPS = {"gpu_tests": 20.0, "kernel": 8.0, "train": 20.0, "torchrun": 20.0, "sampling": 5.0, "features": 5.0,
              "networks": 10.0}  # for --quick's 60 s; a larger --budget scales them (a loaded machine: the suite's check)
QUICK_BUDGET, BUDGET = 60.0, 300.0


def run_stage(run: Run, name: str, cap: float, fn: Callable[[Run, float], dict]) -> None:
    """One stage within its cap (and the budget left): its figures, or why it has none."""
    cap = min(cap, max(run.left(), 0.0))
    start = time.monotonic()
    if cap < 1:
        run.stages[name] = dict(status="overran", reason="the budget was spent before this stage")
        return
    try:
        figures = fn(run, cap)
        seconds = time.monotonic() - start
        status = figures.pop("status", "ok" if seconds <= cap else "overran")
        run.stages[name] = dict(status=status, seconds=seconds, cap_s=cap, **figures)
    except subprocess.TimeoutExpired:
        run.stages[name] = dict(status="overran", seconds=time.monotonic() - start, cap_s=cap)
    except Exception as error:  # noqa: BLE001 (a failing stage is a result; the run goes on)
        run.stages[name] = dict(status="failed", seconds=time.monotonic() - start, cap_s=cap,
                                reason="".join(traceback.format_exception_only(type(error), error)).strip()[-800:])
    print(f"{name:10s} {run.stages[name]['status']:8s} {run.stages[name].get('seconds', 0):6.1f} s", flush=True)


def machine(device: torch.device) -> dict:
    """What the figures were taken on."""
    info = dict(device=device_name(device), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), host=platform.node())
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = None
    return info


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """The figures as a Markdown table for docs/performance.md."""
    m = report["machine"]
    lines = [f"Acceptance {'(--quick: toy sizes, not GPU figures)' if report['quick'] else ''} on {m['device']}, torch "
             f"{m['torch']}{', CUDA ' + str(m.get('cuda')) if m.get('cuda') else ''}"
             f"{', driver ' + str(m.get('driver')) if m.get('driver') else ''}, {m['date']}", "",
             "| stage | figure | value | goal |", "|---|---|---|---|"]
    s = report["stages"]

    def row(stage, figure, value, goal="") -> None:
        lines.append(f"| {stage} | {figure} | {_number(value)} | {goal} |")

    for name, figures in s.items():
        row(name, "status", f"{figures['status']} ({figures.get('seconds', 0):.0f} s)")
    if "kernel_ratio" in s.get("kernel", {}):
        row("kernel", "D=128 draw / torch.randn", s["kernel"]["kernel_ratio"], "<= 2")
        for r in s["kernel"]["per_rank_draws"]:
            row("kernel", f"draws per rank at {r['ranks']} ranks (ms, global draw -> own rows)",
                f"{r['global_ms']:.3g} -> {r['own_rows_ms']:.3g}")
    for name, v in s.get("train", {}).get("variants", {}).items():
        if v.get("status") == "ok":
            row("train", f"{name} img/s (MFU, peak GiB)", f"{v['img_per_sec']:.4g} ({_number(v['mfu'])}, {v['peak_gpu_gib']:.3g})")
        else:
            row("train", f"{name}", v.get("status"))
    if "img_per_sec" in s.get("torchrun", {}):
        row("torchrun", f"1 rank ({s['torchrun']['backend']}) img/s", s["torchrun"]["img_per_sec"])
    for name, v in s.get("sampling", {}).get("precisions", {}).items():
        row("sampling", f"{name} img/s, 50k in s", f"{v['img_per_sec']:.4g}, {v['projected_50k_s']:.4g}", "<= 235 s")
    for name, v in s.get("networks", {}).get("presets", {}).items():
        if v.get("status") == "ok":
            row("networks", f"{name} {v['resolution']}x{v['resolution']} {s['networks']['variant']} img/s forward, fwd+bwd",
                f"{v['forward_img_per_sec']:.4g}, {v['step_img_per_sec']:.4g}")
    if "img_per_sec" in s.get("features", {}):
        row("features", "img/s, 50k in s", f"{s['features']['img_per_sec']:.4g}, {s['features']['projected_50k_s']:.4g}",
            "<= 60 s")
    return "\n".join(lines) + "\n"


@click.command()
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder for acceptance.json and acceptance.md")
@click.option("--quick", is_flag=True, help="Every stage at toy sizes (a CPU check of the script, about a minute)")
@click.option("--budget", type=click.FloatRange(min=10), default=None, help="Wall seconds in all (each stage's cap scales with it)  [default: 300; 60 with --quick]")
@click.option("--only", default=None, help="Comma-separated stages to run  [default: all]")
def main(out: str, quick: bool, budget: float | None, only: str | None) -> None:
    """Run the acceptance stages within the budget and write the figures."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(1)  # as the subprocesses: two threads spin against each other on a busy small machine
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    budget = budget or (QUICK_BUDGET if quick else BUDGET)
    scale = budget / (QUICK_BUDGET if quick else BUDGET)
    run = Run(outdir, quick, device, time.monotonic() + budget)
    wanted = None if only is None else set(only.split(","))
    print(f"acceptance on {device_name(device)}{' (--quick)' if quick else ''}: budget {budget:.0f} s", flush=True)
    for name, cap, fn in STAGES:
        if wanted is None or name in wanted:
            run_stage(run, name, scale * (QUICK_CAPS[name] if quick else cap), fn)
    report = dict(quick=quick, budget_s=budget, machine=machine(device), stages=run.stages, goals=GOALS)
    (outdir / "acceptance.json").write_text(json.dumps(report, indent=2, default=lambda v: None if isinstance(v, float) and not math.isfinite(v) else str(v)))
    (outdir / "acceptance.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
