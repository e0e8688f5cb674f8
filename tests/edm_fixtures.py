"""Build EDM / PFGM++-reference style checkpoints in the tests, in their real byte format.

EDM's persistent classes pickle as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with
meta = {type: 'class', version: 6, module_src, class_name, state}. Here a stand-in function is
registered under that name only while pickling, so the bytes are what EDM writes. The module_src
of every record writes a marker file when executed: a loader that runs it is caught.
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import pickle
import sys
import types
from pathlib import Path

import torch

PERSISTENCE = "torch_utils.persistence"


def marker_source(marker: Path) -> str:
    """Module source that leaves `marker` behind if anything executes it."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"


@contextlib.contextmanager
def persistence_module(reconstruct=None):
    """Register a stand-in `torch_utils.persistence` so pickles name EDM's global."""
    module = types.ModuleType(PERSISTENCE)

    def _reconstruct_persistent_obj(meta):  # only called by the "unsafe loader" demonstration
        return reconstruct(meta) if reconstruct else meta

    _reconstruct_persistent_obj.__module__ = PERSISTENCE
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = sys.modules.get(PERSISTENCE)
    sys.modules[PERSISTENCE] = module
    try:
        yield module
    finally:
        if saved is None:
            sys.modules.pop(PERSISTENCE, None)
        else:
            sys.modules[PERSISTENCE] = saved


class Persistent:
    """Pickles exactly like an EDM persistent object."""

    def __init__(self, class_name: str, state: dict, module_src: str):
        self.meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return sys.modules[PERSISTENCE]._reconstruct_persistent_obj, (self.meta,)


class PlainModule:
    """Pickles like a plain torch module (e.g. torch.nn.ModuleDict): NEWOBJ of the class, then its state."""

    def __init__(self, cls: type, state: dict):
        self.cls, self.state = cls, state

    @property
    def __class__(self):  # pickle's NEWOBJ names obj.__class__: present as the torch class
        return self.cls

    def __reduce__(self):
        return copyreg.__newobj__, (self.cls,), self.state


def _module_state(module: torch.nn.Module, children: dict) -> dict:
    return {
        "training": module.training,
        "_parameters": collections.OrderedDict((k, v) for k, v in module._parameters.items()),
        "_buffers": collections.OrderedDict((k, v) for k, v in module._buffers.items()),
        "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
        "_backward_hooks": collections.OrderedDict(),
        "_forward_hooks": collections.OrderedDict(),
        "_modules": collections.OrderedDict(children),
    }


def as_edm_record(module: torch.nn.Module, module_src: str, init_kwargs: dict | None = None):
    """Mirror a module tree as EDM records: torch containers stay plain, the rest become persistent."""
    children = {name: as_edm_record(child, module_src) for name, child in module._modules.items()}
    state = _module_state(module, children)
    if type(module).__module__.startswith("torch.nn"):
        return PlainModule(type(module), state)
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs if init_kwargs is not None else getattr(module, "init_kwargs", {}))
    state["_orig_module_src"] = module_src
    state["_orig_class_name"] = type(module).__name__
    return Persistent(type(module).__name__, state, module_src)


def edm_precond_record(net: torch.nn.Module, module_src: str, pfgmpp_D: float | None = None):
    """An EDM-style record of our preconditioned network: EDM's constructor kwargs, model_type, PFGM++ D."""
    kwargs = {k: v for k, v in net.init_kwargs.items() if k not in ("model", "D")}
    model_kwargs = {k: v for k, v in net.model.init_kwargs.items() if k not in ("img_resolution", "in_channels", "out_channels", "label_dim")}
    kwargs.update(model_type=type(net.model).__name__, **model_kwargs)
    if pfgmpp_D is not None:
        kwargs.update(pfgmpp=True, D=pfgmpp_D)
    return as_edm_record(net, module_src, init_kwargs=kwargs)


def write_pickle(path: Path, data, protocol: int | None = None) -> Path:
    with persistence_module():
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def write_torch(path: Path, data) -> Path:
    with persistence_module():
        torch.save(data, path)
    return path
