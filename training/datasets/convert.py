"""The conversion behind dataset_tool.py: an opened source, streamed into a dataset.

`convert_dataset` takes the items of a `Source` (training/datasets/sources.py opens one) one at a
time through the channel conversion and the crop/resize transform (training/datasets/transforms.py),
checks that they agree in size, channels and labels, and writes them as PNGs with the atomic writer
(training/datasets/writer.py), so the dataset appears at its destination complete or not at all.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
from tqdm import tqdm

from training.datasets.format import LABELS_FILE, DatasetError, archive_name, check_class_index, labels_json
from training.datasets.source import Source, SourceItem
from training.datasets.transforms import CHANNELS, Transform, make_transform, set_channels
from training.datasets.writer import check_destination, dataset_writer, remove_stale_temporaries

_MAX_EXAMPLES = 5  # skipped files named in the summary


@dataclass
class Summary:
    """What a conversion wrote: counts, geometry, labels and skipped files."""

    dest: str
    source: str
    num_images: int = 0
    resolution: tuple[int, int] = (0, 0)
    channels: int = 0
    labels: list[int] | None = None  # class index per image, or None when unlabelled
    class_names: list[str] | None = None
    first_image: str = ""  # the image that fixed resolution and channels, named in mismatch errors
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """The label dimension the loader will see (largest class + 1), 0 without labels."""
        return max(self.labels) + 1 if self.labels else 0

    def describe(self) -> str:
        """A few lines for the terminal."""
        w, h = self.resolution
        lines = [f"Wrote {self.num_images} images to {self.dest}", f"  source:     {self.source}"]
        lines.append(f"  resolution: {w}x{h}")
        lines.append(f"  channels:   {self.channels} ({'RGB' if self.channels == 3 else 'grayscale'})")
        if self.labels is None:
            lines.append("  labels:     no")
        else:
            used = len(set(self.labels))
            extra = "" if used == self.num_classes else f" ({used} of them with images)"
            lines.append(f"  labels:     yes, {self.num_classes} classes{extra}")
            if self.class_names:
                shown = ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names[:20]))
                hidden = len(self.class_names) - 20
                more = f", ... ({hidden} more, in sorted order)" if hidden > 0 else ""
                lines.append(f"  classes:    {shown}{more}")
        lines.append(f"  skipped:    {self.skipped}" + "".join(f"\n    {e}" for e in self.skipped_examples))
        lines += [f"  note:       {note}" for note in self.notes]
        return "\n".join(lines)


def _check_consistent(summary: Summary, item: SourceItem, image: PIL.Image.Image) -> None:
    """All images must share size, channels and labelledness with the first."""
    w, h = image.size
    channels = 3 if image.mode == "RGB" else 1
    if item.label is not None:
        check_class_index(item.label, item.name)
    if not summary.first_image:
        if w != h:
            raise DatasetError(
                f"{item.name} is {w}x{h}; training needs square images: pass e.g. --resolution={h}x{h} "
                "--transform=center-crop (or --transform=center-crop-wide to letterbox)"
            )
        summary.first_image = item.name
        summary.resolution, summary.channels = (w, h), channels
        summary.labels = None if item.label is None else []
        return
    if (w, h) != summary.resolution:
        fw, fh = summary.resolution
        raise DatasetError(
            f"images differ in resolution: {summary.first_image} is {fw}x{fh} but {item.name} is {w}x{h}; pass "
            f"--resolution to resize them all, e.g. --resolution={fw}x{fh} (with --transform=center-crop to keep "
            "aspect ratios)"
        )
    if channels != summary.channels:
        kinds = {1: "grayscale", 3: "RGB"}
        raise DatasetError(
            f"images mix grayscale and RGB: {summary.first_image} is {kinds[summary.channels]} but {item.name} is "
            f"{kinds[channels]}; pass --channels=rgb or --channels=gray to convert them all"
        )
    if (item.label is None) != (summary.labels is None):
        raise DatasetError(f"{item.name} and {summary.first_image} differ in having a label; label all or none")


def _power_of_two_note(side: int) -> list[str]:
    """A note when the output side is not a power of two (EDM's networks halve it several times)."""
    if side & (side - 1) == 0:
        return []
    up = 1 << side.bit_length()
    return [f"{side}x{side} is not a power of two, which EDM's networks expect: --resolution={up}x{up} gives one "
            "(with --transform=pad for MNIST, as EDM)"]


def _png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0, optimize=False)  # uncompressed: fast to decode
    return buffer.getvalue()


