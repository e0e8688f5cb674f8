"""Sweeps: the metrics of many networks over several seed ranges, resumable, with the best marked (`fid.py sweep`).

    networks = sweep.find_networks(["training-runs/00000-cifar10", "phema/*.pt"])
    ranges = sweep.parse_seed_ranges("0-49999,50000-99999,100000-149999")
    key = sweep.settings(ref, detector_source, sampler_settings)
    records = sweep.Records.load("sweep.json")
    records.find(network, seeds, key, names)           # None: not evaluated yet with these settings
    records.add(sweep.record(network, seeds, names, key, evaluation.score(...)))   # written at once
    rows = sweep.table_rows(records, networks, ranges, key, names, "fid")
    print(sweep.format_table("fid", rows, ranges, sweep.best(rows, "fid")))

EDM's users score a model on several seed ranges and report the best or the spread; EDM2 (Karras et al., CVPR
2024, figure 5) chooses the EMA length after training by plotting FID against sigma_rel and training time. A
sweep evaluates each network for each seed range, one evaluation at a time, and writes its record to the JSON
file as soon as it is known, so a killed sweep loses at most the evaluation in progress and a rerun computes only
what is missing. A record is reused only for the same network file contents (SHA-256: a snapshot replaced under
the same name, as `reconstruct_phema.py --overwrite` does, is evaluated again), the same settings (reference path
and contents, detector, sampler, guidance, precision, class) and when it holds the metrics asked for; records of
other settings stay in the file, unused.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnnlib import util
from training import evaluation, generation, metrics, phema
from training.checkpoint.formats import KIMG_PATTERN
from training.generation import quantize
from training.records import RecordsFile
from training.samplers import SamplerSettings

FORMAT, VERSION = "pfgmpp-fid-sweep", 1
CLASSIC_NAME = re.compile(rf"network-snapshot-{KIMG_PATTERN}\.(?:pt|pkl|safetensors)")  # classic EMA (and EDM's pickles)
SEED_RANGE = re.compile(r"\d+-\d+")
PLOT_HINT = "pip install matplotlib (or pip install -e '.[plot]')"


# ------------------------------------------------------------------------------------------------
# What to evaluate.

@dataclass(frozen=True)
class Snapshot:
    """A network snapshot of a sweep: its path (absolute) or URL, and the training time and EMA profile its name tells."""

    path: str
    kimg: int | None = None
    sigma_rel: float | None = None  # None: the classic EMA, or a name without a profile

    @property
    def name(self) -> str:
        """The file name."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def snapshot_of(path: str) -> Snapshot:
    """The Snapshot of a path: kimg and sigma_rel from `network-snapshot-NNNNNN[-S.SSS].pt`, `PREFIX-NNNNNN-S.SSS.pt`
    and EDM2's `network-snapshot-NNNNNNN-S.SSS.pkl` (kimg also from `NNNNNN.III`, outputs under 1 kimg apart)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    parsed = phema.parse_snapshot_name(name)
    if parsed is not None:
        return Snapshot(path, parsed[1], parsed[2])
    match = CLASSIC_NAME.fullmatch(name)
    return Snapshot(path, None if match is None else int(match["kimg"]))


def _order(network: Snapshot) -> tuple:
    """By training time (unnamed ones last), the classic EMA before the power-function profiles, then sigma_rel."""
    return (network.kimg is None, network.kimg or 0, network.sigma_rel is not None, network.sigma_rel or 0.0, network.path)


def _snapshots_in(folder: Path) -> list[Path]:
    """The network snapshots of a run directory or of a reconstruction's output folder."""
    return [p for p in folder.iterdir() if p.is_file() and snapshot_of(p.name).kimg is not None]


def _expand(spec: str) -> list[str]:
    """The networks one --networks entry names: a URL, a glob, a folder's snapshots, or a file."""
    if util.is_url(spec):
        return [spec]
    if any(c in spec for c in "*?["):
        found = [p for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file()]
        if not found:
            raise ValueError(f"{spec!r} matches no file")
        return [os.path.abspath(p) for p in found]
    path = Path(spec).expanduser()
    if path.is_dir():
        found = _snapshots_in(path)
        if not found:
            raise ValueError(f"{spec} holds no network snapshots (network-snapshot-NNNNNN.pt, network-snapshot-NNNNNN-S.SSS.pt, "
                             f"phema-NNNNNN-S.SSS.pt); name the files, or a glob such as '{path / '*.pt'}'")
        return [os.path.abspath(p) for p in found]
    if not path.is_file():
        raise ValueError(f"{spec}: no such file or folder")
    return [os.path.abspath(path)]


