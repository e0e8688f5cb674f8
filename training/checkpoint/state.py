"""The training-state format: everything an exact resume needs, in one file that loads without executing code.

    {"format": "pfgmpp-training-state", "version": 2, "config": <the run's configuration as JSON text>,
     "network": <the configuration of the network readers get, as a snapshot has it>, "step": int, "nimg": int,
     "net": state_dict, "ema": state_dict, "optimizer": Adam's state_dict[, "phema": {"sigma_rel": [...],
     "ema": [state_dict, ...]}]}

`nimg` is also when the run last wrote its outputs (the state among them), which names its next ones
(`formats.kimg_label`).

`ema` is the network a reader of the state gets (`training.checkpoint.load_network` reads a state like a
snapshot): the classic EMA, else the tracked power-function EMA of the largest sigma_rel. Version 2 holds the
configuration keyed by train.py's option names; states of version 1 are refused with what to do instead.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from dnnlib.util import atomic_write
from training.checkpoint.formats import FORMAT, KIMG_PATTERN, STATE_FORMAT, STATE_VERSION, label_images, load_failure
from training.checkpoint.network import check_finite, network_config

STATE_PATTERN = re.compile(rf"^training-state-{KIMG_PATTERN}\.pt$")


def state_name(label: str) -> str:
    """'training-state-000123.pt': the training state of a `formats.kimg_label`."""
    return f"training-state-{label}.pt"


def _cpu(state_dict: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def write_state(path, *, net, ema, optimizer, step: int, nimg: int, config: dict, phema: dict | None = None) -> None:
    """Write a training state atomically: the network `net` and its average `ema` (modules), the optimizer, the
    position and the configuration; `phema`: the power-function EMAs' `state_dict()`. Weights holding NaN or inf are
    refused (`check_finite`)."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": json.dumps(config),
        "network": json.dumps(network_config(ema)),  # the EMA network, readable like a snapshot
        "step": int(step),
        "nimg": int(nimg),
        "net": _cpu(net.state_dict()),
        "ema": _cpu(ema.state_dict()),
        "optimizer": optimizer.state_dict(),
    }
    if phema is not None:
        state["phema"] = {"sigma_rel": phema["sigma_rel"], "ema": [_cpu(sd) for sd in phema["ema"]]}
    for key, tensors in (("net", state["net"]), ("ema", state["ema"]), *((f"phema {i}", sd) for i, sd in
                                                                         enumerate(state.get("phema", {}).get("ema", [])))):
        check_finite(tensors, f"{path} was not written ({key})")
    with atomic_write(path) as f:
        torch.save(state, f)


def read_state(path) -> dict:
    """Load a training state with weights_only=True and check its format; a ValueError that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no training state at {path}; give a training-state-NNNNNN.pt of this program, or --resume=auto")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (truncated, random bytes, a pickle that asks for code: nothing ran)
        raise ValueError(f"{path} is not a readable training state ({load_failure(error)}); if it was cut short, resume from an "
                         "earlier training-state-*.pt or with --resume=auto; to start from the weights of an EDM / "
                         "PFGM++ checkpoint use --transfer") from None
    if isinstance(state, dict) and state.get("format") == FORMAT:
        raise ValueError(f"{path} is a network snapshot, not a training state (it holds no optimizer state): "
                         f"start a new run from its weights with --transfer={path}")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state of this program; give a training-state-NNNNNN.pt it wrote, "
                         "or start a new run from a network's weights with --transfer")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')}; this program reads {STATE_VERSION} "
                         f"(its configuration is keyed differently): start a new run from its weights with "
                         f"--transfer={path}")
    return state


def find_resume_state(run_dir) -> Path | None:
    """The newest training state in `run_dir` that loads; unreadable ones are skipped with a warning."""
    found = []
    for path in Path(run_dir).glob("training-state-*.pt"):
        if (m := STATE_PATTERN.match(path.name)) is not None:
            kimg, nimg = label_images(m["kimg"], m["rest"])
            found.append(((kimg, -1 if nimg is None else nimg), path))  # the first of a kimg, then those beyond it
    for _, path in sorted(found, reverse=True):
        try:
            read_state(path)
            return path
        except Exception as error:  # noqa: BLE001 (any damage: truncation, wrong format)
            warnings.warn(f"skipping {path.name}: it does not load ({error})", stacklevel=2)
    return None
