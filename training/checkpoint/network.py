"""Network snapshots in a format that loads without executing code, and import of EDM / PFGM++ / EDM2 files.

A snapshot is one `torch.save` file holding only tensors and plain data, loadable with
`torch.load(weights_only=True)`:

    {"format": "pfgmpp-network", "version": 1, "config": <JSON text>, "state_dict": {name: tensor}}

The JSON config names an allow-listed class and its keyword arguments for each component (the
preconditioner and the network inside it) and repeats D, sigma_data, the preconditioning kind,
resolution, channels, label_dim and the provenance for readers. `load_network` also reads EDM's
`network-snapshot-*.pkl` and `training-state-*.pt`, the PFGM++ reference's files and EDM2's network pickles
(`EDM2Precond`; its float16 weights are loaded into float32) through the allow-listed unpickler of
`training.checkpoint.legacy`, and the network of a training state of this program (training/checkpoint/state.py).

    pfgmpp-convert SRC DEST     # convert any supported file to a snapshot (training/cli/convert.py)
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dnnlib import util
from training import networks, preconditioners
from training.checkpoint import legacy
from training.checkpoint.formats import FORMAT, STATE_FORMAT, VERSION


def _to_json(value: Any) -> Any:
    """JSON-able copy: tuples to lists, non-finite floats to the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        return _to_json(value.item())
    raise ValueError(f"cannot store {type(value).__name__} {value!r} in a network config: use plain numbers, strings, lists")


def _from_json(value: Any) -> Any:
    if value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def network_config(net: torch.nn.Module, provenance: dict | None = None) -> dict:
    """The JSON-able description of a preconditioned network, enough to rebuild it."""
    precond_name, model = type(net).__name__, getattr(net, "model", None)
    known = [cls.__name__ for cls in preconditioners.PRECONDITIONERS.values()]
    if precond_name not in known or not hasattr(net, "init_kwargs"):
        raise ValueError(f"{precond_name} is not a preconditioner this format can save ({', '.join(known)})")
    model_name = type(model).__name__
    if model_name not in networks.NETWORKS or not hasattr(model, "init_kwargs"):
        raise ValueError(f"{model_name} is not a network this format can save ({', '.join(networks.NETWORKS)})")
    precond_kwargs = {k: v for k, v in net.init_kwargs.items() if k != "model"}
    return _to_json({
        "format": FORMAT,
        "version": VERSION,
        "precond": {"class_name": precond_name, "kwargs": precond_kwargs},
        "model": {"class_name": model_name, "kwargs": model.init_kwargs},
        "D": net.D,
        "sigma_data": net.sigma_data,
        "precond_kind": preconditioners.kind_of(type(net)),
        "resolution": net.img_resolution,
        "channels": net.img_channels,
        "label_dim": net.label_dim,
        "provenance": provenance or {},
    })


def network_from_config(config: dict) -> torch.nn.Module:
    """Construct the (untrained) network a config describes; only allow-listed classes."""
    config = _from_json(config)
    try:
        precond, model = config["precond"], config["model"]
        precond_cls, model_cls = precond["class_name"], model["class_name"]
    except (KeyError, TypeError):
        raise ValueError("the network config lacks its 'precond' or 'model' class description") from None
    precond_class = preconditioners.by_class_name(precond_cls)
    if model_cls not in networks.NETWORKS:
        raise ValueError(f"unknown network class {model_cls!r}; known: {', '.join(networks.NETWORKS)}")
    try:
        inner = networks.NETWORKS[model_cls](**model["kwargs"])
        return precond_class(inner, **precond["kwargs"])
    except TypeError as error:
        raise ValueError(f"the network config does not fit {model_cls} / {precond_cls}: {error}") from None


