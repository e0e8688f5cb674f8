"""Preconditioners and their training objectives: one registry, one protocol (`training.preconditioners.base`).

`PRECONDITIONERS` maps train.py's --precond names to preconditioner classes; checkpoints name the class
(`by_class_name`). A new preconditioner is one module here (the class, with its loss and its training
declarations) plus one line in `PRECONDITIONERS`; nothing else in the project switches on its name.

    edm    EDMPrecond / EDMLoss: EDM and PFGM++ for every D (training/preconditioners/edm.py)
    edm2   EDM2Precond / EDM2Loss: EDM's preconditioning with EDM2's learned log-variance weighting, every D
    vp     VPPrecond / VPLoss: Score SDE's VP
    ve     VEPrecond / VELoss: Score SDE's VE
    iddpm  iDDPMPrecond: improved DDPM, for imported networks (no training objective)
    pfgm   PFGMPrecond / PFGMLoss: PFGM, D = 1, with its field, perturbation and hyper-parameters
"""

from __future__ import annotations

from training.preconditioners.base import Precond
from training.preconditioners.edm import EDMLoss, EDMPrecond
from training.preconditioners.edm2 import EDM2Loss, EDM2Precond
from training.preconditioners.iddpm import iDDPMPrecond
from training.preconditioners.pfgm import PFGMLoss, PFGMPrecond
from training.preconditioners.ve import VELoss, VEPrecond
from training.preconditioners.vp import VPLoss, VPPrecond

__all__ = ["PRECONDITIONERS", "EDM2Loss", "EDM2Precond", "EDMLoss", "EDMPrecond", "PFGMLoss", "PFGMPrecond", "Precond",
           "VELoss", "VEPrecond", "VPLoss", "VPPrecond", "by_class_name", "get", "iDDPMPrecond", "kind_of", "trainable"]

PRECONDITIONERS: dict[str, type[Precond]] = {
    "edm": EDMPrecond,
    "edm2": EDM2Precond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "iddpm": iDDPMPrecond,
    "pfgm": PFGMPrecond,
}


def trainable() -> list[str]:
    """The names of the preconditioners that have a training objective (train.py --precond)."""
    return [kind for kind, cls in PRECONDITIONERS.items() if cls.loss_class is not None]


def get(kind: str) -> type[Precond]:
    """The preconditioner class registered as `kind`."""
    if kind not in PRECONDITIONERS:
        raise ValueError(f"unknown preconditioner {kind!r}; known: {', '.join(PRECONDITIONERS)}")
    return PRECONDITIONERS[kind]


def by_class_name(name: str) -> type[Precond]:
    """The registered preconditioner class called `name` (the allow-list of checkpoints)."""
    classes = {cls.__name__: cls for cls in PRECONDITIONERS.values()}
    if name not in classes:
        raise ValueError(f"unknown preconditioner class {name!r}; known: {', '.join(classes)}")
    return classes[name]


def kind_of(cls: type) -> str:
    """The registry name of a preconditioner class ('edm' for EDMPrecond)."""
    for kind, registered in PRECONDITIONERS.items():
        if registered is cls:
            return kind
    raise ValueError(f"{cls.__name__} is not a registered preconditioner ({', '.join(PRECONDITIONERS)})")
