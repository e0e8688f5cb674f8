"""Records files: the JSON files in which `fid.py sweep` (training/sweep.py) and `fid.py robustness`
(training/robustness.py) keep each evaluation as soon as it is known, so that a killed run loses at most the
evaluation in progress and a rerun computes only what is missing:

    {"format": FORMAT, "version": VERSION, "records": [{...}, ...], <the kind's other fields, e.g. "best">}

A kind is a subclass naming its format, the fields every record must hold (`required`) and those that identify
one evaluation (`identity`); a record is reused only when every identifying field is equal (the network file's
content hash among them) and it holds the metrics asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

from dnnlib import util


class RecordsFile:
    """The records of one file; each `add` rewrites it atomically."""

    format: ClassVar[str]
    version: ClassVar[int] = 1
    what: ClassVar[str]  # how messages name such a file: "a fid.py sweep file"
    required: ClassVar[frozenset[str]]  # what reading a record needs
    identity: ClassVar[tuple[str, ...]]  # what makes two records the same evaluation

    def __init__(self, path: str | os.PathLike, records: list[dict] | None = None, **fields):
        self.path, self.records, self.fields = Path(path), list(records or []), dict(fields)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """The records in `path` (none when it does not exist); ValueError for a file that is not of this kind."""
        path = Path(path)
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not {cls.what} ({error}); choose another name") from None
        if not isinstance(data, dict) or data.get("format") != cls.format or not isinstance(data.get("records"), list):
            raise ValueError(f"{path} is not {cls.what}; choose another name (records are added to their own file only)")
        if data.get("version") != cls.version:
            raise ValueError(f"{path}: {cls.what} of version {data.get('version')}; this program reads {cls.version}")
        if not all(isinstance(r, dict) and cls.required <= r.keys() for r in data["records"]):
            raise ValueError(f"{path}: a record lacks one of {', '.join(sorted(cls.required))}; was it edited by hand? "
                             "Remove that record (it is evaluated again) or choose another file")
        fields = {k: v for k, v in data.items() if k not in ("format", "version", "records")}
        return cls(path, data["records"], **fields)

    def match(self, identity: Mapping, names: Sequence[str]) -> dict | None:
        """The record of the evaluation `identity` (a value per `self.identity` field) holding the metrics `names`."""
        for r in self.records:
            if all(r.get(k) == identity[k] for k in self.identity) and set(names) <= set(r["metrics"]):
                return r
        return None

    def add(self, new: dict) -> None:
        """Add a record (replacing those of the same evaluation with fewer metrics) and write the file."""

        def covered(r: dict) -> bool:
            return all(r.get(k) == new[k] for k in self.identity) and set(r["metrics"]) <= set(new["metrics"])

        self.records = [r for r in self.records if not covered(r)] + [new]
        self.save()

    def save(self, **fields) -> None:
        """Write the file atomically, with `fields` set beside the records (the others as they were)."""
        self.fields.update(fields)
        with util.atomic_write(self.path, "w") as f:
            json.dump({"format": self.format, "version": self.version, "records": self.records, **self.fields}, f,
                      indent=1)
