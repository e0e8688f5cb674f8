"""Explicit random number generators: one `torch.Generator`, one per sample, or counter-based streams.

Library functions take `generator=None | torch.Generator | Sequence[torch.Generator] | CounterStreams`.
With a sequence, the first dimension of every draw is the batch, and row `i` comes from `generator[i]`
alone, so a sample's randomness does not depend on the batch it is drawn in (EDM's per-seed
generation). `CounterStreams` give the same guarantee without a loop over samples: row `i` of every draw
is a function of the stream's key `i` and of the draw's position, computed for the whole batch at once
(training draws only this rank's rows of the global batch with them). Nothing here touches the global RNG
except the `None` case, which uses it as torch does.

Network code draws too (weight initialisation, dropout, label dropout), through torch's ordinary functions
behind the network's fixed call signature; `network_draws(generator)` makes those draws come from an explicit
generator for the length of a block (training's initial weights and each step's dropout), so nothing reseeds
torch's global generator and this module is the only one that touches its state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Union

import numpy as np
import torch

Generators = Union[None, torch.Generator, Sequence[torch.Generator], "CounterStreams"]


def mixed_seed(*values: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): distinct tuples give unrelated streams."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per seed on `device`."""
    return [torch.Generator(device).manual_seed(int(seed)) for seed in seeds]


# SplitMix64 (Steele, Lea & Flood 2014) in int64 tensors: multiplication wraps modulo 2^64 (two's complement,
# on the CPU and on CUDA), and a logical right shift is an arithmetic one with the sign bits masked off.
def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # the Weyl increment: 2^64 / golden ratio, odd
_MIX1, _MIX2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: a bijection of 64-bit integers whose every output bit depends on every input bit."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


class CounterStreams:
    """One counter-based random stream per sample, drawn for a whole batch at once.

    Value j of stream b is SplitMix64 at counter keys[b] + (offset + j) * golden: row b of every draw depends on
    keys[b] and on how many values the stream gave before, never on the other rows. `keys` (int64 [B], on the
    device the draws are made on) come from `sample_streams`.
    """

    def __init__(self, keys: torch.Tensor):
        if keys.dtype != torch.int64 or keys.ndim != 1:
            raise ValueError(f"stream keys must be an int64 vector, got {keys.dtype} {list(keys.shape)}")
        self.keys, self.offset = keys, 0

    def __len__(self) -> int:
        return self.keys.numel()

    @property
    def device(self) -> torch.device:
        """Where the draws are made."""
        return self.keys.device

    def bits(self, count: int) -> torch.Tensor:
        """The next `count` 64-bit values of every stream, int64 [B, count]."""
        j = torch.arange(self.offset + 1, self.offset + count + 1, dtype=torch.int64, device=self.device)
        self.offset += count
        return _mix64(self.keys[:, None] + j * _GOLDEN)

    def uniform(self, count: int, dtype=torch.float32) -> torch.Tensor:
        """U(0, 1) [B, count] from the top 24 (float32, float16, bfloat16) or 53 (float64) bits of each value."""
        bits = 53 if dtype == torch.float64 else 24
        top = _shift_right(self.bits(count), 64 - bits).to(torch.float64 if bits == 53 else torch.float32)
        return ((top + 0.5) * 2.0**-bits).to(dtype)

    def normal(self, count: int, dtype=torch.float32) -> torch.Tensor:
        """N(0, 1) [B, count] by Box and Muller: each pair of normals comes from one 64-bit value (40 bits for the
        radius, tails to 7.4 sigma where 32-bit uniforms stop at 6.7, and 24 for the angle) in float32; float64
        takes two values per pair (53 bits each, tails to 8.6 sigma) and computes in float64."""
        pairs = (count + 1) // 2
        if dtype == torch.float64:
            u = self.uniform(2 * pairs, torch.float64)
            radius, angle = torch.sqrt(-2.0 * torch.log(u[:, :pairs])), (2.0 * math.pi) * u[:, pairs:]
        else:
            bits = self.bits(pairs)
            u = ((_shift_right(bits, 24).to(torch.float64) + 0.5) * 2.0**-40).to(torch.float32)
            radius = torch.sqrt(-2.0 * torch.log(u))
            angle = ((bits & 0xFFFFFF).to(torch.float32) + 0.5) * (2.0 * math.pi * 2.0**-24)
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count].to(dtype)


