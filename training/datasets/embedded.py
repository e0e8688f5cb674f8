"""Datasets that need no download: `embedded:shapes` (generated) and `embedded:digits` (real).

shapes: 10 classes of coloured geometric shapes at 32x32, generated from a fixed seed with numpy.
digits: the 1,797 8x8 handwritten digits of UCI (Alpaydin & Kaynak 1998) that ship as a data file inside
scikit-learn's wheel; read from that file without importing scikit-learn.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from training.datasets.format import DatasetError
from training.datasets.source import Source, SourceItem, SourceKind, image_from_array

PREFIX = "embedded:"  # --source=embedded:NAME
EMBEDDED = ("shapes", "digits")


SHAPES_CLASSES = ("disc", "square", "triangle", "diamond", "ring", "frame", "plus", "cross", "hbars", "vbars")
SHAPES_SIZE = 10_000  # images in embedded:shapes (--max-images takes fewer; the first N never depend on N)
SHAPES_RESOLUTION = 32
_SHAPES_CHUNK = 100  # images generated at once; each chunk has its own generator and 10 images per class
_SHAPES_SEED = 20230213
_SUPERSAMPLE = 4  # masks are drawn at 4x and averaged, for anti-aliased edges


def _bars(a: np.ndarray, b: np.ndarray, half_width: float) -> np.ndarray:
    return (np.abs(a) <= half_width) & (np.abs(b) <= 1.0)


# Each mask takes coordinates (u, v) in units of the shape's size (the shape fits in |u|, |v| <= 1).
_SHAPE_MASKS: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    lambda u, v: u * u + v * v <= 1.0,  # disc
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) <= 0.8,  # square
    lambda u, v: (v <= 0.75) & (v >= -0.85 + 1.6 * np.abs(u) / 0.9),  # triangle, apex up
    lambda u, v: np.abs(u) + np.abs(v) <= 1.0,  # diamond
    lambda u, v: np.abs(u * u + v * v - 0.6) <= 0.4,  # ring
    lambda u, v: np.abs(np.maximum(np.abs(u), np.abs(v)) - 0.68) <= 0.17,  # frame (hollow square)
    lambda u, v: _bars(u, v, 0.28) | _bars(v, u, 0.28),  # plus
    lambda u, v: _bars(u + v, u - v, 0.4) | _bars(u - v, u + v, 0.4),  # cross (x)
    lambda u, v: (np.abs(u) <= 0.9) & (np.abs(np.abs(v) - 0.45) <= 0.22),  # two horizontal bars
    lambda u, v: (np.abs(v) <= 0.9) & (np.abs(np.abs(u) - 0.45) <= 0.22),  # two vertical bars
)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    sector = np.floor(h * 6)
    f, i = h * 6 - sector, sector.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    channels = [[v, q, p, p, t, v], [t, v, v, q, p, p], [p, p, t, v, v, q]]
    return np.stack([np.choose(i, c) for c in channels], axis=-1)


def shapes_chunk(chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [100, 32, 32, 3] and labels int64 [100] of chunk `chunk` of embedded:shapes."""
    rng = np.random.default_rng([_SHAPES_SEED, chunk])
    n, res, ss = _SHAPES_CHUNK, SHAPES_RESOLUTION, _SUPERSAMPLE
    labels = rng.permutation(np.arange(n) % len(SHAPES_CLASSES))
    size = rng.uniform(6.0, 12.0, n)  # half-extent in pixels
    cx, cy = (rng.uniform(size + 1, res - 1 - size).astype(np.float32)[:, None, None] for _ in range(2))
    angle = rng.uniform(-0.2, 0.2, n)  # small rotations keep square/diamond and plus/cross apart
    cos, sin, scale = (a.astype(np.float32)[:, None, None] for a in (np.cos(angle), np.sin(angle), 1 / size))
    grid = ((np.arange(res * ss) + 0.5) / ss).astype(np.float32)
    dx, dy = grid[None, None, :] - cx, grid[None, :, None] - cy
    u, v = (cos * dx + sin * dy) * scale, (cos * dy - sin * dx) * scale
    mask = np.zeros(u.shape, dtype=bool)
    for cls, shape in enumerate(_SHAPE_MASKS):
        mask[labels == cls] = shape(u[labels == cls], v[labels == cls])
    cover = mask.reshape(n, res, ss, res, ss).mean(axis=(2, 4), dtype=np.float32)[..., None]
    fg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0.5, 1, n), rng.uniform(0.75, 1, n)) * 255  # vivid
    bg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.6, n), rng.uniform(0.05, 0.35, n)) * 255  # dark
    images = bg[:, None, None, :] * (1 - cover) + fg[:, None, None, :] * cover
    return np.rint(images).astype(np.uint8), labels


def _shapes() -> Source:
    """embedded:shapes, generated chunk by chunk."""

    def items() -> Iterator[SourceItem]:
        for start in range(0, SHAPES_SIZE, _SHAPES_CHUNK):
            images, labels = shapes_chunk(start // _SHAPES_CHUNK)
            for i in range(min(_SHAPES_CHUNK, SHAPES_SIZE - start)):
                load = functools.partial(image_from_array, images[i])
                yield SourceItem(f"embedded:shapes[{start + i}]", int(labels[i]), load)

    description = f"embedded:shapes ({SHAPES_SIZE} generated 32x32 RGB images of {len(SHAPES_CLASSES)} shapes)"
    return Source(description, SHAPES_SIZE, items, None, list(SHAPES_CLASSES))


def _digits_file() -> Path:
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise DatasetError(
            "embedded:digits reads the digits that ship inside scikit-learn: pip install scikit-learn "
            "(or pip install -e '.[quickstart]')"
        )
    return path


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [1797, 8, 8] (ink bright on black, 0..16 scaled to 0..255) and labels int64 [1797]."""
    path = _digits_file()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise DatasetError(f"{path} is not the digits table this program knows (shape {table.shape})")
    images = np.rint(table[:, :64] * 255 / 16).clip(0, 255).astype(np.uint8).reshape(-1, 8, 8)
    return images, table[:, 64].astype(np.int64)


def _digits() -> Source:
    """embedded:digits, from scikit-learn's data file."""
    images, labels = digits_arrays()

    def items() -> Iterator[SourceItem]:
        for i in range(len(images)):
            yield SourceItem(f"embedded:digits[{i}]", int(labels[i]), functools.partial(image_from_array, images[i]))

    description = f"embedded:digits ({len(images)} real 8x8 grayscale handwritten digits from scikit-learn)"
    return Source(description, len(images), items, None, [str(d) for d in range(10)])


def embedded_source(name: str) -> Source:
    """The embedded dataset `name` (shapes or digits)."""
    if name == "shapes":
        return _shapes()
    if name == "digits":
        return _digits()
    raise DatasetError(f"unknown embedded dataset {name!r}; available: " + ", ".join(f"embedded:{n}" for n in EMBEDDED))


# Chosen by the spec's prefix (sources.open_source), never detected from a path.
EMBEDDED_KIND = SourceKind(
    "embedded",
    PREFIX + "|".join(EMBEDDED),
    detect=lambda path: False,
    open=lambda name, labels_from_folders: embedded_source(name),
)
