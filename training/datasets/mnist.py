"""MNIST idx files: the images file (idx3, optionally gzipped) is given, its labels file found beside it."""

from __future__ import annotations

import contextlib
import functools
import gzip
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.datasets.format import DatasetError
from training.datasets.source import Source, SourceItem, SourceKind, image_from_array


def _head(path: Path) -> bytes:
    """The first 4 bytes of a file, decompressed when it is gzip."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error), gzip.open(path, "rb") as f:
            head = f.read(4)
    return head


def is_idx_images(path: Path) -> bool:
    """True for an idx file of 3 dimensions (images); an idx file of another dimension is an error."""
    if path.is_dir():
        return False
    head = _head(path)
    if head[:3] != b"\0\0\x08":  # idx: two zero bytes, type 0x08 (uint8), number of dimensions
        return False
    if head[3] == 3:
        return True
    raise DatasetError(
        f"{path} is an idx file of {head[3]} dimension(s), not of images (the labels file?); "
        "give the images file, e.g. train-images-idx3-ubyte.gz (its labels are found beside it)"
    )


def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_idx_header(f, where: Path, magic: int, ndim: int) -> list[int]:
    head = f.read(4 * (1 + ndim))
    if len(head) < 4 * (1 + ndim):
        raise DatasetError(f"{where} is truncated (it ends inside the header); download it again")
    found, *dims = struct.unpack(f">{1 + ndim}I", head)
    if found != magic:
        raise DatasetError(f"{where} is not the expected MNIST file (magic number {found}, expected {magic})")
    return dims


def _mnist_labels_path(images: Path) -> Path:
    stem = images.name.removesuffix(".gz")
    labels_stem = stem.replace("images", "labels").replace("idx3", "idx1")
    candidates = [images.with_name(labels_stem + ext) for ext in (".gz", "")]
    for candidate in candidates:
        if labels_stem != stem and candidate.is_file():
            return candidate
    raise DatasetError(
        f"cannot find the labels of {images}: expected {candidates[0].name} or {candidates[1].name} beside it "
        "(MNIST ships train-images-idx3-ubyte.gz with train-labels-idx1-ubyte.gz)"
    )


def open_mnist(path: Path) -> Source:
    """MNIST idx files: the images file given, the labels file found beside it; 28x28 grayscale kept."""
    labels_path = _mnist_labels_path(path)
    try:
        with _open_maybe_gzip(labels_path) as f:
            (count,) = _read_idx_header(f, labels_path, 2049, 1)
            labels = np.frombuffer(f.read(count), np.uint8)
        with _open_maybe_gzip(path) as f:
            n, rows, cols = _read_idx_header(f, path, 2051, 3)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"cannot read MNIST {path} / {labels_path.name} ({error}); download them again") from None
    if labels.size != count or n != count:
        raise DatasetError(f"{labels_path} holds {labels.size} of {count} labels for {n} images; download both again")

    def items() -> Iterator[SourceItem]:
        with _open_maybe_gzip(path) as f:
            _read_idx_header(f, path, 2051, 3)
            for i in range(n):
                try:
                    data = f.read(rows * cols)
                except (OSError, EOFError, zlib.error) as error:
                    raise DatasetError(f"cannot read image {i} of {path} ({error}); download it again") from None
                if len(data) < rows * cols:
                    raise DatasetError(f"{path} is truncated: it ends after {i} of {n} images; download it again")
                array = np.frombuffer(data, np.uint8).reshape(rows, cols)
                yield SourceItem(f"{path}[{i}]", int(labels[i]), functools.partial(image_from_array, array))

    return Source(f"MNIST {path} ({n} images, labels from {labels_path.name})", n, items, str(path))


MNIST_KIND = SourceKind(
    "mnist",
    "train-images-idx3-ubyte(.gz)",
    detect=is_idx_images,
    open=lambda path, labels_from_folders: open_mnist(path),
)
