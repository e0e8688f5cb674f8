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
