"""Preconditioners: one registry, one protocol (`training.preconditioners.base`).

`PRECONDITIONERS` maps train.py's --precond names to preconditioner classes; checkpoints name the class
(`by_class_name`). A preconditioner holds its coefficients and declares the loss it trains with by default
(`training.losses`). A new preconditioner is one module here plus one line in `PRECONDITIONERS`; nothing else in
the project switches on its name.

    edm    EDMPrecond: EDM's, and PFGM++'s for every D (loss edm)
    edm2   EDM2Precond: EDM's with EDM2's learned log-variance head, every D (loss edm2)
    vp     VPPrecond: Score SDE's VP (loss vp)
    ve     VEPrecond: Score SDE's VE (loss ve)
    iddpm  iDDPMPrecond: improved DDPM, for imported networks (no training objective)
    pfgm   PFGMPrecond: PFGM, D = 1, a network of the normalised Poisson field (loss pfgm)
"""

from __future__ import annotations

from training.preconditioners.base import Precond
from training.preconditioners.edm import EDMPrecond
from training.preconditioners.edm2 import EDM2Precond
from training.preconditioners.iddpm import iDDPMPrecond
from training.preconditioners.pfgm import PFGMPrecond
from training.preconditioners.ve import VEPrecond
from training.preconditioners.vp import VPPrecond

__all__ = ["PRECONDITIONERS", "EDM2Precond", "EDMPrecond", "PFGMPrecond", "Precond", "VEPrecond", "VPPrecond",
           "by_class_name", "get", "iDDPMPrecond", "kind_of", "trainable"]

PRECONDITIONERS: dict[str, type[Precond]] = {
    "edm": EDMPrecond,
    "edm2": EDM2Precond,
    "vp": VPPrecond,
    "ve": VEPrecond,
    "iddpm": iDDPMPrecond,
    "pfgm": PFGMPrecond,
}


def trainable() -> list[str]:
    """The names of the preconditioners that train with a loss of their own (train.py --precond)."""
    return [kind for kind, cls in PRECONDITIONERS.items() if cls.default_loss is not None]


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
