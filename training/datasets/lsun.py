"""LSUN LMDB folders: values are encoded images, keys their names; no labels. Needs the optional `lmdb`."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

from training.datasets.format import DatasetError
from training.datasets.source import Source, SourceItem, SourceKind, image_from_bytes


def open_lmdb(path: Path) -> Source:
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
                    yield SourceItem(name, None, functools.partial(image_from_bytes, bytes(value)))
        except lmdb.Error as error:  # a corrupt or truncated database, found while reading it
            raise DatasetError(f"cannot read the LMDB database {path} ({error}); copy or download it again") from None
        finally:
            env.close()

    return Source(f"LMDB database {path}", size, items, str(path))


LSUN_KIND = SourceKind(
    "lmdb",
    "an LSUN LMDB folder",
    detect=lambda path: path.is_dir() and (path / "data.mdb").is_file(),
    open=lambda path, labels_from_folders: open_lmdb(path),
)
