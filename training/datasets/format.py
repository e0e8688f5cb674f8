"""The dataset format (EDM/StyleGAN): names, labels file and pixel layout.

A dataset is an uncompressed ZIP, or a folder, of PNG images that all have the same resolution and
channel count, named `00000/img00000000.png` (1000 per subfolder), plus an optional `dataset.json`:

    {"labels": [["00000/img00000000.png", 6], ["00000/img00000001.png", 9], ...]}

or `{"labels": null}` when unlabelled.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import PurePosixPath

import numpy as np
import PIL.Image
import PIL.ImageOps

LABELS_FILE = "dataset.json"
IMAGES_PER_FOLDER = 1000
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a picture is to be turned for viewing
MAX_CLASSES = 2**20  # class indices are below this: a one-hot label of 2**20 floats is 4 MiB per image


class DatasetError(ValueError):
    """A dataset or a dataset source is unusable; the message says what is wrong and what to do."""


def archive_name(index: int) -> str:
    """The name of image `index` inside a dataset: 1234 -> '00001/img00001234.png'."""
    return f"{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.png"


def _readable_extensions() -> frozenset[str]:
    """File extensions of the image formats PIL can open ('.png', '.jpg', ...)."""
    PIL.Image.init()
    return frozenset(ext for ext, fmt in PIL.Image.registered_extensions().items() if fmt in PIL.Image.OPEN)


def is_image_name(name: str) -> bool:
    """True for a relative name with an image extension and no hidden part ('.x', '__MACOSX')."""
    path = PurePosixPath(name.replace("\\", "/"))
    if any(part.startswith(".") or part == "__MACOSX" for part in path.parts):
        return False
    return path.suffix.lower() in _readable_extensions()


def list_files(root: str | os.PathLike) -> list[str]:
    """The '/'-separated names, relative to `root`, of every file below it, through symbolic links to folders.

    A folder it cannot list is an error, and so is a folder reached twice (a link to a folder that contains it, a
    loop, or two links to one folder): its images would be read again and again, or twice.
    """

    def fail(error: OSError) -> None:
        elsewhere = "" if os.path.abspath(error.filename) == os.path.abspath(root) else f", or move it out of {root}"
        raise DatasetError(f"cannot list {error.filename} ({error.strerror or error}); make it readable{elsewhere}")

    names, reached = [], {os.path.realpath(root): os.fspath(root)}
    for folder, dirs, files in os.walk(root, onerror=fail, followlinks=True):
        here = os.path.realpath(folder)
        for name in dirs:
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if here == real or here.startswith(real + os.sep):
                why = f"a symbolic link to {real}, a folder that contains it"
            elif real in reached:
                why = f"the same folder as {reached[real]} (one of them a symbolic link)"
            else:
                reached[real] = path
                continue
            raise DatasetError(f"{path} is {why}: its images would be read more than once; remove the link")
        names.extend(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/") for name in files)
    return names


def upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """`image` as viewers show it: turned by its EXIF orientation (a camera's JPEG, say), which is then dropped."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return PIL.ImageOps.exif_transpose(image) if orientation not in (1, None) else image


def labels_json(labels: list[tuple[str, int]] | None) -> str:
    """The text of dataset.json: {"labels": [[name, int], ...]} or {"labels": null}."""
    return json.dumps({"labels": None if labels is None else [[name, int(label)] for name, label in labels]})


def check_class_index(label: int, where: str) -> None:
    """A class index must lie in 0..MAX_CLASSES-1: training one-hot encodes it, so 10**12 would ask for terabytes."""
    if not 0 <= label < MAX_CLASSES:
        raise DatasetError(
            f"{where} has class index {label}, but class indices must lie in 0..{MAX_CLASSES - 1} (labels are "
            "one-hot encoded); renumber the classes 0..K-1"
        )


def parse_labels_json(text: str | bytes, where: str) -> dict[str, int] | None:
    """Read dataset.json text into {name: class index}, or None for "labels": null; `where` names the file."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{where} is not valid JSON ({error}); fix it or delete it") from None
    if not isinstance(data, dict) or "labels" not in data:
        raise DatasetError(f'{where} must be an object with a "labels" key: {{"labels": [["name.png", 3], ...]}}')
    entries = data["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DatasetError(f'{where}: "labels" must be a list of [name, class index] pairs or null')
    labels: dict[str, int] = {}
    for i, entry in enumerate(entries):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
        if not ok or isinstance(entry[1], bool) or not isinstance(entry[1], int) or entry[1] < 0:
            raise DatasetError(
                f'{where}: labels entry {i} is {json.dumps(entry)[:80]}; expected ["name.png", class index >= 0]'
            )
        check_class_index(entry[1], f"{where}: labels entry {i}")
        name = entry[0].replace("\\", "/")
        if name in labels:
            raise DatasetError(f"{where}: {name!r} is labelled twice (entries of the same name)")
        labels[name] = entry[1]
    return labels


PNG_HEADER_BYTES = 26  # signature, IHDR length and type, width, height, bit depth, colour type


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every complete PNG


def png_complete(tail: bytes) -> bool:
    """Whether a PNG file's last len(PNG_END) bytes are its closing IEND chunk (a truncated file's are not)."""
    return tail == PNG_END


def png_shape(head: bytes) -> tuple[int, int, int] | None:
    """[C, H, W] of an 8-bit grayscale or RGB PNG from its first PNG_HEADER_BYTES bytes; None for anything else."""
    if len(head) < PNG_HEADER_BYTES or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", head[16:PNG_HEADER_BYTES])
    channels = {(8, 0): 1, (8, 2): 3}.get((depth, colour))  # PIL's 'L' and 'RGB'; other kinds need PIL to tell
    return None if channels is None else (channels, height, width)


def image_channels(mode: str, where: str) -> int:
    """1 for PIL mode 'L', 3 for 'RGB'; any other mode is an error, since datasets hold 8-bit grayscale or RGB."""
    if mode not in ("L", "RGB"):
        raise DatasetError(
            f"{where} is a {mode} image; datasets hold 8-bit grayscale or RGB PNGs. "
            "Rebuild it with dataset_tool.py (--channels=rgb or --channels=gray converts)"
        )
    return 1 if mode == "L" else 3


def image_array(image: PIL.Image.Image, where: str) -> np.ndarray:
    """An 8-bit grayscale ('L') or RGB PIL image as a uint8 CHW array."""
    image_channels(image.mode, where)
    array = np.asarray(image, dtype=np.uint8)
    return array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)
