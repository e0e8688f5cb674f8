"""Shared by the tests that run train.py end to end: a tiny dataset and network, subprocess runs of
train.py (plain or under torchrun / the launch scripts, gloo on 127.0.0.1), and state comparisons."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from training import checkpoint, networks, preconditioners

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch=ddpmpp", "--cbase=8", "--cres=1,2", "--nblock=1", "--attn=4", "--dropout=0", "--augment=0",
        "--workers=0", "--precision=fp32", "--grid=4", "--seed=3"]


def make_dataset(path: Path, count: int = 64, resolution: int = 8, labels: bool = True, channels: int = 3) -> Path:
    """An EDM-format ZIP of smooth random images (and labels), written directly in the format."""
    rng = np.random.default_rng(0)
    names = []
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for i in range(count):
            base = rng.integers(0, 256, size=[1, 1, 3])
            image = np.clip(base + rng.integers(-20, 20, size=[resolution, resolution, 3]), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(image if channels == 3 else image[:, :, 0]).save(buf, format="PNG")
            name = f"00000/img{i:08d}.png"
            z.writestr(name, buf.getvalue())
            names.append([name, i % 4])
        z.writestr("dataset.json", json.dumps({"labels": names if labels else None}))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict:
    """The environment of a CPU-only subprocess of this repository: one thread per process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), **extra}


def torchrun(script: str, args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=nproc script args` on 127.0.0.1 (gloo, CPU), output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_train(outdir: Path, args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """train.py in a subprocess; with nproc > 1 under torchrun (gloo on 127.0.0.1)."""
    launcher = [sys.executable, str(ROOT / "train.py")]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
                    "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "train.py")]
    result = subprocess.run([*launcher, f"--outdir={outdir}", "--nosubdir", *TINY, *args], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def final_state(outdir: Path) -> dict:
    """The newest readable training state of a run directory."""
    path = checkpoint.find_resume_state(outdir)
    assert path is not None, list(outdir.iterdir())
    return checkpoint.read_state(path)


def assert_weights(a: dict, b: dict, exact: bool) -> None:
    """Two state_dicts hold the same tensors: bitwise, or to float rounding."""
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def tiny_network(channels: int = 3, label_dim: int = 0, D: float = 128.0, precond: str = "edm"):
    """A small DDPM++ network (random weights) at 8x8; PFGM's has one more output channel and D = 1."""
    out_channels = channels + (precond == "pfgm")
    model = networks.build_network("ddpmpp", 8, channels, out_channels, label_dim=label_dim, model_channels=8,
                                   channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    return preconditioners.PRECONDITIONERS[precond](model, img_resolution=8, img_channels=channels,
                                                     label_dim=label_dim, D=1.0 if precond == "pfgm" else D)


def snapshot_and_dataset(folder: Path, count: int) -> tuple[Path, Path]:
    """A saved tiny D = 128 network (seeded weights) and an unlabelled dataset of `count` 8x8 images in `folder`."""
    from training import checkpoint

    torch.manual_seed(0)
    checkpoint.save_network(folder / "net.pt", tiny_network(channels=3, D=128.0))
    return folder / "net.pt", make_dataset(folder / "data.zip", count=count, labels=False)
