"""A stand-in for the Inception detector: the real call signature and output shapes, tiny and exact."""

from __future__ import annotations

import io
from pathlib import Path

import torch


class StandIn(torch.nn.Module):
    """A detector with the real call signature and output shapes, at 0.4 MB."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(48, 2048, generator=g) / 7)
        self.bias = torch.nn.Parameter(torch.randn(1008, generator=g))

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=[4, 4], mode="area")
        features = ((x - 128) / 128).reshape(x.shape[0], 48) @ self.proj
        if return_features:
            return features
        logits = features[:, :1008]
        if not no_output_bias:
            logits = logits + self.bias
        return torch.softmax(logits, dim=1)


def script_bytes(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def write_detector(path: Path, seed: int = 0) -> Path:
    """Save a scripted StandIn as a TorchScript file (what --detector=PATH accepts)."""
    path.write_bytes(script_bytes(StandIn(seed)))
    return path


def stand_in_reference(root: Path) -> tuple[Path, Path]:
    """(detector, reference statistics with features) in `root`: the stand-in detector and `fid.py ref` of 16 tiny
    images, what the evaluation commands' tests score against."""
    from click.testing import CliRunner

    import fid
    from tests.helpers import make_dataset

    detector = write_detector(root / "det.pt")
    data = make_dataset(root / "data.zip", count=16, labels=False)
    result = CliRunner().invoke(fid.main, ["ref", f"--data={data}", f"--dest={root / 'ref.npz'}", f"--detector={detector}",
                                           "--features=1", "--workers=0"])
    assert result.exit_code == 0, result.output
    return detector, root / "ref.npz"
