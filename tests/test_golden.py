"""Golden outputs: generate.py's images for every solver family and short training runs, compared with the files in
tests/golden/ within tolerances that cover CPU kernel differences, so that a reorganisation cannot change a result.

Where they came from. generate-*.png: generate.py's --grid PNGs written by commit 613eac0 (torch 2.13.0, CPU,
x86_64 with AVX-512, one thread), from the four seeded networks of the `networks` fixture. train-*-samples.png and
train-*-weights.npz (the trained network's weights under net/, and its EMA's difference from them under
ema_minus_net/, float32): train.py's last sample grid (stored at scale 1; train.py enlarges 8x8 images eight
times) and final weights with the
options TINY + TRAIN below, written by the commit that introduced them (torch 2.13.0, CPU, x86_64 AVX2, one
thread), after checking that the code before that commit's reorganisation wrote the same bits on that machine.
Rewrite them with PFGMPP_RECORD_GOLDEN=1 (only after a deliberate change of results, saying so in the commit).

Tolerances. A CPU's instruction set picks other oneDNN / MKL / ATen kernels (other accumulation orders), so a
float32 result may differ in its last bits from one machine to another; these differences were measured between
ATEN_CPU_CAPABILITY=default and avx2 on one machine and against the AVX-512 machine that wrote the images:
- Fixed-step float32 samplers (`EXACT`): every value within 1 level, and at most 0.5% of them off by 1. Rounding
  differences of order 1e-6 only move a value across a uint8 boundary rarely (measured: no pixel moved). A change
  of Heun's rho from 7 to 7.2 moves 1.1% of the values by one level and fails.
- Adaptive RK45 (`ADAPTIVE`): last-bit differences can flip an accepted step, after which a few pixels follow
  another path (measured: up to 30 levels on 14 of 1326 values, mean 0.08 level). Mean within 0.2 level and at
  most 2% of the values off by more than 1; z_max 40 -> 38 or --rtol 1e-4 -> 1e-3 moves the mean by 0.30-0.35 and fails.
- bfloat16 (`BF16`): bf16 kernels round products and sums differently per instruction set (8-bit mantissa):
  measured mean 0.19 level, 4% of the values off by more than 1, at most 6 levels. Mean within 0.5 level, at most
  10% off by more than 1; rho 7 -> 7.5 at 4 steps gives a mean of 1.4 levels and fails.
- Weights (`WEIGHTS`): the relative L2 distance of all weights within 1e-5 and every weight within 2e-4. Measured
  between instruction sets: relative 3e-7 at most, single weights up to 7e-6 (Adam's step amplifies the rounding of
  gradients near zero). A learning rate 1% higher gives 3e-4 relative (1.4e-3 on single weights) and fails
  (`test_the_tolerances_catch_a_real_change`). The runs use --lr_rampup=0 so that four Adam steps move the weights
  by about 4e-3: with EDM's 10 Mimg ramp-up they would move by 1e-9 and no comparison could see the training.
  The EMA, whose half-life ramps up from zero, is 4e-5 (relative) from the network after four steps; that
  difference is compared within 1e-3 relative L2 (`EMA_RELATIVE`): instruction sets move it by 7e-5 at most, a 1%
  higher learning rate by 4e-2.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from tests.helpers import ROOT, make_dataset, subprocess_env, tiny_network
from training import checkpoint

GOLDEN = Path(__file__).parent / "golden"
RECORD = os.environ.get("PFGMPP_RECORD_GOLDEN") == "1"


@dataclass(frozen=True)
class Tolerance:
    """How far a produced picture may be from its golden file, in uint8 levels (module docstring)."""

    max_levels: int | None  # the largest difference of one value (None: not bounded)
    mean_levels: float  # the mean difference over all values
    off_by_more: float  # the fraction of values that may differ by more than `over` levels
    over: int = 1


EXACT = Tolerance(max_levels=1, mean_levels=0.005, off_by_more=0.005, over=0)
ADAPTIVE = Tolerance(max_levels=None, mean_levels=0.2, off_by_more=0.02)
BF16 = Tolerance(max_levels=None, mean_levels=0.5, off_by_more=0.10)
WEIGHTS = dict(relative_l2=1e-5, max_abs=2e-4)
EMA_RELATIVE = 1e-3

# name: (network, generate.py options, tolerance); seeds 0-5 in batches of 4.
GENERATE = {
    "heun": ("edm128", [], EXACT),
    "euler_ablate": ("edm128", ["--solver=euler", "--steps=5", "--disc=vp", "--schedule=vp", "--scaling=vp"], EXACT),
    "churn": ("cond_inf", ["--S_churn=10", "--S_noise=1.003", "--steps=6", "--disc=iddpm"], EXACT),
    "ve_class": ("cond_inf", ["--class=2", "--disc=ve", "--schedule=ve", "--steps=7", "--rho=5"], EXACT),
    "rk45": ("edm128", ["--solver=rk45", "--rtol=1e-3", "--atol=1e-3"], ADAPTIVE),
    "pc_vp": ("vp", ["--solver=pc", "--steps=20"], EXACT),
    "pc_ve": ("cond_inf", ["--solver=pc", "--sde=ve", "--corrector=ald", "--predictor=euler_maruyama", "--steps=20",
                           "--snr=0.1"], EXACT),
    "pfgm_rk45": ("pfgm", ["--solver=pfgm_rk45"], ADAPTIVE),
    "pfgm_euler": ("pfgm", ["--solver=pfgm_euler", "--steps=20"], EXACT),
    "pfgm_ie": ("pfgm", ["--solver=pfgm_improved_euler", "--steps=10", "--sigma_max=20"], EXACT),
    "rk45_pfgmnet": ("pfgm", ["--solver=rk45"], ADAPTIVE),
    "bf16": ("edm128", ["--precision=bf16", "--steps=4"], BF16),
}
# Latent modes: (network, full options, tolerance).
LATENT_MODES = {
    "temp": ("edm128", ["--seeds=0-3", "--temperature=0.8,1.2", "--steps=5"], EXACT),
    "interp": ("edm128", ["--interpolate=1,2", "--frames=4", "--steps=5"], EXACT),
}
TINY = ["--arch=ddpmpp", "--cbase=8", "--cres=1,2", "--nblock=1", "--attn=4", "--dropout=0.1", "--augment=0.2", "--workers=0",
        "--precision=fp32", "--grid=4", "--seed=3", "--nosubdir", "--batch=8", "--duration=0.000032", "--tick=0.016",
        "--snap=1", "--lr_rampup=0"]
# name: (dataset, train.py options).
TRAIN = {
    "edm": ("labelled", ["--cond=1", "--pfgmpp=1", "--aug_dim=64", "--xflip=1"]),
    "pfgm": ("unlabelled", ["--precond=pfgm", "--rbatch=16"]),
    "fp": ("unlabelled", ["--fp_reg=1"]),
    "ve": ("unlabelled", ["--precond=ve", "--batch-gpu=4"]),
}


def _perturbed(net, seed: int):
    """Random weights everywhere (the networks' output layers start at zero), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


@pytest.fixture(scope="module")
def networks(tmp_path_factory) -> Path:
    """The four snapshots the golden files were made from (same seeds, same construction)."""
    root = tmp_path_factory.mktemp("golden")
    specs = {"edm128": dict(D=128.0), "cond_inf": dict(label_dim=4, D=float("inf")),
             "vp": dict(D=float("inf"), precond="vp"), "pfgm": dict(precond="pfgm")}
    for i, (name, kwargs) in enumerate(specs.items()):
        torch.manual_seed(i)  # a test's own seeding: tiny_network's layers draw from torch's generator here
        checkpoint.save_network(root / f"{name}.pt", _perturbed(tiny_network(**kwargs), 10 + i))
    return root


def _run_generate(calls: list[list[str]]) -> None:
    """generate.py's main for each argument list, in one CPU-only, one-thread process (as the golden run)."""
    script = "import sys, generate\nfor args in eval(sys.argv[1]):\n    generate.main(args, standalone_mode=False)\n"
    done = subprocess.run([sys.executable, "-c", script, repr(calls)], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def picture_difference(produced: Path, golden: Path, tolerance: Tolerance, scale: int = 1) -> str | None:
    """Why `produced` is not `golden` within `tolerance`, or None when it is; `produced` may be `golden` enlarged by
    `scale` (training's sample grids show 8x8 images eight times), every `scale`-th pixel of it compared."""
    a, b = (np.asarray(PIL.Image.open(io.BytesIO(p.read_bytes())), dtype=np.int16) for p in (produced, golden))
    if scale > 1:
        if a.shape[:2] != (b.shape[0] * scale, b.shape[1] * scale):
            return f"{produced.name}: shape {a.shape}, not golden {b.shape} enlarged {scale} times"
        if not np.array_equal(a, np.repeat(np.repeat(a[::scale, ::scale], scale, axis=0), scale, axis=1)):
            return f"{produced.name} is not an enlargement by pixel repetition"
        a = a[::scale, ::scale]
    if a.shape != b.shape:
        return f"{produced.name}: shape {a.shape}, golden {b.shape}"
    d = np.abs(a - b)
    found = dict(max=int(d.max()), mean=float(d.mean()), off=float((d > tolerance.over).mean()))
    if ((tolerance.max_levels is not None and found["max"] > tolerance.max_levels) or found["mean"] > tolerance.mean_levels
            or found["off"] > tolerance.off_by_more):
        return f"{produced.name} differs from {golden.name}: {found} beyond {tolerance}"
    return None


def _check_picture(produced: Path, golden: Path, tolerance: Tolerance, scale: int = 1) -> None:
    if RECORD:
        picture = PIL.Image.open(produced)
        picture.resize((picture.width // scale, picture.height // scale), PIL.Image.NEAREST).save(golden)
        return
    problem = picture_difference(produced, golden, tolerance, scale)
    assert problem is None, problem


@pytest.mark.slow
def test_generate_writes_the_golden_images_for_every_solver_family(networks, tmp_path):
    calls = [[f"--network={networks / net}.pt", f"--outdir={tmp_path / name}", "--seeds=0-5", "--batch=4",
              f"--grid={tmp_path / name}.png", *options] for name, (net, options, _) in GENERATE.items()]
    calls += [[f"--network={networks / net}.pt", f"--grid={tmp_path / name}.png", *options]
              for name, (net, options, _) in LATENT_MODES.items()]
    _run_generate(calls)
    for name, (_, _, tolerance) in {**GENERATE, **LATENT_MODES}.items():
        _check_picture(tmp_path / f"{name}.png", GOLDEN / f"generate-{name}.png", tolerance)


def _distance(produced: dict, golden: dict) -> dict:
    """The relative L2 distance and the largest difference between two dicts of tensors with the same keys."""
    assert sorted(produced) == sorted(golden), "the golden run had other parameters"
    num = den = worst = 0.0
    for key, y in golden.items():
        x, y = produced[key].double(), y.double()
        num += (x - y).square().sum().item()
        den += y.square().sum().item()
        worst = max(worst, (x - y).abs().max().item() if x.numel() else 0.0)
    return dict(relative_l2=(num / den) ** 0.5, max_abs=worst)


def golden_weights(name: str) -> tuple[dict, dict]:
    """(net, ema - net) of a golden training run, as tensors."""
    with np.load(GOLDEN / f"train-{name}-weights.npz") as stored:
        parts = {part: {k.split("/", 1)[1]: torch.from_numpy(stored[k].astype(np.float64)) for k in stored.files
                        if k.startswith(f"{part}/")} for part in ("net", "ema_minus_net")}
    return parts["net"], parts["ema_minus_net"]


def _ema_minus_net(state: dict) -> dict:
    return {k: state["ema"][k].double() - state["net"][k].double() for k in state["net"]}


def _train(name: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> dict:
    """train.py with a golden run's options (and `extra`); its final training state."""
    data, options = TRAIN[name]
    dataset = make_dataset(tmp_path / "data.zip", count=32, labels=data == "labelled")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--outdir={out}", f"--data={dataset}", *TINY, *options,
                           *extra], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    state = checkpoint.read_state(checkpoint.find_resume_state(out))
    assert state["step"] == 4
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRAIN))
def test_a_short_training_run_gives_the_golden_weights(name, tmp_path):
    state = _train(name, tmp_path)
    # The grid of the last snapshot (step 4; the first, at step 2, is samples-000000.png).
    _check_picture(tmp_path / "run" / "samples-000000.032.png", GOLDEN / f"train-{name}-samples.png", EXACT, scale=8)
    if RECORD:
        arrays = {f"net/{k}": v.numpy() for k, v in state["net"].items()}
        arrays.update({f"ema_minus_net/{k}": v.numpy().astype(np.float32) for k, v in _ema_minus_net(state).items()})
        np.savez_compressed(GOLDEN / f"train-{name}-weights.npz", **arrays)
        return
    net, ema_minus_net = golden_weights(name)
    found = _distance(state["net"], net)
    assert all(found[k] <= limit for k, limit in WEIGHTS.items()), f"net: {found} beyond {WEIGHTS}"
    found = _distance(_ema_minus_net(state), ema_minus_net)["relative_l2"]
    assert found <= EMA_RELATIVE, f"ema - net: relative L2 {found} beyond {EMA_RELATIVE}"


@pytest.mark.slow
def test_the_tolerances_catch_a_real_change(networks, tmp_path):
    """A learning rate 1% higher, and Heun's rho 7.2 instead of 7, are caught (module docstring)."""
    state = _train("edm", tmp_path, ("--lr=0.00101",))
    net, ema_minus_net = golden_weights("edm")
    found = _distance(state["net"], net)
    assert found["relative_l2"] > 10 * WEIGHTS["relative_l2"] and found["max_abs"] > WEIGHTS["max_abs"], found
    assert _distance(_ema_minus_net(state), ema_minus_net)["relative_l2"] > 10 * EMA_RELATIVE
    _run_generate([[f"--network={networks / 'edm128'}.pt", f"--grid={tmp_path / 'heun.png'}", "--seeds=0-5", "--batch=4",
                    "--rho=7.2"]])
    assert picture_difference(tmp_path / "heun.png", GOLDEN / "generate-heun.png", EXACT) is not None
