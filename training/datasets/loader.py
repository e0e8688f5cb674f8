"""The loader training reads a dataset with (training/datasets/format.py describes the format).

`ImageFolderDataset` reads datasets written by dataset_tool.py, also those written by EDM's tool, and
yields `(image uint8 CHW, label float32 one-hot)`.
It is a map-style dataset (`__len__`, `__getitem__`) for `torch.utils.data.DataLoader`; it needs no
torch itself and knows nothing of distributed sampling.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import PIL.Image
from tqdm import tqdm

from training.datasets.format import (
    LABELS_FILE,
    PNG_END,
    PNG_HEADER_BYTES,
    PNG_SIGNATURE,
    DatasetError,
    image_array,
    image_channels,
    is_image_name,
    list_files,
    parse_labels_json,
    png_complete,
    png_shape,
    upright,
)


class ImageFolderDataset:
    """Images and labels of a dataset ZIP or folder: item i is (uint8 [C, H, W], float32 [label_dim])."""

    def __init__(
        self,
        path: str | os.PathLike,
        resolution: int | None = None,
        use_labels: bool = False,
        max_size: int | None = None,
        xflip: bool = False,
        cache: bool = False,
        random_seed: int = 0,
        cache_limit_gib: float = 8.0,
    ) -> None:
        self._path = os.fspath(path)
        self._cache = cache
        self._cached: dict[int, np.ndarray] = {}
        self._cache_left = int(cache_limit_gib * 2**30)  # per process: decoded images beyond it are not kept
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if os.path.isdir(self._path):
            self._is_zip = False
            names = list_files(self._path)
        elif os.path.isfile(self._path) and zipfile.is_zipfile(self._path):
            self._is_zip = True
            names = [info.filename for info in self._zipfile().infolist() if not info.is_dir()]
        else:
            what = "does not exist" if not os.path.exists(self._path) else "is neither a folder nor a ZIP"
            raise DatasetError(f"dataset {self._path} {what}; build one with dataset_tool.py (see docs/datasets.md)")
        self._image_names = sorted(n for n in names if is_image_name(n))  # EDM's order: plain string sort
        if not self._image_names:
            raise DatasetError(f"dataset {self._path} holds no images")
        self._image_shape = list(self._load_image(0).shape)
        self._check_shape(resolution)
        self._labels = self._load_labels(LABELS_FILE in names) if use_labels else None
        self._label_dim = 0 if self._labels is None else int(self._labels.max()) + 1
        self._close_zip()  # reopened lazily in each process that reads (DataLoader workers)

        # max_size picks the same subset as EDM (seeded shuffle, then sorted); xflip appends mirrors.
        self._raw_idx = np.arange(len(self._image_names), dtype=np.int64)
        if max_size is not None and max_size < self._raw_idx.size:
            np.random.RandomState(random_seed % (1 << 31)).shuffle(self._raw_idx)
            self._raw_idx = np.sort(self._raw_idx[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=bool)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _check_shape(self, resolution: int | None) -> None:
        """The first image fixes the shape: square, and of `resolution` when one is asked for."""
        c, h, w = self._image_shape
        where = f"{self._path}: {self._image_names[0]}"
        if h != w:
            raise DatasetError(f"{where} is {w}x{h}; training needs square images (dataset_tool.py --resolution)")
        if resolution is not None and h != resolution:
            raise DatasetError(
                f"dataset {self._path} has {w}x{h} images but resolution={resolution} was asked for; "
                f"rebuild it with dataset_tool.py --resolution={resolution}x{resolution}"
            )

    def _load_labels(self, present: bool) -> np.ndarray:
        """Class indices of the images in order, from dataset.json; an error if there are none."""
        table = None
        if present:
            with self._open(LABELS_FILE) as f:
                table = parse_labels_json(f.read(), f"{self._path}: {LABELS_FILE}")
        if table is None:
            reason = "has no dataset.json" if not present else 'has "labels": null in dataset.json'
            raise DatasetError(
                f"dataset {self._path} {reason}, so it cannot be used with labels (use_labels / --cond=1); "
                "train unconditionally, or rebuild it with labels (dataset_tool.py --labels-from-folders "
                "or a dataset.json in the source folder)"
            )
        missing = [n for n in self._image_names if n not in table]
        if missing:
            where = f"{self._path}: {LABELS_FILE}"
            raise DatasetError(f"{where} has no label for {missing[0]} ({len(missing)} images lack one)")
        return np.array([table[n] for n in self._image_names], dtype=np.int64)

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():  # never share a handle across processes
            self._zip = zipfile.ZipFile(self._path)
            self._zip_pid = os.getpid()
        return self._zip

    def _close_zip(self) -> None:
        if self._zip is not None and self._zip_pid == os.getpid():
            self._zip.close()
        self._zip, self._zip_pid = None, None

    def _open(self, name: str):
        if self._is_zip:
            return self._zipfile().open(name, "r")
        return open(os.path.join(self._path, name), "rb")

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[str]:
        """Yield how messages name image `name`; turn a failure to read it into a DatasetError naming it."""
        where = f"{self._path}: {name}"
        try:
            yield where
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
            if isinstance(error, DatasetError):
                raise
            raise DatasetError(f"cannot read {where} ({error}); rebuild the dataset with dataset_tool.py") from None

    def _load_image(self, raw_idx: int) -> np.ndarray:
        name = self._image_names[raw_idx]
        with self._reading(name) as where, self._open(name) as f, PIL.Image.open(f) as image:
            image.load()
            return image_array(upright(image), where)

    def _header_shape(self, name: str) -> list[int]:
        """[C, H, W] of an image from its header: a PNG's IHDR chunk, or what PIL reads without decoding. A PNG must
        also end with its IEND chunk: a file cut short would pass the header and fail mid-training."""
        with self._reading(name) as where, self._open(name) as f:
            head = f.read(PNG_HEADER_BYTES)
            if head.startswith(PNG_SIGNATURE):
                f.seek(-len(PNG_END), os.SEEK_END)
                if not png_complete(f.read(len(PNG_END))):
                    raise DatasetError(f"{where} is cut short (a PNG without its end); rebuild the dataset with "
                                       "dataset_tool.py, or copy it again")
            shape = png_shape(head)
            if shape is not None:
                return list(shape)
            f.seek(0)
            with PIL.Image.open(f) as image:
                return [image_channels(image.mode, where), image.height, image.width]

    def _mismatch(self, name: str, shape: list[int]) -> DatasetError:
        """The error for an image whose shape differs from the first image's."""
        (c, h, w), (C, H, W) = shape, self._image_shape
        return DatasetError(
            f"{self._path}: {name} is {w}x{h} with {c} channels but the dataset's first image is {W}x{H} with {C}; "
            f"rebuild it with dataset_tool.py (--resolution={W}x{H}, --channels={'gray' if C == 1 else 'rgb'}) "
            "so all images agree"
        )

    def check_images(self, progress: bool = False) -> None:
        """Check, reading only their headers, that every image in use is readable and of the first image's shape."""
        names = [self._image_names[i] for i in np.unique(self._raw_idx)]
        try:
            for name in tqdm(names, unit="img", file=sys.stderr, disable=not progress, desc="checking images", delay=2):
                shape = self._header_shape(name)
                if shape != self._image_shape:
                    raise self._mismatch(name, shape)
        finally:
            self._close_zip()  # as after __init__: reopened lazily by each process that reads

    def close(self) -> None:
        """Close the ZIP handle of this process (it reopens on the next read)."""
        self._close_zip()

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _zip=None, _zip_pid=None)

    def __len__(self) -> int:
        return int(self._raw_idx.size)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        raw_idx = int(self._raw_idx[idx])
        image = self._cached.get(raw_idx)
        if image is None:
            image = self._load_image(raw_idx)
            if list(image.shape) != self._image_shape:
                raise self._mismatch(self._image_names[raw_idx], list(image.shape))
            if self._cache and image.nbytes <= self._cache_left:
                self._cached[raw_idx] = image
                self._cache_left -= image.nbytes
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx: int) -> np.ndarray:
        """The label of item `idx`: one-hot float32 [label_dim], or float32 [0] without labels."""
        onehot = np.zeros([self.label_dim], dtype=np.float32)
        if self._labels is not None:
            onehot[self._labels[self._raw_idx[idx]]] = 1
        return onehot

    @property
    def name(self) -> str:
        """The dataset's file or folder name without extension ('cifar10-32x32')."""
        return os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]

    @property
    def image_shape(self) -> list[int]:
        """[C, H, W]."""
        return list(self._image_shape)

    @property
    def num_channels(self) -> int:
        """1 (grayscale) or 3 (RGB)."""
        return self._image_shape[0]

    @property
    def resolution(self) -> int:
        """Height = width of the images."""
        return self._image_shape[1]

    @property
    def label_dim(self) -> int:
        """Number of classes (largest label + 1), or 0 without labels."""
        return self._label_dim

    @property
    def has_labels(self) -> bool:
        """True when the dataset was opened with use_labels (which requires labels)."""
        return self._labels is not None
