"""EasyDict and small parsing helpers."""

from __future__ import annotations

import re
from typing import Any


class EasyDict(dict):
    """A dict whose items are also attributes: `d.lr` is `d['lr']`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_int_list(text: str | list[int]) -> list[int]:
    """Parse '0-3,7,10-11' into [0, 1, 2, 3, 7, 10, 11]; a list passes through."""
    if isinstance(text, list):
        return list(text)
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = _RANGE.match(part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ValueError(f"range {part!r} ends before it starts; write it as {hi}-{lo}")
            values.extend(range(lo, hi + 1))
        elif part.isdigit():
            values.append(int(part))
        else:
            raise ValueError(f"cannot read {part!r} in {text!r}: use non-negative integers and ranges such as 0-63,100")
    return values
