"""Sources, transforms and the writer behind dataset_tool.py.

`open_source` recognises a source by its content (a folder of images, an LSUN LMDB folder, a ZIP,
the CIFAR-10 python tarball, an MNIST idx(.gz) images file, or `embedded:shapes|digits`) and returns a
`Source` whose items are decoded one at a time. `convert_dataset` streams them through the channel
conversion and the crop/resize transform into a dataset (training/dataset.py describes the format),
written under a temporary name beside the destination and renamed into place only when complete.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import io
import os
import pickle
import re
import struct
import sys
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
from tqdm import tqdm

from training.dataset_transforms import CHANNELS, Transform, make_transform, set_channels
from training.dataset import (
    LABELS_FILE,
    DatasetError,
    archive_name,
    check_destination,
    dataset_writer,
    is_image_name,
    labels_json,
    parse_labels_json,
)

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric

EMBEDDED_PREFIX = "embedded:"
SOURCE_KINDS = (
    "an image folder, a ZIP, cifar-10-python.tar.gz, train-images-idx3-ubyte(.gz), an LSUN LMDB folder "
    "or embedded:shapes|digits"
)
_MAX_EXAMPLES = 5  # skipped files named in the summary


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


# ----------------------------------------------------------------------------------------------
# Decoding helpers shared by the sources.


def _image_from_array(array: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.ascontiguousarray(array))


def _image_from_bytes(data: bytes) -> PIL.Image.Image:
    image = PIL.Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated or corrupt file fails here, not later
    return image


def _image_from_file(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        image.load()
    return image


def _sort_key(name: str) -> list[str]:
    return name.split("/")  # folder by folder, as sorting paths does


# ----------------------------------------------------------------------------------------------
# Sources.


def open_source(spec: str, *, labels_from_folders: bool = False) -> Source:
    """Open --source (a path or 'embedded:NAME'), detecting its kind from its content."""
    if spec.startswith(EMBEDDED_PREFIX):
        kind, path = "embedded", None
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DatasetError(f"--source {spec} does not exist; give {SOURCE_KINDS}")
        kind = detect_source(path)
    if labels_from_folders and kind not in ("folder", "zip"):
        raise DatasetError(f"--labels-from-folders applies to image folders and ZIPs, not to {spec} ({kind})")
    if path is None:
        from training.dataset_embedded import embedded_source  # generated data: numpy only, on demand

        return embedded_source(spec[len(EMBEDDED_PREFIX) :])
    if kind in ("folder", "zip"):
        return _named_images(path, kind, labels_from_folders)
    return {"lmdb": _lmdb, "mnist": _mnist, "cifar10": _cifar10}[kind](path)


def detect_source(path: Path) -> str:
    """What a source path holds, judged by content: 'folder', 'lmdb', 'zip', 'mnist' or 'cifar10'."""
    if path.is_dir():
        return "lmdb" if (path / "data.mdb").is_file() else "folder"
    head = _head(path)
    if head[:3] == b"\0\0\x08":  # idx: two zero bytes, type 0x08 (uint8), number of dimensions
        if head[3] == 3:
            return "mnist"
        raise DatasetError(
            f"{path} is an idx file of {head[3]} dimension(s), not of images (the labels file?); "
            "give the images file, e.g. train-images-idx3-ubyte.gz (its labels are found beside it)"
        )
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "cifar10"
    if is_image_name(path.name):
        raise DatasetError(f"{path} is a single image; --source takes a folder of images (or {SOURCE_KINDS})")
    raise DatasetError(f"cannot tell what {path} holds; --source takes {SOURCE_KINDS}")


def _head(path: Path) -> bytes:
    """The first 4 bytes of a file, decompressed when it is gzip."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error), gzip.open(path, "rb") as f:
            head = f.read(4)
    return head


def _named_images(path: Path, kind: str, labels_from_folders: bool) -> Source:
    """An image folder (recursive) or a ZIP of images, labelled from dataset.json or subfolders."""
    if kind == "folder":
        names = [
            os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
            for root, _dirs, files in os.walk(path, followlinks=True)
            for f in files
        ]
        has_json = (path / LABELS_FILE).is_file()
        read_json = (path / LABELS_FILE).read_bytes
    else:
        with _open_zip(path) as zf:
            names = [info.filename for info in zf.infolist() if not info.is_dir()]
        has_json = LABELS_FILE in names
        read_json = functools.partial(_read_zip_member_once, path, LABELS_FILE)
    images = sorted((n for n in names if is_image_name(n)), key=_sort_key)
    if not images:
        raise DatasetError(f"no images in {path} (looked in all subfolders for .png, .jpg, .webp, ... files)")
    table = parse_labels_json(read_json(), f"{path}/{LABELS_FILE}") if has_json else None
    labels, classes, notes = _resolve_labels(images, table, str(path), labels_from_folders)

    def items() -> Iterator[SourceItem]:
        with contextlib.ExitStack() as stack:
            zf = stack.enter_context(_open_zip(path)) if kind == "zip" else None
            for n in images:
                load = functools.partial(_image_from_file, path / n) if zf is None else _zip_loader(zf, n)
                yield SourceItem(f"{path}/{n}", None if labels is None else labels[n], load)

    what = "image folder" if kind == "folder" else "ZIP"
    return Source(f"{what} {path}", len(images), items, str(path), classes, notes)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(f"cannot open the ZIP {path} ({error}); it may be truncated: copy it again") from None


def _read_zip_member_once(path: Path, name: str) -> bytes:
    with _open_zip(path) as zf:
        return zf.read(name)