def find_networks(specs: Sequence[str]) -> list[Snapshot]:
    """The networks that comma-separated run directories, globs, files and URLs name, each once, by kimg then sigma_rel."""
    found: dict[str, Snapshot] = {}
    for text in specs:
        for spec in (s.strip() for s in text.split(",")):
            if spec:
                for path in _expand(spec):
                    found.setdefault(path, snapshot_of(path))
    if not found:
        raise ValueError("no network given; name run directories, globs, files or URLs")
    return sorted(found.values(), key=_order)


def labels(networks: Sequence[Snapshot]) -> list[str]:
    """Names for a table: the file names, or the paths (relative where local) when two file names are the same."""
    names = [n.name for n in networks]
    if len(set(names)) == len(names):
        return names
    return [n.path if util.is_url(n.path) else os.path.relpath(n.path) for n in networks]


def parse_seed_ranges(texts: str | Sequence[str]) -> list[range]:
    """'0-49999,50000-99999' (or several such texts) -> [range(0, 50000), range(50000, 100000)]: disjoint ranges."""
    ranges = []
    for text in [texts] if isinstance(texts, str) else texts:
        for part in (p.strip() for p in text.split(",")):
            if not SEED_RANGE.fullmatch(part):
                raise ValueError(f"{part!r} is not a seed range: write each range as FIRST-LAST, comma-separated "
                                 "(0-49999,50000-99999); each range is evaluated on its own")
            seeds = generation.parse_seeds(part)
            if len(seeds) < 2:
                raise ValueError(f"seed range {part} holds one seed; metrics need at least 2 images")
            ranges.append(range(seeds[0], seeds[-1] + 1))
    ordered = sorted(ranges, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise ValueError(f"seed ranges {evaluation.seed_ranges_text(a)} and {evaluation.seed_ranges_text(b)} overlap; the spread over ranges needs "
                             "disjoint ones")
    return ranges


def _identity(path: str | None) -> str | None:
    """A URL as it is, a local path made absolute: what records compare."""
    if path is None or util.is_url(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def settings(ref: str | None, detector_source: str | None, sampler: SamplerSettings, guidance: float = 1.0,
             gnet: str | None = None, precision: str = "tf32", class_idx: int | None = None,
             quantize_bits: int | None = None) -> dict:
    """What records must share to be reused: reference (its path and its contents), detector, sampler, guidance,
    precision, class, quantisation (as JSON reads it)."""
    guided = float(guidance) != 1.0
    value = {"ref": _identity(ref), "ref_content": None if ref is None else util.content_identity(ref),
             "detector": _identity(metrics.detector.resolve_source(detector_source)),
             "sampler": {"solver": sampler.solver, **sampler.options}, "guidance": float(guidance),
             "gnet": _identity(gnet) if guided else None, "precision": precision, "class": class_idx}
    if quantize_bits is not None and int(quantize_bits) < quantize.FULL_PRECISION_BITS:
        value["quantize_bits"] = int(quantize_bits)  # absent otherwise: the records of earlier sweeps stay valid
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------------------------------------
# The results file.

def record(network: Snapshot, seeds: range, names: Sequence[str], key: dict, score: evaluation.Score) -> dict:
    """The record of one evaluation (`evaluation.score`) of a network on a seed range with the settings `key`."""
    return {"network": network.path, "identity": util.content_identity(network.path), "kimg": network.kimg,
            "sigma_rel": network.sigma_rel, "seeds": evaluation.seed_ranges_text(seeds),
            "metrics": list(names), "settings": key, "results": score.results, "num": score.num,
            "seconds": round(score.seconds, 3), "nfe_per_batch": score.nfe_per_batch,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


class Records(RecordsFile):
    """The records of a sweep's JSON file (training/records.py), with the best evaluation beside them."""

    format, version, what = FORMAT, VERSION, "a fid.py sweep file"
    required = frozenset({"network", "seeds", "settings", "metrics", "results"})
    identity = ("network", "identity", "seeds", "settings")

    def __init__(self, path: str | os.PathLike, records: list[dict] | None = None, best: dict | None = None, **fields):
        super().__init__(path, records, best=best, **fields)  # "best" is in every sweep file, null until reported

    @property
    def best(self) -> dict | None:
        return self.fields.get("best")

    def find(self, network: Snapshot, seeds: range, key: dict, names: Sequence[str]) -> dict | None:
        """The record of `network` (its path and contents) on `seeds` with the settings `key` holding the metrics
        `names`, or None."""
        return self.match(dict(network=network.path, identity=util.content_identity(network.path),
                               seeds=evaluation.seed_ranges_text(seeds), settings=key), names)

    def others(self, key: dict) -> int:
        """How many records have other settings (kept in the file, never used for these)."""
        return sum(r["settings"] != key for r in self.records)


def pending(records: Records, networks: Sequence[Snapshot], ranges: Sequence[range], key: dict,
            names: Sequence[str]) -> list[tuple[int, list[int]]]:
    """(network index, seed range indices) of the evaluations with the settings `key` not in `records` yet."""
    todo = [(i, [j for j, seeds in enumerate(ranges) if records.find(network, seeds, key, names) is None])
            for i, network in enumerate(networks)]
    return [(i, js) for i, js in todo if js]


# ------------------------------------------------------------------------------------------------
# The table and the best.

@dataclass(frozen=True)
class Row:
    """A network's values of one metric, one per seed range (None: not evaluated)."""

    network: Snapshot
    values: tuple[float | None, ...]

    @property
    def complete(self) -> bool:
        return all(v is not None for v in self.values)

    @property
    def mean(self) -> float | None:
        done = [v for v in self.values if v is not None]
        return float(np.mean(done)) if done else None

    @property
    def std(self) -> float | None:
        """The sample standard deviation over the seed ranges (None for fewer than two)."""
        done = [v for v in self.values if v is not None]
        return float(np.std(done, ddof=1)) if len(done) >= 2 else None


@dataclass(frozen=True)
class Best:
    """The best single value (row, seed range) and the best mean over the seed ranges (row), of complete rows."""

    single: tuple[int, int] | None
    mean: int | None


def table_rows(records: Records, networks: Sequence[Snapshot], ranges: Sequence[range], key: dict,
               names: Sequence[str], metric: str) -> list[Row]:
    """Each network's values of `metric` on each seed range, from the records with settings `key`."""
    score, _ = metrics.ranking(metric)
    rows = []
    for network in networks:
        found = [records.find(network, seeds, key, names) for seeds in ranges]
        rows.append(Row(network, tuple(None if r is None else r["results"][score] for r in found)))
    return rows


def best(rows: Sequence[Row], metric: str) -> Best:
    """The best value and the best mean of `metric` (lower for FID and KID, higher for IS: `metrics.ranking`)."""
    sign = -1.0 if metrics.ranking(metric)[1] else 1.0
    singles = [(sign * v, i, j) for i, row in enumerate(rows) for j, v in enumerate(row.values) if v is not None]
    means = [(sign * row.mean, i) for i, row in enumerate(rows) if row.complete]
    return Best(min(singles)[1:] if singles else None, min(means)[1] if means else None)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.5g}"


def format_table(metric: str, rows: Sequence[Row], ranges: Sequence[range], top: Best) -> str:
    """The values of `metric` by network and seed range with mean ± std; * marks the best value, ** the best mean."""
    score, higher = metrics.ranking(metric)
    header = ["network", "kimg", "sigma_rel", *(evaluation.seed_ranges_text(r) + " " for r in ranges), "mean ± std   "]
    table = [header]
    for i, (row, label) in enumerate(zip(rows, labels([r.network for r in rows]))):
        values = [_number(v) + ("*" if top.single == (i, j) else " ") for j, v in enumerate(row.values)]
        spread = "" if row.std is None else f" ± {row.std:.2g}"
        mean = _number(row.mean) + spread + (" **" if top.mean == i else "   ")
        sigma_rel = "ema" if row.network.sigma_rel is None else f"{row.network.sigma_rel:.3f}"
        table.append([label, _number(row.network.kimg), sigma_rel, *values, mean])
    widths = [max(len(line[c]) for line in table) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths))).rstrip()
             for line in table]
    legend = f"{score} ({'higher' if higher else 'lower'} is better): * the best value, ** the best mean over the seed ranges"
    return "\n".join([legend, *lines])


