"""Explicit random number generators: one `torch.Generator`, or one per sample.

Library functions take `generator=None | torch.Generator | Sequence[torch.Generator]`. With a
sequence, the first dimension of every draw is the batch, and row `i` comes from `generator[i]`
alone, so a sample's randomness does not depend on the batch it is drawn in (EDM's per-seed
generation). Nothing here touches the global RNG except the `None` case, which uses it as torch does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import numpy as np
import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def mixed_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): distinct tuples give unrelated streams."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per seed on `device`."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


def device_of(generator: Generators) -> torch.device:
    """The device a generator (or the first of a sequence) draws on; the CPU for None."""
    if isinstance(generator, torch.Generator):
        return generator.device
    if generator is not None:
        for g in generator:
            return g.device
    return torch.device("cpu")


def _draw(fn: Callable, shape: Sequence[int], generator: Generators, device, dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    if generator is None or isinstance(generator, torch.Generator):
        if device is None:
            device = device_of(generator)
        return fn(shape, generator=generator, device=device, dtype=dtype)
    generators = list(generator)
    if len(shape) == 0 or len(generators) != shape[0]:
        raise ValueError(
            f"got {len(generators)} generators for a draw of shape {list(shape)}: "
            "pass one generator per sample (the first dimension)"
        )
    if device is None:
        device = device_of(generators)
    return torch.stack([fn(shape[1:], generator=g, device=device, dtype=dtype) for g in generators])


def randn(shape: Sequence[int], generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws of `shape` from one generator or one per sample."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) draws of `shape` from one generator or one per sample."""
    return _draw(torch.rand, shape, generator, device, dtype)


def randn_like_fn(generator: Generators) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `randn_like` replacement drawing from `generator` (for the sampler's churn noise)."""

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        return randn(x.shape, generator, device=x.device, dtype=x.dtype)

    return randn_like
