"""The PFGM++ paper's robustness study (Xu et al. 2023, Sec. 5.3 and Fig. 5): a metric of several networks (one per
D) against injected sampling noise alpha, the number of sampling steps and post-training weight quantisation
(`fid.py robustness`; the reference forks generate.py into generate_alpha.py, generate_steps.py, generate_quant.py).

    study = robustness.Study(alphas=[0, 0.1, 0.2], steps=[6, 9, 18], bits=[5, 6, 8])
    records = robustness.Records.load("robustness.json")
    for network in networks:
        for cell in study.cells(base_settings):
            if records.find(identity, cell, key, names) is None:
                records.add(robustness.record(network, identity, D, cell, key, evaluation.score(...)))  # written at once
    robustness.write_table("robustness.md", "fid", records.table(...)); robustness.plot("robustness.png", ...)

Each axis is varied alone, the others at the base settings (alpha 0 or the sampler's --perturb_alpha, the
sampler's --steps, full precision or --quantize_bits), as in the paper's figures. A cell's record is written to
the JSON file as soon as it is known, keyed by the network file's content (SHA-256, not its path: a replaced file
is evaluated again), the cell and every setting; a killed study reruns only what is missing.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from dnnlib import util
from training.pfgmpp import format_D
from training.records import RecordsFile
from training.samplers import SamplerSettings

FORMAT, VERSION = "pfgmpp-robustness", 1
AXES = {"alpha": "perturb_alpha", "steps": "num_steps", "bits": "quantize_bits"}  # axis -> the option it varies
AXIS_LABELS = {"alpha": "injected noise α", "steps": "NFE", "bits": "weight bits"}


@dataclass(frozen=True)
class Cell:
    """One evaluation of a network: `axis` set to `value`, everything else at the base settings."""

    axis: str
    value: float
    sampler: SamplerSettings
    quantize_bits: int | None


@dataclass(frozen=True)
class Study:
    """The values of each axis (an empty axis is not studied)."""

    alphas: Sequence[float] = ()
    steps: Sequence[int] = ()
    bits: Sequence[int] = ()

    def __post_init__(self):
        if any(not (a >= 0 and math.isfinite(a)) for a in self.alphas):
            raise ValueError(f"the alphas must be finite numbers >= 0, got {list(self.alphas)}")
        if any(int(s) != s or s < 1 for s in self.steps):
            raise ValueError(f"the step counts must be integers >= 1, got {list(self.steps)}")
        if any(int(b) != b or not 1 <= b <= 32 for b in self.bits):
            raise ValueError(f"the bit widths must be integers from 1 to 32, got {list(self.bits)}")
        if not (self.alphas or self.steps or self.bits):
            raise ValueError("give at least one axis: alphas, steps or bits")

    def cells(self, base: SamplerSettings, base_bits: int | None = None) -> list[Cell]:
        """Every cell: each axis's values with the others at `base` / `base_bits`."""
        cells = []
        for axis, values in (("alpha", self.alphas), ("steps", self.steps), ("bits", self.bits)):
            for value in values:
                if axis == "bits":
                    cells.append(Cell(axis, int(value), base, int(value)))
                else:
                    option = {AXES[axis]: float(value) if axis == "alpha" else int(value)}
                    cells.append(Cell(axis, value, replace(base, options={**base.options, **option}), base_bits))
        return cells


def cell_key(cell: Cell, settings: dict) -> dict:
    """The settings a record must share to be reused: `settings` (reference, detector, guidance, ...) and the cell's
    sampler and quantisation, as JSON reads them."""
    value = {**settings, "sampler": {"solver": cell.sampler.solver, **cell.sampler.options},
             "quantize_bits": cell.quantize_bits}
    return json.loads(json.dumps(value))


def record(path: str, identity: str, D: float, cell: Cell, key: dict, names: Sequence[str], results: dict,
           nfe: float, seconds: float) -> dict:
    """The record of one cell's evaluation."""
    return {"network": path, "identity": identity, "D": format_D(D), "axis": cell.axis, "value": cell.value,
            "settings": key, "metrics": list(names), "results": results, "nfe_per_batch": nfe,
            "seconds": round(seconds, 3),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class Records(RecordsFile):
    """The records of a study's JSON file (training/records.py)."""

    format, version, what = FORMAT, VERSION, "a robustness study's file"
    required = frozenset({"identity", "axis", "value", "settings", "metrics", "results"})
    identity = ("identity", "axis", "value", "settings")

    def find(self, identity: str, cell: Cell, key: dict, names: Sequence[str]) -> dict | None:
        """The record of this network (by content), cell and settings holding the metrics `names`, or None."""
        return self.match(dict(identity=identity, axis=cell.axis, value=cell.value, settings=key), names)


# ------------------------------------------------------------------------------------------------
# Tables and plots: `values[label][axis][value] = metric`, one label per network.

def curves(records: Sequence[dict], metric: str) -> dict:
    """{network label: {axis: {value (NFE on the steps axis): metric}}} of the records, labelled 'D = ... (file)'."""
    out: dict = {}
    for r in records:
        if metric not in r["results"]:
            continue
        label = f"D = {r['D']} ({Path(r['network']).name})"
        value = round(r["nfe_per_batch"]) if r["axis"] == "steps" else r["value"]
        out.setdefault(label, {}).setdefault(r["axis"], {})[value] = r["results"][metric]
    return out


def _column(axis: str, value) -> str:
    return {"alpha": f"α = {value:g}", "steps": f"NFE {value:g}", "bits": f"{value:g} bits"}[axis]


def markdown_table(metric: str, values: dict, digits: int = 2) -> str:
    """A Markdown table: one row per network, one column per (axis, value), as the paper's figures read."""
    columns = sorted({(axis, v) for axes in values.values() for axis, vs in axes.items() for v in vs},
                     key=lambda c: (list(AXES).index(c[0]), c[1] if c[0] != "bits" else -c[1]))
    lines = ["| network | " + " | ".join(_column(*c) for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label, axes in values.items():
        cells = [axes.get(axis, {}).get(v) for axis, v in columns]
        lines.append(f"| {label} | " + " | ".join("—" if c is None else f"{c:.{digits}f}" for c in cells) + " |")
    return f"{metric} (lower is better)\n\n" + "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` atomically."""
    with util.atomic_write(Path(path), "w") as f:
        f.write(text)


def plot(path: str | os.PathLike, metric: str, values: dict, title: str | None = None) -> None:
    """One panel per axis (metric against alpha / NFE / bits), one line per network, as the paper's Fig. 5;
    written atomically as a PNG. Needs matplotlib."""
    from matplotlib.figure import Figure  # an optional extra

    axes_present = [a for a in AXES if any(a in v for v in values.values())]
    figure = Figure(figsize=(4.2 * len(axes_present), 3.4), layout="constrained")
    panels = figure.subplots(1, len(axes_present), squeeze=False)[0]
    for panel, axis in zip(panels, axes_present):
        for label, axes in values.items():
            if axis in axes:
                points = sorted(axes[axis].items())
                panel.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        panel.set_xlabel(AXIS_LABELS[axis])
        panel.set_ylabel(metric)
        if axis == "bits":
            panel.invert_xaxis()  # fewer bits, more error: to the right, as alpha grows and NFE shrinks
        if axis == "steps":
            panel.invert_xaxis()
        panel.grid(alpha=0.3)
    panels[0].legend(fontsize=7)
    if title:
        figure.suptitle(title, fontsize=9)
    with util.atomic_write(Path(path), "wb") as f:
        figure.savefig(f, format="png", dpi=110)