def best_record(metric: str, rows: Sequence[Row], ranges: Sequence[range], top: Best) -> dict:
    """The best value and the best mean of `metric`, for the JSON file."""
    score, higher = metrics.ranking(metric)
    place = lambda n: {"network": n.path, "kimg": n.kimg, "sigma_rel": n.sigma_rel}  # noqa: E731
    single = None if top.single is None else {**place(rows[top.single[0]].network), "seeds": evaluation.seed_ranges_text(ranges[top.single[1]]),
                                              "value": rows[top.single[0]].values[top.single[1]]}
    mean = None if top.mean is None else {**place(rows[top.mean].network), "mean": rows[top.mean].mean,
                                          "std": rows[top.mean].std, "values": list(rows[top.mean].values)}
    return {"score": score, "higher_is_better": higher, "single": single, "mean": mean}


# ------------------------------------------------------------------------------------------------
# The picture (EDM2's figure 5).

def check_plotting() -> None:
    """ValueError saying how to install matplotlib when it is missing (before any work)."""
    try:
        import matplotlib  # noqa: F401, PLC0415 (an optional extra)
    except ImportError:
        raise ValueError(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}") from None


def _panel(axes, rows: Sequence[Row], x, group, xlabel: str, label, winner: Row | None, ylabel: str) -> None:
    """One line per `group(row)` of the rows' means (± std) against `x(row)`; the best mean starred."""
    lines: dict = {}
    for row in sorted(rows, key=lambda r: (x(r), _order(r.network))):
        if row.mean is not None:
            lines.setdefault(group(row), []).append((x(row), row.mean, row.std or 0.0))
    for key, points in sorted(lines.items(), key=lambda item: (item[0] is None, item[0] or 0)):
        xs, means, stds = zip(*points)
        axes.errorbar(xs, means, yerr=stds if any(stds) else None, marker="o", markersize=3, capsize=2, label=label(key))
    if winner is not None and winner in rows:
        axes.plot([x(winner)], [winner.mean], marker="*", markersize=14, color="black", linestyle="none", label="best mean")
    if lines:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, f"no snapshot names with a {xlabel}", ha="center", transform=axes.transAxes)
    axes.set(xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)


