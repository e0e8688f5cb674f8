"""Read EDM, PFGM++ and EDM2 reference checkpoints without executing anything they contain.

Their networks are "persistent classes": each pickles as a call to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, where `meta` carries the source code of
the defining module, which a plain `pickle.load` executes. Here an allow-listed unpickler maps that
call to a `PersistentRecord` holding the class name and the object's `__dict__` as data (the source is
kept as text and never run), and maps plain torch modules (ModuleDict, ...) to `ModuleRecord`s. Any
other global is refused with an error naming it. Both `.pkl` pickles and `.pt` torch zip archives are read.
`network_parts` maps a recorded wrapper to this project's classes (`WRAPPERS`): EDM's preconditioners (with
PFGM++'s `pfgmpp` and `D`) to ours of the same name, EDM2's `Precond` (float16 weights in its snapshots; they are
converted on loading) to `EDM2Precond` with an `EDM2UNet`.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class UnsafeCheckpointError(ValueError):
    """The file asks for something outside the allow-list; it was not loaded."""


@dataclass
class PersistentRecord:
    """An EDM persistent object as data: class name, source text (never executed) and state."""

    class_name: str
    module_src: str = field(repr=False)
    state: dict


class ModuleRecord:
    """A plain torch.nn module (ModuleDict, ...) as data: its qualified name and `__dict__`."""

    qualname = "torch.nn.Module"

    def __setstate__(self, state: dict) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"ModuleRecord({self.qualname})"


def _persistent(meta: dict) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UnsafeCheckpointError("a persistent object has an unexpected form; only EDM's class records are read")
    return PersistentRecord(str(meta.get("class_name")), str(meta.get("module_src", "")), meta["state"])


def _numeric(dtype, what: str) -> np.dtype:
    """`dtype` if it is numeric (an object dtype's data would be read as raw pointers), else UnsafeCheckpointError."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind not in "biufcSUV?":
        raise UnsafeCheckpointError(f"refusing a numpy {what} of dtype {dtype}")
    return dtype


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None):
    """numpy's pickled scalar, for numeric dtypes only."""
    dtype = _numeric(dtype, "scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


class _NumericArray(np.ndarray):
    """A numpy array as a pickle rebuilds it (protocols <= 4: empty, then its state), numeric dtypes only."""

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)):
            raise UnsafeCheckpointError("a numpy array has an unexpected pickled form")
        _numeric(state[2], "array")
        super().__setstate__(state)


_NDARRAY = object()  # what the global numpy.ndarray names: a marker for `_numpy_array`, not a constructor


def _numpy_array(subtype, shape, dtype) -> np.ndarray:
    """numpy's `_reconstruct` (its shape and dtype are placeholders; the pickled state sets them, checked)."""
    if subtype is not _NDARRAY:
        raise UnsafeCheckpointError("refusing a numpy array of a class other than numpy.ndarray")
    return _NumericArray(shape=(0,), dtype=np.uint8)


def _numpy_frombuffer(buffer, dtype, shape, order: str = "C") -> np.ndarray:
    """numpy's pickled array under protocol 5 (its bytes in band), numeric dtypes only."""
    if order not in ("C", "F"):
        raise UnsafeCheckpointError(f"refusing a numpy array of order {order!r}")
    return np.frombuffer(buffer, dtype=_numeric(dtype, "array")).reshape(shape, order=order).copy()


def _codecs_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError("refusing _codecs.encode with unexpected arguments")
    return text.encode(encoding)


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, requires_grad, hooks, state: data,
    ("torch.storage", "_load_from_bytes"): lambda b: torch.load(io.BytesIO(b), weights_only=True),
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "ndarray"): _NDARRAY,  # numpy arrays: in EDM2's snapshots, the latent encoder's scale and bias
    ("numpy.core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_array,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only allow-listed globals and reads storages from a torch zip."""

    allowed: dict[tuple[str, str], Any] = _ALLOWED  # a subclass may admit more (training/metrics/detector.py)

    def __init__(self, file, archive: zipfile.ZipFile | None = None, prefix: str = ""):
        super().__init__(file)
        self._archive, self._prefix, self._storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        # Python 2 spellings (torch.save writes protocol 2), mapped as pickle's own find_class does.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and name.isidentifier():
            return type(name, (ModuleRecord,), {"qualname": f"{module}.{name}"})
        raise UnsafeCheckpointError(
            f"the checkpoint refers to the global {module}.{name}, which is not on the allow-list of data "
            "types; it was not loaded (nothing in it was executed)"
        )

    def persistent_load(self, pid):
        if self._archive is None or not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafeCheckpointError(f"unexpected storage type {storage_type!r}")
        if key not in self._storages:
            data = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            untyped = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
            self._storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)
        return self._storages[key]


