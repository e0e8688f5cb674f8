"""The averages of a training run: EDM's classic EMA (a half-life in images) and EDM2's power-function EMAs.

`Averages.update(net, nimg)` folds the network in after every optimizer step; `snapshots(label)` names every
tracked average for a snapshot; `reader` is the network of the sample grids and of a training state's readers.
"""

from __future__ import annotations

import copy

import torch

from training import phema

RAMPUP_RATIO = 0.05  # EDM's: the half-life grows with the images seen, up to --ema


def ema_beta(halflife_kimg: float, batch: int, nimg: int) -> float:
    """EDM's EMA decay per step: half-life `halflife_kimg`, ramped up as RAMPUP_RATIO times the images seen."""
    ema_nimg = min(halflife_kimg * 1000, nimg * RAMPUP_RATIO)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


class Averages:
    """The classic EMA (--ema half-life, unless only power-function EMAs are tracked) and the power-function EMAs
    (--ema_std) of a network, updated after each optimizer step."""

    def __init__(self, net: torch.nn.Module, halflife_mimg: float, profiles: list[float], batch: int):
        self.halflife_kimg, self.batch = halflife_mimg * 1000, batch
        self.classic = None
        if halflife_mimg > 0 or not profiles:
            self.classic = copy.deepcopy(net).eval().requires_grad_(False)
        self.phema = phema.PowerFunctionEMA(net, profiles) if profiles else None

    @torch.no_grad()
    def update(self, net: torch.nn.Module, nimg: int) -> None:
        """After the optimizer step that brought the images seen to `nimg`: EDM's EMA with the decay of the images
        seen before the step (a copy at the first), EDM2's with those including it (eq. 127)."""
        if self.classic is not None:
            beta = ema_beta(self.halflife_kimg, self.batch, nimg - self.batch)
            torch._foreach_lerp_(list(self.classic.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
            for b_ema, b_net in zip(self.classic.buffers(), net.buffers()):
                b_ema.copy_(b_net)
        if self.phema is not None:
            self.phema.update(net, nimg, self.batch)

    @property
    def reader(self) -> torch.nn.Module:
        """The network of the sample grids and of a training state's readers: the classic EMA, else the tracked
        power-function EMA of the largest sigma_rel."""
        return self.classic if self.classic is not None else self.phema.items()[-1][1]

    def snapshots(self, label: str) -> list[tuple[str, float | None, torch.nn.Module]]:
        """(snapshot file name, sigma_rel or None for the classic EMA, network) of every tracked average, for a tick's
        `checkpoint.formats.kimg_label` ('000123', or '000123.456' under 1 kimg after the previous outputs)."""
        found = [] if self.classic is None else [(phema.snapshot_name(label), None, self.classic)]
        if self.phema is not None:
            found += [(phema.snapshot_name(label, s), s, module) for s, module in self.phema.items()]
        return found

    def provenance(self, sigma_rel: float | None) -> dict:
        """What a snapshot of the average `sigma_rel` records of it."""
        return {"halflife_kimg": self.halflife_kimg} if sigma_rel is None else {"sigma_rel": sigma_rel}

    def phema_state(self) -> dict | None:
        """The power-function EMAs' `state_dict()` for a training state, or None when none is tracked."""
        return None if self.phema is None else self.phema.state_dict()

    def load(self, ema: dict, tracked: dict | None, source: str) -> None:
        """Restore from a training state's 'ema' and 'phema' entries; ValueError for a state that lacks them."""
        if self.classic is not None:
            self.classic.load_state_dict(ema)
        if self.phema is not None:
            if tracked is None:
                raise ValueError(f"{source} holds no power-function EMA; resume it without --ema_std, or start a new "
                                 f"run from its weights with --transfer={source}")
            self.phema.load_state_dict(tracked)
