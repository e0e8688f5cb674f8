"""A toy dataset source, as a user would add one: one file (this) plus one registry line (`SOURCES["npy"] = NPY_KIND`).

A NumPy .npy file of uint8 images, [N, H, W] (grayscale) or [N, H, W, C], without labels; read without pickles.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from training.datasets.format import DatasetError
from training.datasets.source import Source, SourceItem, SourceKind, image_from_array


def _detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".npy"


def _open(path: Path, labels_from_folders: bool) -> Source:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise DatasetError(f"{path} holds {array.dtype} {list(array.shape)}; give uint8 images [N, H, W(, C)]")

    def items():
        for i in range(len(array)):
            yield SourceItem(f"{path.name}[{i}]", None, functools.partial(image_from_array, np.asarray(array[i])))

    return Source(f"the NumPy array {path.name}", len(array), items, path=str(path))


NPY_KIND = SourceKind("npy", "a .npy array of images", _detect, _open)
