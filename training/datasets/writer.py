"""The atomic dataset writer: a ZIP or folder appears at its destination complete, or not at all.

Writing goes to a hidden temporary beside the destination, is synced to disk, and is renamed into
place only when every file is written; see training/datasets/format.py for what is written.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from training.datasets.format import DatasetError


def check_destination(dest: str | os.PathLike, *, overwrite: bool, source: str | None = None) -> Path:
    """Validate --dest: not empty, not an existing dataset (unless `overwrite`), never the source itself."""
    if not str(dest).strip():
        raise DatasetError("--dest must name a .zip file or a folder")
    path = Path(dest).expanduser()
    if path.suffix.lower() == ".zip" and path.is_dir():
        raise DatasetError(f"--dest {dest} ends in .zip but is a folder; name the ZIP differently or remove the folder")
    if path.exists() or path.is_symlink():
        empty_dir = path.is_dir() and not any(path.iterdir())
        if not empty_dir and not overwrite:
            raise DatasetError(f"--dest {dest} already exists; pass --overwrite to replace it, or choose another")
    if source is not None:
        src, dst = Path(source).resolve(), path.resolve()
        if src == dst or dst in src.parents:
            raise DatasetError(f"--dest {dest} would replace the source {source}; choose a --dest outside the source")
    return path


@contextlib.contextmanager
def dataset_writer(dest: str | os.PathLike) -> Iterator[Callable[[str, bytes], None]]:
    """Yield write(name, data) into a temporary ZIP or folder beside `dest`, renamed onto `dest` on success.

    The ZIP is uncompressed (PNGs do not shrink) with fixed timestamps, so equal inputs give equal
    bytes. The output is synced to disk before the rename; on any error the temporary is removed and
    `dest` is left as it was. A killed process leaves only a hidden `.tmp-*` entry.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".tmp-{dest.name}.{secrets.token_hex(4)}")
    try:
        if dest.suffix.lower() == ".zip":
            with open(tmp, "xb") as f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                    yield lambda name, data: zf.writestr(_zip_info(name), data)
                f.flush()
                os.fsync(f.fileno())
        else:
            tmp.mkdir()
            yield functools.partial(_write_file, tmp)
            if hasattr(os, "sync"):
                os.sync()  # one flush for all files; an fsync per file would cost hours for a million images
        _replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _write_file(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _replace(tmp: Path, dest: Path) -> None:
    """Rename `tmp` onto `dest`, moving an existing `dest` aside first and deleting it afterwards."""
    old = None
    if dest.exists() or dest.is_symlink():
        old = dest.with_name(f".tmp-{dest.name}.old-{secrets.token_hex(4)}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        raise
    if old is not None:
        _remove(old)
    with contextlib.suppress(OSError):  # make the rename durable (not every platform opens folders)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
