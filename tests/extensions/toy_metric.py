"""A toy metric, as a user would add one: one file (this) plus one registry line (`METRICS["toy"] = TOY`).

The distance between the mean detector features of the images and of the reference, |mu - mu_ref|: the
first term of FID on its own.
"""

from __future__ import annotations

import numpy as np

from training.metrics.base import Metric


def compute(stats, reference, seed: int) -> dict:
    """{'toy': |mu - mu_ref|} from the moments of the images and of the reference."""
    mu, _ = stats.mean_cov()
    return {"toy": float(np.linalg.norm(mu - reference.mu))}


TOY = Metric(compute, reference="moments", description="distance of the mean features")
