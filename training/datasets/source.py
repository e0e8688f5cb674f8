"""What every dataset source provides: its items (`SourceItem`), the opened source (`Source`), the record
that registers a kind of source (`SourceKind`), and the decoding helpers the sources share."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from training.datasets.format import upright


@dataclass(frozen=True)
class SourceItem:
    """One image of a source: a name for messages, its class index (or None) and how to decode it."""

    name: str
    label: int | None
    load: Callable[[], PIL.Image.Image]


@dataclass
class Source:
    """An opened source: a description, its image count (None if unknown) and a factory of item iterators."""

    description: str
    size: int | None
    items: Callable[[], Iterator[SourceItem]]
    path: str | None = None
    class_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceKind:
    """A kind of source, as training/datasets/sources.py registers it.

    `description` is how error messages name it ('a ZIP'); `detect(path)` says whether a path holds
    this kind (it may raise a DatasetError for a near miss, such as an idx file that is not of images);
    `open(target, labels_from_folders)` opens it. A `container` (any folder, ZIP or tar) is tried
    only after the kinds recognised by a mark of their own (LSUN's data.mdb, MNIST's magic number),
    which would otherwise be taken for one.
    """

    name: str
    description: str
    detect: Callable[[Path], bool]
    open: Callable[[Any, bool], Source]  # target: the path, or for embedded:NAME the name
    labels_from_folders: bool = False
    container: bool = False


# ----------------------------------------------------------------------------------------------
# Decoding helpers shared by the sources.


def image_from_array(array: np.ndarray) -> PIL.Image.Image:
    """A PIL image of a uint8 HW or HWC array."""
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def image_from_bytes(data: bytes) -> PIL.Image.Image:
    """The decoded image of an encoded file's bytes (PNG, JPEG, ...), turned upright (`upright`)."""
    image = PIL.Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated or corrupt file fails here, not later
    return upright(image)


def image_from_file(path: Path) -> PIL.Image.Image:
    """The decoded image of a file, closed again, turned upright (`upright`)."""
    with PIL.Image.open(path) as image:
        image.load()
        return upright(image)
