"""The atomic dataset writer: a ZIP or folder appears at its destination complete, or not at all.

Writing goes to a hidden temporary beside the destination (`dnnlib.util.temporary_path`: it names the
host and process, so a leftover of a killed writer can be told from a live one), is synced to disk,
and is renamed into place only when every file is written; see training/datasets/format.py for what
is written. `remove_stale_temporaries` clears what killed writers left.
"""

from __future__ import annotations

import contextlib
import functools
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from dnnlib import util
from training.datasets.format import DatasetError

OLD_PREFIX = ".old-"  # an existing dataset waits under temporary_path(".old-<name>") while its successor moves in


def check_destination(dest: str | os.PathLike, *, overwrite: bool, source: str | None = None) -> Path:
    """Validate --dest: not empty, not an existing dataset (unless `overwrite`), never the source itself nor inside
    a source folder."""
    if not str(dest).strip():
        raise DatasetError("--dest must name a .zip file or a folder")
    path = Path(dest).expanduser()
    if path.suffix.lower() == ".zip" and path.is_dir():
        raise DatasetError(f"--dest {dest} ends in .zip but is a folder; name the ZIP differently or remove the folder")
    if path.exists() or path.is_symlink():
        empty_dir = path.is_dir() and not any(path.iterdir())
        if not empty_dir and not overwrite:
            raise DatasetError(f"--dest {dest} already exists; pass --overwrite to replace it, or choose another")
    folder = path.parent
    while not (folder.exists() or folder.is_symlink()):
        folder = folder.parent  # the writer creates the missing folders below the first existing one
    if not folder.is_dir():
        raise DatasetError(f"--dest {dest}: {folder} is a file, not a folder; choose another --dest")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DatasetError(f"--dest {dest}: cannot write in {folder} (no permission, or read-only); choose another one")
    if source is not None:
        src, dst = Path(source).resolve(), path.resolve()
        if src == dst or dst in src.parents:
            raise DatasetError(f"--dest {dest} would replace the source {source}; choose a --dest outside the source")
        if src.is_dir() and src in dst.parents:
            raise DatasetError(f"--dest {dest} lies inside the source folder {source}: a later run would read this "
                               "output as images of the source; choose a --dest outside the source")
    return path


def remove_stale_temporaries(dest: str | os.PathLike) -> list[str]:
    """Clear what killed writers of `dest` left beside it; return notes saying what was done.

    Temporaries whose writer on this machine has ended are removed. A dataset that a killed writer had
    moved aside (see `_replace`) is removed when `dest` is in place, and otherwise renamed back onto `dest`.
    """
    dest = Path(dest).expanduser()
    if not dest.name or not dest.parent.is_dir():
        return []
    notes = []
    stale = util.stale_temporaries(dest)
    for path in stale:
        util.remove(path)
    if stale:
        names = ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else "")
        notes.append(f"removed {len(stale)} temporaries left beside {dest} by interrupted runs ({names})")
    for old in sorted(util.stale_temporaries(_old_name(dest)), key=lambda p: p.lstat().st_mtime, reverse=True):
        if dest.exists() or dest.is_symlink():
            util.remove(old)
            notes.append(f"removed {old.name}, the previous {dest.name} an interrupted run had replaced")
        else:
            os.replace(old, dest)
            notes.append(f"restored {dest} from {old.name}, where an interrupted run had moved it aside")
    return notes


@contextlib.contextmanager
def dataset_writer(dest: str | os.PathLike) -> Iterator[Callable[[str, bytes], None]]:
    """Yield write(name, data) into a temporary ZIP or folder beside `dest`, renamed onto `dest` on success.

    The ZIP is uncompressed (PNGs do not shrink) with fixed timestamps, so equal inputs give equal
    bytes. The output is synced to disk before the rename; on any error (a signal that
    `training.cli.exit_on_signals` turns into an exit included) the temporary is removed and `dest` is
    left as it was. A killed process leaves only a hidden `.tmp-*` entry, which `remove_stale_temporaries`
    clears.
    """
    dest = Path(dest)
    tmp = util.temporary_path(dest)
    is_zip = dest.suffix.lower() == ".zip"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        f = open(tmp, "xb") if is_zip else tmp.mkdir()
    except OSError as error:
        raise DatasetError(f"cannot write {dest} ({error.strerror or error}); choose a --dest you can write") from None
    try:
        if is_zip:
            with f:
                with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
                    yield lambda name, data: zf.writestr(_zip_info(name), data)
                f.flush()
                os.fsync(f.fileno())
        else:
            yield functools.partial(_write_file, tmp)
            if hasattr(os, "sync"):
                os.sync()  # one flush for all files; an fsync per file would cost hours for a million images
        _replace(tmp, dest)
    except BaseException:
        util.remove(tmp)
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


def _old_name(dest: Path) -> Path:
    return dest.with_name(OLD_PREFIX + dest.name)


def _replace(tmp: Path, dest: Path) -> None:
    """Rename `tmp` onto `dest`, moving an existing `dest` aside first and deleting it afterwards."""
    old = None
    try:
        if dest.exists() or dest.is_symlink():
            old = util.temporary_path(_old_name(dest))  # not a temporary of `dest`: never removed as one
            os.replace(dest, old)
        os.replace(tmp, dest)
    except BaseException:
        if old is not None and (old.exists() or old.is_symlink()) and not (dest.exists() or dest.is_symlink()):
            os.replace(old, dest)
        raise
    if old is not None:
        util.remove(old)
    with contextlib.suppress(OSError):  # make the rename durable (not every platform opens folders)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
