"""Divergence of a network output by Hutchinson's estimator or exactly: shared by the likelihood and the FP regulariser.

Hutchinson (1989): for probes v with E[v v^T] = I, E[v^T J v] = tr J = div f. Rademacher probes have the
smallest variance among i.i.d. probes; Gaussian probes are the other usual choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from torch_utils import rng

PROBE_KINDS = ("rademacher", "gaussian")


def draw_probes(shape: Sequence[int], kind: str = "rademacher", count: int = 1, generator: rng.Generators = None,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """Hutchinson probes [B, count, ...] for inputs of `shape` = [B, ...]: E[v v^T] = I."""
    if kind not in PROBE_KINDS:
        raise ValueError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
    if int(count) < 1:
        raise ValueError(f"the number of probes must be >= 1, got {count}")
    shape = [int(shape[0]), int(count), *[int(s) for s in shape[1:]]]
    if kind == "gaussian":
        return rng.randn(shape, generator, device=device, dtype=dtype)
    u = rng.rand(shape, generator, device=device, dtype=dtype)
    return torch.where(u < 0.5, -torch.ones_like(u), torch.ones_like(u))


def divergence(outputs: torch.Tensor, inputs: torch.Tensor, probes: torch.Tensor | None = None,
               create_graph: bool = False) -> torch.Tensor:
    """Per-sample div of outputs(inputs), Tensor[B]: Hutchinson's mean over probes [B, K, ...], exact if None.

    `outputs` must be a differentiable function of `inputs` (same shape [B, ...], no mixing across rows).
    The estimate v^T J v takes one vector-Jacobian product per probe; the exact trace takes N of them.
    """
    if outputs.shape != inputs.shape:
        raise ValueError(f"outputs {list(outputs.shape)} and inputs {list(inputs.shape)} must have the same shape")
    batch = inputs.shape[0]
    if probes is None:
        flat = outputs.reshape(batch, -1)
        total = torch.zeros([batch], dtype=outputs.dtype, device=outputs.device)
        for i in range(flat.shape[1]):
            (grad,) = torch.autograd.grad(flat[:, i].sum(), inputs, retain_graph=True, create_graph=create_graph)
            total = total + grad.reshape(batch, -1)[:, i]
        return total
    if probes.ndim != inputs.ndim + 1 or probes.shape[0] != batch or probes.shape[2:] != inputs.shape[1:]:
        raise ValueError(f"probes must have shape [B, K, ...] = [{batch}, K, {', '.join(map(str, inputs.shape[1:]))}], "
                         f"got {list(probes.shape)}")
    count = probes.shape[1]
    total = torch.zeros([batch], dtype=outputs.dtype, device=outputs.device)
    for k in range(count):
        v = probes[:, k].to(outputs.dtype)
        (jtv,) = torch.autograd.grad(outputs, inputs, grad_outputs=v, retain_graph=True, create_graph=create_graph)
        total = total + (jtv * v.to(jtv.dtype)).reshape(batch, -1).sum(dim=1).to(total.dtype)
    return total / count
