"""Compatibility module: `from training.dataset import ImageFolderDataset` keeps working (as in EDM).

The dataset code lives in the package training/datasets/ (format, loader, sources, writer); import
from `training.datasets` in new code.
"""

from __future__ import annotations

from training.datasets.format import DatasetError
from training.datasets.loader import ImageFolderDataset

__all__ = ["DatasetError", "ImageFolderDataset"]