def plot(path: str | os.PathLike, metric: str, rows: Sequence[Row], top: Best) -> None:
    """`metric`'s mean (± std) over the seed ranges against sigma_rel (a line per kimg) and against kimg (a line per
    profile, 'ema' for the classic EMA), as EDM2's figure 5; the best mean starred; written atomically as a PNG."""
    from matplotlib.figure import Figure  # noqa: PLC0415 (an optional extra)

    score, higher = metrics.ranking(metric)
    ylabel = f"{score} ({'higher' if higher else 'lower'} is better)"
    winner = None if top.mean is None else rows[top.mean]
    timed = [r for r in rows if r.network.kimg is not None]
    profiled = [r for r in timed if r.network.sigma_rel is not None]
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    by_sigma, by_kimg = figure.subplots(1, 2)
    _panel(by_sigma, profiled, lambda r: r.network.sigma_rel, lambda r: r.network.kimg, "sigma_rel",
           lambda kimg: f"{kimg} kimg", winner, ylabel)
    _panel(by_kimg, timed, lambda r: r.network.kimg, lambda r: r.network.sigma_rel, "kimg",
           lambda s: "ema" if s is None else f"sigma_rel {s:.3f}", winner, ylabel)
    by_sigma.set_title(f"{score} against the EMA length")
    by_kimg.set_title(f"{score} against training time")
    with util.atomic_write(path, "wb") as f:
        figure.savefig(f, format="png", dpi=120)
