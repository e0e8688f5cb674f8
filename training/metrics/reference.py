"""Reference statistics: npz files with `mu` [F] and `sigma` [F, F], read and written exactly like EDM's published
ones (interchangeable in both directions); ours may also hold `features` (for KID) and `count`. A reference may
also be computed on the spot from a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnnlib import util
from torch_utils import distributed
from training.metrics.features import FeatureStats, compute_stats, dataset_batches
from training.datasets import ImageFolderDataset


@dataclass
class Reference:
    """Reference statistics: mu, sigma, and the features themselves when kept (for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    count: int | None = None


def save_reference(path, stats: FeatureStats, keep_features: bool = False) -> None:
    """Write an npz with mu and sigma (EDM's keys), count, and the features with `keep_features`."""
    mu, sigma = stats.mean_cov()
    arrays = dict(mu=mu, sigma=sigma, count=np.int64(stats.count.item()))
    if keep_features:
        if stats.features is None:
            raise ValueError("features were not kept while computing these statistics")
        arrays["features"] = stats.features.cpu().numpy()
    with util.atomic_write(path) as f:
        np.savez(f, **arrays)


def load_reference(path_or_url) -> Reference:
    """Read reference statistics from an npz path or URL (ours or EDM's); no pickled objects are read."""
    path = util.local_path(path_or_url)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not reference statistics (an npz with mu and sigma): {error}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path}: has {sorted(arrays)} but reference statistics need 'mu' and 'sigma'; make them with fid.py ref")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    count = int(arrays["count"]) if "count" in arrays else None
    return Reference(mu, sigma, arrays.get("features"), count)


def open_reference(ref: str, needs: set[str], detector, device, batch_size: int = 64, workers: int = 3) -> Reference:
    """Reference statistics from an npz (path or URL), or computed here from a dataset folder or ZIP.

    `needs` names what the metrics read of it: "moments" (mu, sigma) and/or "features" (KID).
    """
    if not util.is_url(ref) and Path(ref).exists() and not ref.endswith(".npz"):
        dataset = ImageFolderDataset(ref)
        stats = compute_stats(dataset_batches(dataset, batch_size, workers), detector, len(dataset), device, {"features"})
        mu, sigma = stats.mean_cov()
        return Reference(mu, sigma, stats.features.cpu().numpy(), len(dataset))
    reference = distributed.main_first(lambda: load_reference(ref))
    if "features" in needs and reference.features is None:
        raise ValueError(f"{ref} holds no features, which KID needs: make it with `fid.py ref --features=1`, "
                         "or pass the dataset itself as --ref")
    return reference
