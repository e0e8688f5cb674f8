"""Post-training weight quantisation, the robustness study's third axis (PFGM++ paper, Sec. 5.3; the reference's
generate_quant.py), applied to a copy of the network.

Each quantised parameter is rounded per tensor to 2^B levels between its minimum and maximum (min-max, asymmetric):
scale = (max - min) / (2^B - 1), an integer zero point z = trunc(clip(-min / scale, 0, 2^B - 1)), q =
round(clip(z + w / scale, 0, 2^B - 1)) and w' = scale (q - z), so a tensor takes at most 2^B distinct values.
As the reference, only parameters named "...weight" are quantised, and not those whose name holds "norm",
"affine", "map" (normalisations, the noise-embedding affines, the mapping network) or "32" (EDM's layer names carry
the resolution: at 32x32 the first and last levels' layers stay in full precision). Biases stay as they are.
"""

from __future__ import annotations

import copy

import torch

SKIP = ("norm", "affine", "map", "32")  # name parts that keep full precision, as the reference's
FULL_PRECISION_BITS = 32  # float32 weights already: quantising to 32 bits leaves the network as it is


def quantized_names(net: torch.nn.Module) -> list[str]:
    """The parameters `quantize` changes: named '...weight', with none of `SKIP` in the name."""
    return [name for name, _ in net.named_parameters() if "weight" in name and not any(s in name for s in SKIP)]


def quantize_tensor(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` rounded to 2^bits levels of its own range (module docstring), in w's dtype; a constant tensor unchanged."""
    x = w.detach().to(torch.float32)
    levels = 2.0**bits - 1.0
    low, high = x.min(), x.max()
    scale = (high - low) / levels
    if not bool(scale > 0):  # a constant tensor: one value already
        return w.detach().clone()
    zero = torch.trunc((-low / scale).clamp(0.0, levels))
    q = (zero + x / scale).clamp(0.0, levels).round()
    return (scale * (q - zero)).to(w.dtype)


def quantize(net: torch.nn.Module, bits: int | None) -> torch.nn.Module:
    """A copy of `net` with its weights quantised to `bits` (1 .. 31); `net` itself for None or 32 (unchanged)."""
    if bits is None or int(bits) >= FULL_PRECISION_BITS:
        return net
    if int(bits) < 1:
        raise ValueError(f"quantize_bits must be between 1 and {FULL_PRECISION_BITS}, got {bits}")
    copied = copy.deepcopy(net)
    names = set(quantized_names(copied))
    if not names:
        raise ValueError(f"{type(net).__name__} has no parameter to quantise (none named '...weight' without "
                         f"{', '.join(SKIP)} in its name)")
    with torch.no_grad():
        for name, param in copied.named_parameters():
            if name in names:
                param.copy_(quantize_tensor(param, int(bits)))
    return copied
