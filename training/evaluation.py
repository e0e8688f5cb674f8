"""A network's metrics from seeded samples, shared by `fid.py gen`, `fid.py sweep` and `train.py --metrics`.

    reference = metrics.open_reference(ref, metrics.reference_needs(names), detector, device)
    score = evaluation.score(net, seeds, names, reference, detector, device, settings)
    score.results  # {"fid": ...}

The samples are those of generate.py for the same seeds and sampler (quantised to uint8 as the PNGs are), drawn
on every rank in memory; the result is the same for any number of ranks and batch size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from training import generation, metrics
from training.samplers import SamplerSettings


@dataclass
class Score:
    """What one evaluation gives: the metrics, the evaluations per batch, the seconds it took (on this rank)."""

    results: dict
    by_metric: dict  # name -> that metric's entries of `results`
    nfe_per_batch: float
    seconds: float
    num: int


def score(net, seeds: Sequence[int], names: Sequence[str], reference, detector, device,
          settings: SamplerSettings | None = None, batch_size: int = 64, class_idx: int | None = None,
          precision: str = "tf32", progress: bool = False) -> Score:
    """The metrics `names` of `net`'s samples for `seeds` against `reference` (None when no metric needs one).

    Every rank calls it; each samples its share of the seeds (`generation.generate`).
    """
    seeds = [int(s) for s in seeds]
    if len(seeds) < 2:
        raise ValueError(f"metrics need at least 2 images, got {len(seeds)} seeds")
    settings = settings or SamplerSettings()
    settings.check(net)  # the solver's plan for this network, before any image
    start, nfe = time.time(), []

    def batches():
        for batch in generation.generate(net, seeds, batch_size, device, settings, class_idx, precision, progress):
            nfe.append(batch.nfe)
            yield batch.indices, batch.images.permute(0, 3, 1, 2)

    stats = metrics.statistics(batches(), detector, len(seeds), device, names)
    by_metric = {name: metrics.evaluate([name], stats, reference, seeds[0]) for name in names}
    results = {key: value for name in metrics.METRICS if name in by_metric for key, value in by_metric[name].items()}
    return Score(results, by_metric, sum(nfe) / max(len(nfe), 1), time.time() - start, len(seeds))


def open_setup(names: Sequence[str], ref: str | None, detector_source: str | None, device, batch_size: int = 64,
               workers: int = 3, progress: bool = False):
    """Every rank: (detector, reference or None) for the metrics `names` (the reference computed here when `ref`
    is a dataset); errors name what is missing."""
    detector = metrics.detector.load_shared(detector_source, device)
    needs = metrics.reference_needs(names)
    reference = None if ref is None else metrics.open_reference(ref, needs, detector, device, batch_size, workers, progress)
    return detector, reference


def check_setup(names: Sequence[str], ref: str | None, detector_source: str | None, flag: str = "--ref") -> None:
    """One process, before long work starts: the detector loads (downloaded into the cache if need be) and the
    reference exists and fits it. ValueError / OSError naming the problem otherwise."""
    check_reference(names, ref, flag)
    reference = None
    if ref is not None:  # the cheap checks first: a missing file is found before a detector download
        if metrics.is_dataset(ref):
            metrics.image_dataset(ref)
        else:
            reference = metrics.load_reference(ref)
    detector = metrics.detector.load_detector(detector_source, device="cpu")
    if reference is not None:
        metrics.check_fits(reference, f"{flag}={ref}", metrics.reference_needs(names), detector.feature_dim)


def check_reference(names: Sequence[str], ref: str | None, flag: str = "--ref") -> None:
    """ValueError when a metric of `names` needs reference statistics and `ref` is None."""
    needing = [n for n in names if metrics.get(n).reference is not None]
    if ref is None and needing:
        raise ValueError(f"{flag} is required for {', '.join(needing)} (an npz such as EDM's fid-refs, or a dataset)")


def seed_ranges_text(seeds: Sequence[int]) -> str | list[int]:
    """'a-b' for a contiguous run of seeds, else the list itself (for JSON records)."""
    seeds = [int(s) for s in seeds]
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else seeds
