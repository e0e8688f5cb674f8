"""Stopping on a signal: SIGTERM, SIGINT or SIGUSR1 (preemption) set a flag; the ranks vote on it every few steps,
and the loop then writes a training state and exits cleanly on every rank."""

from __future__ import annotations

import signal

import torch

from torch_utils import distributed

CHECK_STEPS = 16  # steps between two votes of the ranks


class StopFlag:
    """Set by SIGTERM / SIGINT / SIGUSR1 (preemption) while the block runs; the handlers before come back after."""

    SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class StopVote:
    """All ranks agree whether a stop signal arrived: one small all-reduce every CHECK_STEPS steps.

    On CUDA the vote is asynchronous and read at the next check, when it has long arrived in pinned host memory:
    no host-device synchronisation, and a stop comes one check interval later.
    """

    def __init__(self, flag: StopFlag, device: torch.device, check_steps: int = CHECK_STEPS):
        self.flag, self.device, self.check_steps = flag, device, check_steps
        self.world = distributed.get_world_size()
        cuda = device.type == "cuda"
        self._out = torch.zeros(1, pin_memory=True) if cuda else None  # pinned host buffers out and back
        self._back = torch.zeros(1, pin_memory=True) if cuda else None
        self._event = None  # of the last copy back

    def __call__(self, step: int) -> bool:
        """Whether to stop before step `step` (the same answer on every rank)."""
        if self.world == 1:
            return self.flag.signal is not None
        if step % self.check_steps:
            return False
        vote = 1.0 if self.flag.signal is not None else 0.0
        if self.device.type != "cuda":
            return bool(distributed.all_reduce_sum(torch.tensor([vote], device=self.device)).item() > 0)
        decided = False
        if self._event is not None:
            self._event.synchronize()  # the previous vote's copy, finished steps ago: waits for nothing else
            decided = bool(self._back[0] > 0)
        self._out[0] = vote
        total = distributed.all_reduce_sum(self._out.to(self.device, non_blocking=True))
        self._back.copy_(total, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return decided