def safe_load(path) -> Any:
    """Unpickle a `.pkl` or torch `.pt` file with the allow-list; never executes its contents."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK"):
            with zipfile.ZipFile(f) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if len(names) != 1:
                    raise ValueError(f"{path}: a zip file but not a torch checkpoint (no single data.pkl)")
                prefix = names[0][: -len("data.pkl")]
                if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
                    raise ValueError(f"{path}: big-endian checkpoints are not supported")
                return _unpickle(SafeUnpickler(io.BytesIO(archive.read(names[0])), archive, prefix), path)
        return _unpickle(SafeUnpickler(f), path)


def _unpickle(unpickler: SafeUnpickler, path):
    """Run the unpickler; bytes that are not a pickle (cut short, random, another format) fail in many ways, all
    of them a ValueError that says so (nothing in the file ran); a refused global stays an UnsafeCheckpointError."""
    try:
        return unpickler.load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 (UnpicklingError, EOFError, UnicodeDecodeError, KeyError, ...)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({reason}); if it was cut short, copy or download "
                         "it again") from None


def module_state_dict(record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state_dict of a recorded module tree: parameters, persistent buffers, submodules."""
    state = record.state
    skip = state.get("_non_persistent_buffers_set") or set()
    out: dict[str, torch.Tensor] = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(module_state_dict(child, f"{prefix}{name}."))
    return out


@dataclass(frozen=True)
class Wrapper:
    """How a foreign network wrapper (preconditioner) maps to this project's classes."""

    precond: str  # this project's preconditioner class
    keys: tuple[str, ...]  # its constructor arguments besides `COMMON_KEYS`; the rest go to the network
    model: str  # the network class when the record names none (EDM's `model_type`)
    prefix: str = "model."  # where the wrapper holds its network in the state_dict
    defaults: dict = field(default_factory=dict)  # the foreign constructor's defaults that differ from ours


# The wrappers read, by the class name their records carry.
WRAPPERS = {
    "EDMPrecond": Wrapper("EDMPrecond", ("sigma_min", "sigma_max", "sigma_data"), "DhariwalUNet"),
    "VPPrecond": Wrapper("VPPrecond", ("beta_d", "beta_min", "M", "epsilon_t"), "SongUNet"),
    "VEPrecond": Wrapper("VEPrecond", ("sigma_min", "sigma_max"), "SongUNet"),
    "iDDPMPrecond": Wrapper("iDDPMPrecond", ("C_1", "C_2", "M"), "DhariwalUNet"),
    # EDM2 (NVlabs/edm2, training/networks_edm2.py): `Precond(img_resolution, img_channels, label_dim, use_fp16=True,
    # sigma_data=0.5, logvar_channels=128, **unet_kwargs)` holding its `UNet` as `unet`; a diffusion model (D = inf).
    "Precond": Wrapper("EDM2Precond", ("sigma_data", "logvar_channels"), "EDM2UNet", prefix="unet.",
                       defaults={"use_fp16": True}),
}
COMMON_KEYS = ("img_resolution", "img_channels", "label_dim", "use_fp16")


def network_parts(record: PersistentRecord) -> tuple[dict, dict, dict]:
    """(precond config, model config, state_dict) of a recorded EDM / PFGM++ / EDM2 network wrapper.

    The model's out_channels is the preconditioner's to declare (`training.checkpoint` fills it in).
    """
    wrapper = WRAPPERS.get(record.class_name) if isinstance(record, PersistentRecord) else None
    if wrapper is None:
        found = record.class_name if isinstance(record, PersistentRecord) else type(record).__name__
        raise ValueError(f"expected a network wrapper ({', '.join(WRAPPERS)}), found {found}")
    if wrapper.prefix[:-1] not in (record.state.get("_modules") or {}):
        raise ValueError(f"{record.class_name} holds no network under {wrapper.prefix[:-1]!r}: not the "
                         f"{wrapper.precond} this program reads")
    if record.state.get("_init_args"):
        raise ValueError(f"{record.class_name} was built with positional arguments; only keyword arguments are read")
    kwargs = {**wrapper.defaults, **(record.state.get("_init_kwargs") or {})}
    model_type = kwargs.pop("model_type", wrapper.model)
    pfgmpp, D = kwargs.pop("pfgmpp", False), kwargs.pop("D", None)
    precond_kwargs = {k: kwargs.pop(k) for k in COMMON_KEYS + wrapper.keys if k in kwargs}
    if pfgmpp and D is None:
        raise ValueError(f"{record.class_name} is marked pfgmpp but records no D")
    precond_kwargs["D"] = float(D) if pfgmpp else math.inf
    channels = precond_kwargs.get("img_channels")
    model_kwargs = {
        "img_resolution": precond_kwargs.get("img_resolution"),
        "in_channels": channels,
        "label_dim": precond_kwargs.get("label_dim", 0),
        **kwargs,
    }
    state_dict = {("model." + k[len(wrapper.prefix):] if k.startswith(wrapper.prefix) else k): v
                  for k, v in module_state_dict(record).items()}
    return (
        {"class_name": wrapper.precond, "kwargs": precond_kwargs},
        {"class_name": str(model_type), "kwargs": model_kwargs},
        state_dict,
    )
