"""Image-quality metrics behind one registry: FID, KID and the Inception Score, from detector features.

    names = metrics.parse("fid,kid")
    detector = metrics.detector.load_shared(None, device)            # Inception-v3, downloaded once
    reference = metrics.open_reference("cifar10-32x32.npz", metrics.reference_needs(names), detector, device)
    stats = metrics.statistics(batches, detector, count, device, names)  # (positions, uint8 NCHW) batches
    results = metrics.evaluate(names, stats, reference, seed=0)       # {"fid": ..., "kid": ...}

`METRICS` maps each name to a `Metric` (training/metrics/base.py): how to compute it, which per-image rows
it needs kept, what it needs of the reference. A new metric is one module (its function and its `Metric`)
plus one line below; fid.py and the rest only dispatch through these functions.
"""

from __future__ import annotations

from collections.abc import Iterable

from training.metrics import detector, fid, inception_score, kid
from training.metrics.base import Metric
from training.metrics.features import FeatureStats, compute_stats, dataset_batches, image_dataset
from training.metrics.reference import Reference, check_fits, is_dataset, load_reference, open_reference, save_reference

__all__ = ["METRICS", "FeatureStats", "Metric", "Reference", "check_fits", "compute_stats", "dataset_batches", "detector", "evaluate",
           "few_images_warnings", "get", "is_dataset", "load_reference", "image_dataset", "open_reference", "parse", "ranking", "reference_needs",
           "save_reference", "statistics"]

METRICS: dict[str, Metric] = {
    "fid": fid.FID,
    "kid": kid.KID,
    "is": inception_score.IS,
}


def get(name: str) -> Metric:
    """The registered metric `name`."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose among {', '.join(METRICS)}")
    return METRICS[name]


def parse(text: str) -> list[str]:
    """'fid,kid' -> ['fid', 'kid'], each a registered metric."""
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"choose among {', '.join(METRICS)} (comma-separated), got {text!r}")
    return names


def ranking(name: str) -> tuple[str, bool]:
    """(the result key that ranks networks by the metric `name`, whether higher is better): ('fid', False)."""
    metric = get(name)
    return metric.score or name, metric.higher_is_better


def reference_needs(names: Iterable[str]) -> set[str]:
    """What the metrics `names` read of a reference: 'moments' and/or 'features' (empty: no reference needed)."""
    return {get(n).reference for n in names if get(n).reference is not None}


def statistics(batches, detector, count: int, device, names: Iterable[str]) -> FeatureStats:
    """`compute_stats` keeping the per-image rows the metrics `names` need."""
    return compute_stats(batches, detector, count, device, {row for n in names for row in get(n).keeps})


def few_images_warnings(names: Iterable[str], num: int, feature_dim: int) -> list[str]:
    """What the metrics `names` say of a value from `num` images (e.g. FID from no more images than features)."""
    found = (get(n).few_images(num, feature_dim) for n in names if get(n).few_images is not None)
    return [w for w in found if w is not None]


def evaluate(names: Iterable[str], stats: FeatureStats, reference: Reference | None, seed: int = 0) -> dict:
    """The metrics `names` (in registry order) of the images whose statistics are `stats`."""
    wanted = set(names)
    results = {}
    for name, metric in METRICS.items():
        if name in wanted:
            if metric.reference is not None and reference is None:
                raise ValueError(f"{name} needs reference statistics (--ref)")
            results.update(metric.compute(stats, reference, seed))
    return results
