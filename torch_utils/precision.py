"""Arithmetic precision: TF32 switches and the autocast context, shared by training and sampling."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def check(precision: str, allowed=PRECISIONS) -> str:
    """`precision` if it is one of `allowed`, else a ValueError listing them."""
    if precision not in allowed:
        raise ValueError(f"precision must be one of {', '.join(allowed)}, got {precision!r}")
    return precision


def effective(precision: str, device_type: str) -> str:
    """The arithmetic `precision` gives on a device type: TF32 and fp16 (EDM's CUDA mode) are fp32 on the CPU."""
    return "fp32" if device_type != "cuda" and precision in ("tf32", "fp16") else precision


def set_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (no effect on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def autocast(precision: str, device: torch.device):
    """The autocast context of `precision`: bf16 autocast for 'bf16', nothing otherwise (fp16 is the network's own mode)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure(precision: str, device: torch.device, allowed=PRECISIONS):
    """Check `precision`, set TF32 (on unless fp32) and return its autocast context."""
    check(precision, allowed)
    set_tf32(precision != "fp32")
    return autocast(precision, device)
