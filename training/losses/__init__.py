"""Training objectives: one protocol (`training.losses.base.Loss`) and one registry.

`LOSSES` maps train.py's --loss names to loss classes; a preconditioner names the one it trains with by default
(`Precond.default_loss`). A loss declares the objective options of train.py it reads, the network output it
trains besides the denoised image, and how the run's options become its keyword arguments and its
preconditioner's. A new loss is one module here plus one line in `LOSSES`; nothing else in the project switches
on its name.

    edm    EDMLoss: EDM's, and PFGM++'s for every D (training/losses/edm.py)
    edm2   EDM2Loss: EDM2's uncertainty-weighted loss, every D; trains EDM2Precond's log-variance
    vp     VPLoss: Score SDE's VP
    ve     VELoss: Score SDE's VE
    pfgm   PFGMLoss: PFGM's normalised Poisson field, D = 1; trains PFGMPrecond's field

base.py holds the protocol and the denoising loss the first four share (`KernelLoss`), fp_regularizer.py
FP-Diffusion's regulariser, an option of those.
"""

from __future__ import annotations

from training.losses.base import KernelLoss, Loss
from training.losses.edm import EDMLoss
from training.losses.edm2 import EDM2Loss
from training.losses.pfgm import PFGMLoss
from training.losses.ve import VELoss
from training.losses.vp import VPLoss

__all__ = ["LOSSES", "EDM2Loss", "EDMLoss", "KernelLoss", "Loss", "PFGMLoss", "VELoss", "VPLoss", "get", "readers"]

LOSSES: dict[str, type[Loss]] = {
    "edm": EDMLoss,
    "edm2": EDM2Loss,
    "vp": VPLoss,
    "ve": VELoss,
    "pfgm": PFGMLoss,
}


def get(name: str) -> type[Loss]:
    """The loss class registered as `name`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    return LOSSES[name]


def readers(option: str) -> list[str]:
    """The names of the losses that read the objective option `option`."""
    return [name for name, cls in LOSSES.items() if option in cls.options]
