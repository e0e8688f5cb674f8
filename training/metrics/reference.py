"""Reference statistics: npz files with `mu` [F] and `sigma` [F, F], read and written exactly like EDM's published
ones (interchangeable in both directions); ours may also hold `features` (for KID) and `count`. A reference may
also be computed on the spot from a dataset.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnnlib import util
from torch_utils import distributed
from training.metrics.features import FeatureStats, compute_stats, dataset_batches, moments_problem
from training.datasets import ImageFolderDataset

RECOMPUTE = "recompute it with `fid.py ref --data=DATASET --dest=NPZ`"


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
    """Read reference statistics from an npz path or URL (ours or EDM's); no pickled objects are read.

    mu and sigma must be finite moments of one feature size, sigma symmetric; features, when present, finite
    rows of that size. Anything else is refused with a ValueError naming the file.
    """
    path = util.local_path(path_or_url)
    if not zipfile.is_zipfile(path):  # np.load would read it as one .npy array, or as a pickle it refuses
        raise ValueError(f"{path}: not reference statistics (an npz with mu and sigma): not an npz (ZIP) file; {RECOMPUTE}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path}: not reference statistics (an npz with mu and sigma): {error}") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise ValueError(f"{path}: has {sorted(arrays)} but reference statistics need 'mu' and 'sigma'; make them with fid.py ref")
    for name in ("mu", "sigma", "features"):
        if name in arrays and arrays[name].dtype.kind not in "fiu":
            raise ValueError(f"{path}: {name} holds {arrays[name].dtype}, not numbers; {RECOMPUTE}")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    problem = moments_problem(mu, sigma)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; {RECOMPUTE}")
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.size):
        raise ValueError(f"{path}: features {features.shape} do not fit mu {mu.shape} (features [N, F]); {RECOMPUTE}")
    if features is not None and not np.isfinite(features).all():
        raise ValueError(f"{path}: features hold NaN or inf; {RECOMPUTE}")
    count = arrays.get("count")
    if count is not None and (count.size != 1 or count.dtype.kind not in "iu"):
        raise ValueError(f"{path}: count should be one integer, got {count.dtype} {count.shape}; {RECOMPUTE}")
    return Reference(mu, sigma, features, None if count is None else int(count))


def is_dataset(ref: str) -> bool:
    """Whether --ref names a dataset (a folder, or a ZIP that is not an npz) rather than reference statistics."""
    if util.is_url(ref):
        return False
    path = Path(ref)
    if path.is_dir():
        return True
    if path.suffix == ".npz" or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return not all(name.endswith(".npy") for name in archive.namelist())  # np.savez writes only .npy members


def open_reference(
    ref: str, needs: set[str], detector, device, batch_size: int = 64, workers: int = 3, progress: bool = False
) -> Reference:
    """Reference statistics from an npz (path or URL), or computed here from a dataset folder or ZIP.

    `needs` names what the metrics read of it: "moments" (mu, sigma) and/or "features" (KID). `progress`
    shows a bar on rank 0 while a dataset's features are computed. A file made with a detector of another
    feature size is refused here, before any image is read.
    """
    if is_dataset(ref):
        dataset = ImageFolderDataset(ref)
        batches = dataset_batches(dataset, batch_size, workers, progress)
        stats = compute_stats(batches, detector, len(dataset), device, {"features"})
        mu, sigma = stats.mean_cov()
        return Reference(mu, sigma, stats.features.cpu().numpy(), len(dataset))
    reference = distributed.main_first(lambda: load_reference(ref))
    check_fits(reference, ref, needs, detector.feature_dim)
    return reference


def check_fits(reference: Reference, ref: str, needs: set[str], feature_dim: int) -> None:
    """ValueError unless reference statistics read from `ref` suit a detector of `feature_dim` features and
    hold what the metrics need (`needs`: "moments", "features")."""
    if reference.mu.size != feature_dim:
        raise ValueError(f"{ref} holds statistics of {reference.mu.size} features per image, but the detector gives "
                         f"{feature_dim}: it was made with another detector; {RECOMPUTE} and this --detector")
    if "features" in needs and reference.features is None:
        raise ValueError(f"{ref} holds no features, which KID needs: make it with `fid.py ref --features=1`, "
                         "or pass the dataset itself as --ref")