def sample_streams(seed: Sequence[int], rows: Sequence[int] | range, device=None) -> CounterStreams:
    """Streams for the samples at global positions `rows`, keyed by `seed` (a tuple such as (run seed, step, purpose)).

    The key of sample i is a function of `seed` and i alone: any subset of rows, on any rank, draws what the
    whole batch would give for those rows.
    """
    if isinstance(rows, range):
        index = torch.arange(rows.start, rows.stop, rows.step, dtype=torch.int64, device=device)
    else:
        index = torch.as_tensor(list(rows), dtype=torch.int64, device=device)
    return CounterStreams(_mix64(mixed_seed(*seed) + index * _GOLDEN))


def device_of(generator: Generators) -> torch.device:
    """The device a generator (or the first of a sequence) draws on; the CPU for None."""
    if isinstance(generator, torch.Generator):
        return generator.device
    if isinstance(generator, CounterStreams):
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


def _streamed(streams: CounterStreams, shape: Sequence[int], normal: bool, device, dtype) -> torch.Tensor:
    shape = [int(s) for s in shape]
    if not shape or shape[0] != len(streams):
        raise ValueError(f"{len(streams)} streams for a draw of shape {shape}: one stream per sample (the first dimension)")
    if device is not None and torch.device(device) != streams.device:
        raise ValueError(f"the streams draw on {streams.device}, not on {device}")
    dtype = dtype or torch.get_default_dtype()
    count = math.prod(shape[1:])
    values = streams.normal(count, dtype) if normal else streams.uniform(count, dtype)
    return values.reshape(shape)


def randn(shape: Sequence[int], generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws of `shape` from one generator, one per sample, or counter-based streams."""
    if isinstance(generator, CounterStreams):
        return _streamed(generator, shape, True, device, dtype)
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape: Sequence[int], generator: Generators = None, device=None, dtype=None) -> torch.Tensor:
    """Uniform draws of `shape` ([0, 1); (0, 1) from counter-based streams)."""
    if isinstance(generator, CounterStreams):
        return _streamed(generator, shape, False, device, dtype)
    return _draw(torch.rand, shape, generator, device, dtype)


def randn_like_fn(generator: Generators) -> Callable[[torch.Tensor], torch.Tensor]:
    """A `randn_like` replacement drawing from `generator` (for the sampler's churn noise)."""

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        return randn(x.shape, generator, device=x.device, dtype=x.dtype)

    return randn_like


# ----------------------------------------------------------------------------------------------
# Draws made inside network code: weight initialisation, dropout, label dropout.


def _default_generator(device: torch.device) -> torch.Generator:
    """torch's own generator of a device (the CPU's, or a CUDA device's)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    if device.type != "cpu":
        raise ValueError(f"network draws are supported on the CPU and CUDA, not on {device.type}")
    return torch.random.default_generator


@contextlib.contextmanager
def network_draws(generator: torch.Generator) -> Iterator[torch.Generator]:
    """Inside this block, torch's own generator of `generator`'s device draws from `generator`'s stream.

    Network code draws behind a fixed signature (initial weights in constructors, dropout and label dropout in
    forward) through torch's ordinary functions, which read torch's global generator; this block hands them an
    explicit, seeded generator instead, and torch.compile's graphs draw from it too. Outside the block the global
    generator is as it was; `generator` has advanced by what was drawn.
    """
    default = _default_generator(generator.device)
    saved = default.get_state()
    default.set_state(generator.get_state())
    try:
        yield generator
    finally:
        generator.set_state(default.get_state())
        default.set_state(saved)


def replay_point(device: torch.device) -> Callable[[], None]:
    """A function that resets torch's generators (the CPU's, and the device's when it is CUDA) to their state now,
    so that code run again draws the same numbers (the same dropout mask in several calls of a network)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def replay() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    return replay