def _zip_loader(zf: zipfile.ZipFile, name: str) -> Callable[[], PIL.Image.Image]:
    return lambda: _image_from_bytes(zf.read(name))


def _resolve_labels(
    images: list[str], table: dict[str, int] | None, where: str, from_folders: bool
) -> tuple[dict[str, int] | None, list[str] | None, list[str]]:
    """Labels {name: class} from dataset.json or from top-level subfolders; also class names and notes."""
    folders = sorted({n.split("/", 1)[0] for n in images if "/" in n})
    if from_folders:
        if table is not None:
            raise DatasetError(
                f"{where} has labels in {LABELS_FILE} and --labels-from-folders was given; use one of them "
                f"(drop the option, or remove {LABELS_FILE})"
            )
        loose = [n for n in images if "/" not in n]
        if loose:
            raise DatasetError(
                f"--labels-from-folders: {loose[0]} is not in a class subfolder ({len(loose)} images lie at the "
                f"top of {where}); move every image into one subfolder per class"
            )
        index = {name: i for i, name in enumerate(folders)}
        return {n: index[n.split("/", 1)[0]] for n in images}, folders, []
    if table is None:
        notes = []
        if len(folders) > 1 and not all(re.fullmatch(r"\d{5}", f) for f in folders):
            notes.append(f"no labels; the images lie in {len(folders)} subfolders: --labels-from-folders labels them")
        return None, None, notes
    missing = [n for n in images if n not in table]
    if missing:
        raise DatasetError(
            f"{where}/{LABELS_FILE} has no label for {missing[0]} ({len(missing)} of {len(images)} images lack one); "
            f"label every image, or remove {LABELS_FILE} for an unlabelled dataset"
        )
    return {n: table[n] for n in images}, None, []


def _lmdb(path: Path) -> Source:
    """An LSUN LMDB folder (values are encoded images; no labels). Needs the optional `lmdb` package."""
    try:
        import lmdb
    except ImportError:
        raise DatasetError(f"{path} is an LMDB database (LSUN); reading it needs lmdb: pip install lmdb") from None

    def open_env():
        try:
            return lmdb.open(str(path), readonly=True, lock=False, readahead=False)
        except lmdb.Error as error:
            raise DatasetError(f"cannot open the LMDB database {path} ({error})") from None

    env = open_env()
    try:
        size = int(env.stat()["entries"])
    finally:
        env.close()

    def items() -> Iterator[SourceItem]:
        env = open_env()
        try:
            with env.begin(write=False) as txn:
                for key, value in txn.cursor():
                    name = f"{path}[{bytes(key).decode('utf-8', 'replace')}]"
                    yield SourceItem(name, None, functools.partial(_image_from_bytes, bytes(value)))
        finally:
            env.close()

    return Source(f"LMDB database {path}", size, items, str(path))


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


def _mnist(path: Path) -> Source:
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
                yield SourceItem(f"{path}[{i}]", int(labels[i]), functools.partial(_image_from_array, array))

    return Source(f"MNIST {path} ({n} images, labels from {labels_path.name})", n, items, str(path))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only, so that reading a tarball can never run code."""

    _GLOBALS = {
        "_reconstruct": _np_multiarray._reconstruct,
        "scalar": _np_multiarray.scalar,
        "_frombuffer": _np_numeric._frombuffer,
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in self._GLOBALS:
            return self._GLOBALS[name]
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles written by Python 3
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")


def _cifar_batch(tar: tarfile.TarFile, member: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: images uint8 [N, 32, 32, 3] (HWC) and labels int64 [N]."""
    try:
        with tar.extractfile(member) as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, tarfile.TarError, ValueError, zlib.error) as error:
        raise DatasetError(f"cannot read {where}: {member} ({error}); download the tarball again") from None
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else {}
    data, labels = batch.get("data"), batch.get("labels")
    ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    if not ok or labels is None or len(labels) != len(data) or min(labels, default=0) < 0:
        raise DatasetError(f"{where}: {member} is not a CIFAR-10 batch ('data' uint8 [N, 3072] and N 'labels' >= 0)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.asarray(labels, dtype=np.int64)


def _cifar10(path: Path) -> Source:
    """The CIFAR-10 python tarball: the 5 training batches (50,000 images), labels kept, test_batch not used."""
    try:
        with tarfile.open(path) as tar:
            names = tar.getnames()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"cannot read the tarball {path} ({error}); download it again") from None
    batches = {int(m[1]): n for n in names if (m := re.search(r"(?:^|/)data_batch_([1-5])$", n))}
    missing = [f"data_batch_{b}" for b in range(1, 6) if b not in batches]
    if missing:
        raise DatasetError(
            f"{path} is a tar archive without {', '.join(missing)}: not the CIFAR-10 python version; download "
            "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
        )

    def items() -> Iterator[SourceItem]:
        with tarfile.open(path) as tar:
            for b in range(1, 6):
                images, labels = _cifar_batch(tar, batches[b], str(path))
                for i in range(len(labels)):
                    load = functools.partial(_image_from_array, images[i])
                    yield SourceItem(f"{path}: data_batch_{b}[{i}]", int(labels[i]), load)

    return Source(f"CIFAR-10 tarball {path} (data_batch_1..5; test_batch is not used)", None, items, str(path))


# ----------------------------------------------------------------------------------------------
# Conversion.


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
    except (DatasetError, MemoryError):
        raise
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
    path, shape = validate_options(dest, overwrite=overwrite, source_path=source.path, **options)
    summary = Summary(str(dest), source.description, class_names=source.class_names, notes=list(source.notes))
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