def _load(item: SourceItem, summary: Summary, skip_bad: bool) -> PIL.Image.Image | None:
    """Decode one item; an unreadable file is an error, or with skip_bad counted and None."""
    try:
        return item.load()
    except DatasetError:
        raise
    except MemoryError:
        raise DatasetError(f"not enough memory to decode {item.name}; free memory, or remove the image") from None
    except Exception as error:  # any decoding failure (PIL raises OSError, SyntaxError, ValueError, ...)
        if not skip_bad:
            raise DatasetError(
                f"cannot read {item.name} ({error}); fix or remove it, or pass --skip-bad to skip unreadable files"
            ) from None
        summary.skipped += 1
        if len(summary.skipped_examples) < _MAX_EXAMPLES:
            summary.skipped_examples.append(f"{item.name} ({error})")
        return None


def validate_options(
    dest: str | os.PathLike,
    *,
    max_images: int | None = None,
    resolution: tuple[int, int] | None = None,
    transform: str | None = None,
    channels: str = "keep",
    overwrite: bool = False,
    source_path: str | None = None,
) -> tuple[Path, Transform]:
    """Check the options of convert_dataset before any work; return the destination and the transform."""
    shape = make_transform(transform, resolution)
    if channels not in CHANNELS:
        raise DatasetError(f"unknown channels {channels!r}; choose one of {', '.join(CHANNELS)}")
    if max_images is not None and max_images < 1:
        raise DatasetError(f"max_images must be at least 1, got {max_images}")
    return check_destination(dest, overwrite=overwrite, source=source_path), shape


def convert_dataset(
    source: Source,
    dest: str | os.PathLike,
    *,
    max_images: int | None = None,
    resolution: tuple[int, int] | None = None,
    transform: str | None = None,
    channels: str = "keep",
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Summary:
    """Stream `source` into a dataset at `dest` (a .zip file or a folder), complete or not at all."""
    options = dict(max_images=max_images, resolution=resolution, transform=transform, channels=channels)
    cleaned = remove_stale_temporaries(dest)  # first: a dataset moved aside by a killed run is back before the checks
    try:
        path, shape = validate_options(dest, overwrite=overwrite, source_path=source.path, **options)
    except DatasetError as error:
        raise DatasetError("; ".join([str(error), *cleaned])) from None
    summary = Summary(str(dest), source.description, class_names=source.class_names, notes=[*source.notes, *cleaned])
    total = source.size if max_images is None else min(source.size or max_images, max_images)
    items = source.items()
    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        with dataset_writer(path) as write:
            for item in items:
                image = _load(item, summary, skip_bad)
                if image is None:
                    continue
                image = shape(set_channels(image, channels, item.name), item.name)
                _check_consistent(summary, item, image)
                write(archive_name(summary.num_images), _png_bytes(image))
                if summary.labels is not None:
                    summary.labels.append(int(item.label))
                summary.num_images += 1
                bar.update()
                if summary.num_images == max_images:
                    break
            if summary.num_images == 0:
                reason = f"all {summary.skipped} images were unreadable" if summary.skipped else "it holds no images"
                raise DatasetError(f"nothing to write from {source.description}: {reason}")
            summary.notes += _power_of_two_note(summary.resolution[0])
            names = None if summary.labels is None else [(archive_name(i), c) for i, c in enumerate(summary.labels)]
            write(LABELS_FILE, labels_json(names).encode())
    finally:
        bar.close()
        if hasattr(items, "close"):
            items.close()  # a generator's files (ZIP, tarball, LMDB) close now
    return summary
