"""The names and versions of this program's two file formats: network snapshots (network.py) and training states
(state.py), each reader checking both to tell a user who passed one where the other was wanted; and how a run
names what it writes at a tick (`kimg_label`).

A run's outputs are named by the images seen, in kimg as EDM names them: `network-snapshot-000123.pt`,
`training-state-000123.pt`, `samples-000123.png` for 123,000 <= images < 124,000. Outputs less than 1 kimg apart
(--tick and --snap below 1 kimg) would share that name: each but the first of a kimg carries the images beyond it,
`000123.456` (123,456 images seen), so that no output ever replaces another.
"""

from __future__ import annotations

import re

FORMAT, VERSION = "pfgmpp-network", 1
STATE_FORMAT, STATE_VERSION = "pfgmpp-training-state", 2
KIMG_PATTERN = r"(?P<kimg>\d+)(?:\.(?P<rest>\d{3}))?"  # a `kimg_label` inside a file name's pattern


_REFUSED_GLOBAL = re.compile(r"unsupported GLOBAL ([\w.]+)|Unsupported global: GLOBAL ([\w.]+)")


def load_failure(error: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in one phrase: the global it asks for when it asks for one
    (a pickle that would run code), else the error's first line, never torch's advice to load unsafely."""
    text = str(error)
    found = _REFUSED_GLOBAL.search(text)
    if found:
        name = found.group(1) or found.group(2)
        return f"it asks for the global {name}, which a weights-only load refuses; nothing in it was executed"
    first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    return first


def kimg_label(nimg: int, previous: int | None = None) -> str:
    """'000123' for `nimg` images seen; '000123.456' when the run's previous outputs, at `previous` images, had the
    same kimg (module docstring)."""
    kimg = int(nimg) // 1000
    if previous is not None and int(previous) // 1000 == kimg and int(previous) != int(nimg):
        return f"{kimg:06d}.{int(nimg) % 1000:03d}"
    return f"{kimg:06d}"


def label_images(kimg: str, rest: str | None) -> tuple[int, int | None]:
    """(kimg, the exact images seen or None) of the two groups of `KIMG_PATTERN`."""
    return int(kimg), None if rest is None else int(kimg) * 1000 + int(rest)