def load_weights(net: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Copy `state_dict` into `net`, every key and shape matching; a ValueError listing what does not fit."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
                for label, items in (("missing keys", missing), ("unexpected keys", extra), ("wrong shapes", wrong)) if items]
    if problems:
        raise ValueError(f"{source}: the weights do not fit the network it describes ({'; '.join(problems)})")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state_dict[name])


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """ValueError naming the tensors of `what` that hold NaN or inf (one host sync for them all): weights that are no
    model, never written as one."""
    floats = [(n, t) for n, t in tensors.items() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all().to(floats[0][1].device) for _, t in floats]).tolist() if floats else []
    names = [n for (n, _), ok in zip(floats, finite) if not ok]
    if names:
        raise ValueError(f"{what}: the weights are not finite (NaN or inf in {', '.join(names[:3])}"
                         f"{' and more' if len(names) > 3 else ''})")


def save_network(path, net: torch.nn.Module, provenance: dict | None = None) -> None:
    """Write a snapshot of `net` (config and weights) to `path` atomically; weights holding NaN or inf are refused.

    A `.safetensors` path gets the safetensors format (the tensors, with the configuration JSON in its metadata),
    any other path this program's `torch.save` format; `load_network` reads both.
    """
    config = network_config(net, provenance)
    state_dict = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    check_finite(state_dict, f"{path} was not written")
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import save  # noqa: PLC0415 (only this format needs it)

        data = save(state_dict, metadata={"format": FORMAT, "version": str(VERSION), "config": json.dumps(config)})
        with util.atomic_write(path) as f:
            f.write(data)
        return
    payload = {"format": FORMAT, "version": VERSION, "config": json.dumps(config), "state_dict": state_dict}
    with util.atomic_write(path) as f:
        torch.save(payload, f)


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with the length of their JSON header (8 bytes, little-endian), then the header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    """(config, state_dict) of a network saved by `save_network` as .safetensors."""
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as error:  # noqa: BLE001 (a damaged file; the format holds no code)
        raise ValueError(f"{path} is not a readable safetensors file ({str(error).splitlines()[0][:200]}); copy it again") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise ValueError(f"{path} holds tensors but not this program's network configuration in its metadata; "
                         "write it with pfgmpp-convert SRC DEST.safetensors")
    if metadata.get("version") != str(VERSION):
        raise ValueError(f"{path}: snapshot format version {metadata.get('version')}; this program reads {VERSION}")
    return json.loads(metadata["config"]), state_dict


def _read_native(path: Path, entry: str | None):
    """(config, state_dict) of a snapshot (.pt or .safetensors) or training state of this program, or None."""
    if _is_safetensors(path):
        return _read_safetensors(path)
    if not zipfile.is_zipfile(path):
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, zipfile.BadZipFile):
        return None  # not ours: EDM / PFGM++ pickles fail weights_only
    if not isinstance(payload, dict):
        return None
    if payload.get("format") == FORMAT:
        if payload.get("version") != VERSION:
            raise ValueError(f"{path}: snapshot format version {payload.get('version')}; this program reads {VERSION}")
        return json.loads(payload["config"]), payload["state_dict"]
    if payload.get("format") == STATE_FORMAT:  # a training state: its EMA network (or `entry`)
        if "network" not in payload:
            raise ValueError(f"{path} is a training state written before states described their network; use the "
                             "network-snapshot-NNNNNN.pt of the same run")
        entry = entry or "ema"
        if entry not in ("ema", "net"):
            raise ValueError(f"a training state holds the networks 'ema' and 'net', not {entry!r}")
        return json.loads(payload["network"]), payload[entry]
    return None


_OTHER_KINDS = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
                b"\x93NUMPY": "a numpy array (.npy)", b"{": "a JSON file"}


