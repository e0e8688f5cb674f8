"""A picture of a training run: its stats.jsonl (the loss overall and per noise-level bucket, the learning rate, the
gradient norm, images per second) and its metric-*.jsonl (each metric of each snapshot's averages), against kimg.

    pfgmpp-plot training-runs/00000-cifar10-uncond-song-edm-D128-gpus8-batch512-tf32   # training/cli/plot.py

matplotlib is an optional dependency (pip install 'pfgmpp[plot]'); `plot_run` says so when it is missing.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

from dnnlib.util import atomic_write


def read_jsonl(path: Path) -> Iterator[dict]:
    """The lines of a JSON-lines file that parse (a line cut short by a kill is skipped)."""
    for line in Path(path).read_text().splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


def _panel(ax, ticks: list[dict], key: str, title: str, log: bool = False) -> None:
    ax.plot([t["kimg"] for t in ticks], [_number(t.get(key)) for t in ticks], marker=".", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel("kimg")
    if log:
        ax.set_yscale("log")


def plot_run(run_dir, out) -> Path:
    """Draw the run's statistics and metrics into the PNG `out` (written atomically); ValueError without stats."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'pfgmpp[plot]' (or pip install matplotlib)") from None
    run_dir = Path(run_dir)
    ticks = [t for t in read_jsonl(run_dir / "stats.jsonl")] if (run_dir / "stats.jsonl").is_file() else []
    ticks = [t for t in ticks if isinstance(t.get("kimg"), (int, float))]
    if not ticks:
        raise ValueError(f"{run_dir} holds no stats.jsonl with ticks: give a run directory of train.py")
    metrics = {p.stem.removeprefix("metric-"): list(read_jsonl(p)) for p in sorted(run_dir.glob("metric-*.jsonl"))}
    panels = 5 + len(metrics)
    cols = 3
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    _panel(axes[0], ticks, "loss", "loss", log=True)
    buckets = sorted({name for t in ticks for name in (t.get("loss_by_sigma") or {})},
                     key=lambda n: [name for t in ticks for name in (t.get("loss_by_sigma") or {})].index(n))
    for name in buckets:
        points = [(t["kimg"], t["loss_by_sigma"][name]) for t in ticks if (t.get("loss_by_sigma") or {}).get(name) is not None]
        if points:
            axes[1].plot(*zip(*points), marker=".", linewidth=1, label=name)
    axes[1].set(title="loss by sigma", xlabel="kimg", yscale="log")
    axes[1].legend(fontsize=7)
    _panel(axes[2], ticks, "lr", "learning rate")
    _panel(axes[3], ticks, "grad_norm", "gradient norm", log=True)
    _panel(axes[4], ticks, "img_per_sec", "images per second")
    for ax, (name, records) in zip(axes[5:], metrics.items()):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in records:
            label = "EMA" if r.get("sigma_rel") is None else f"sigma_rel {r['sigma_rel']:.3f}"
            if isinstance(r.get("value"), (int, float)):
                series.setdefault(label, []).append((r["kimg"], r["value"]))
        for label, points in series.items():
            ax.plot(*zip(*sorted(points)), marker="o", linewidth=1, label=label)
        ax.set(title=name, xlabel="kimg")
        ax.legend(fontsize=7)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    with atomic_write(out) as f:
        f.write(buffer.getvalue())
    return Path(out)
