"""Image folders (searched recursively) and ZIPs of images, labelled from dataset.json or subfolders."""

from __future__ import annotations

import contextlib
import functools
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import PIL.Image

from training.datasets.format import LABELS_FILE, DatasetError, is_image_name, list_files, parse_labels_json
from training.datasets.source import Source, SourceItem, SourceKind, image_from_bytes, image_from_file


def _sort_key(name: str) -> list[str]:
    return name.split("/")  # folder by folder, as sorting paths does


def open_image_source(path: Path, labels_from_folders: bool, *, kind: str) -> Source:
    """An image folder (recursive; kind "folder") or a ZIP of images ("zip"), labelled by dataset.json or subfolders."""
    if kind == "folder":
        names = list_files(path)
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
                load = functools.partial(image_from_file, path / n) if zf is None else _zip_loader(zf, n)
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
    return lambda: image_from_bytes(zf.read(name))


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


FOLDER_KIND = SourceKind(
    "folder",
    "an image folder",
    detect=lambda path: path.is_dir(),
    open=functools.partial(open_image_source, kind="folder"),
    labels_from_folders=True,
    container=True,
)
ZIP_KIND = SourceKind(
    "zip",
    "a ZIP",
    detect=lambda path: not path.is_dir() and zipfile.is_zipfile(path),
    open=functools.partial(open_image_source, kind="zip"),
    labels_from_folders=True,
    container=True,
)