def _known_other_kind(path: Path) -> str | None:
    """What a file that is not a checkpoint is, from its first bytes (images, numpy, JSON), or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    return next((kind for magic, kind in _OTHER_KINDS.items() if head.startswith(magic)), None)


def read_checkpoint(path_or_url, entry: str | None = None) -> tuple[dict, dict]:
    """(config, state_dict) from a snapshot or training state of ours, or an EDM / PFGM++ / EDM2 checkpoint, by content.

    `entry` picks the network of a training state: 'ema' (default when present) or 'net'. A damaged or
    unknown file is a ValueError that says so; nothing in a file is executed.
    """
    path = util.local_path(path_or_url)
    native = _read_native(path, entry)
    if native is not None:
        return native
    kind = _known_other_kind(path)
    if kind is not None:
        raise ValueError(f"{path} is {kind}, not a network checkpoint: give a snapshot (.pt or .safetensors) or an "
                         "EDM / PFGM++ / EDM2 .pkl")
    try:
        data = legacy.safe_load(path)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 (truncated or foreign bytes fail in many ways; nothing ran)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable network checkpoint ({reason}); if it was cut short, copy or "
                         "download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a network checkpoint (a {type(data).__name__}, not a dict)")
    if entry is None:
        entry = "ema" if data.get("ema") is not None else "net"
    if data.get(entry) is None:
        found = ", ".join(k for k, v in data.items() if isinstance(v, legacy.PersistentRecord)) or "none"
        raise ValueError(f"{path}: has no network under {entry!r} (networks found: {found})")
    precond, model, state_dict = legacy.network_parts(data[entry])
    channels = model["kwargs"].get("in_channels")
    if channels is not None:
        model["kwargs"]["out_channels"] = preconditioners.by_class_name(precond["class_name"]).out_channels(channels)
    provenance = {"imported_from": path.name, "entry": entry}
    if isinstance(data.get("dataset_kwargs"), dict):
        provenance["dataset_kwargs"] = _to_json_lenient(data["dataset_kwargs"])
    encoder = data.get("encoder")
    if isinstance(encoder, legacy.PersistentRecord):  # EDM2's: pixels, or a VAE's latents (vae_name, scale, bias)
        state = {k: v.tolist() if hasattr(v, "tolist") else v  # numpy arrays as lists
                 for k, v in encoder.state.items() if not k.startswith("_")}
        provenance["encoder"] = {"class_name": encoder.class_name, **_to_json_lenient(state)}
    config = {"format": FORMAT, "version": VERSION, "precond": precond, "model": model, "provenance": provenance}
    return _to_json(config), state_dict


def _to_json_lenient(value: dict) -> dict:
    """Provenance: keep what is JSON-able, describe the rest as text."""
    out = {}
    for k, v in value.items():
        try:
            out[str(k)] = _to_json(v)
        except ValueError:
            out[str(k)] = repr(v)
    return out


def recorded_images(path) -> int | None:
    """The images a snapshot of this program was trained on, from its provenance (read without its tensors), or None
    (another program's file, or a snapshot that records no training time)."""
    kimg = recorded_provenance(path).get("kimg")
    return None if not isinstance(kimg, (int, float)) else round(kimg * 1000)


def recorded_provenance(path) -> dict:
    """The provenance a snapshot of this program records (its run directory, kimg, ...), read without its tensors;
    {} for another program's file or a damaged one."""
    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors import safe_open  # noqa: PLC0415

            with safe_open(str(path), framework="pt") as f:
                config = json.loads((f.metadata() or {}).get("config", "{}"))
        elif zipfile.is_zipfile(path):
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
            config = json.loads(payload["config"]) if isinstance(payload, dict) and payload.get("format") == FORMAT else {}
        else:
            return {}
    except Exception:  # noqa: BLE001 (not ours, or damaged: the name's kimg is what there is)
        return {}
    provenance = config.get("provenance", {})
    return provenance if isinstance(provenance, dict) else {}


def load_network(path_or_url, device="cpu", entry: str | None = None) -> torch.nn.Module:
    """Rebuild and load a network from any supported file or URL (eval mode, no gradients)."""
    config, state_dict = read_checkpoint(path_or_url, entry)
    net = network_from_config(config)
    load_weights(net, state_dict, str(path_or_url))
    net.provenance = config.get("provenance", {})
    return net.eval().requires_grad_(False).to(device)
