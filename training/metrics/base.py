"""The metric protocol: what a metric needs from the statistics of the evaluated images and from the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from training.metrics.features import KEEPS

REFERENCE_NEEDS = ("moments", "features")  # mu and sigma (every reference file), or the features themselves


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    `compute(stats, reference, seed) -> {name: value}` reads the evaluated images' `FeatureStats` (moments
    always; the per-image rows named in `keeps`) and, when `reference` is set, the `Reference` (its
    moments, or its features); `seed` seeds any random subsets. Networks are ranked (`fid.py sweep`) by the result
    `score` (default: the registered name), the higher the better with `higher_is_better`. `few_images(num,
    feature_dim)` says when so few images make the value degenerate (a warning the tools print), or returns None.
    """

    compute: Callable[..., dict]
    keeps: frozenset[str] = frozenset()
    reference: str | None = None
    description: str = ""
    score: str | None = None
    higher_is_better: bool = False
    few_images: Callable[[int, int], str | None] | None = None  # (images, feature_dim) -> a warning, or None

    def __post_init__(self):
        if not self.keeps <= set(KEEPS):
            raise ValueError(f"a metric can keep {', '.join(KEEPS)}, not {sorted(self.keeps)}")
        if self.reference is not None and self.reference not in REFERENCE_NEEDS:
            raise ValueError(f"a metric's reference need is one of {', '.join(REFERENCE_NEEDS)} or None, got {self.reference!r}")
