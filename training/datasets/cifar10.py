"""The CIFAR-10 python tarball, read with an unpickler that accepts plain data and numpy arrays only."""

from __future__ import annotations

import codecs
import functools
import pickle
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from training.datasets.format import DatasetError
from training.datasets.source import Source, SourceItem, SourceKind, image_from_array

try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric


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


def open_cifar10(path: Path) -> Source:
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
                    load = functools.partial(image_from_array, images[i])
                    yield SourceItem(f"{path}: data_batch_{b}[{i}]", int(labels[i]), load)

    return Source(f"CIFAR-10 tarball {path} (data_batch_1..5; test_batch is not used)", None, items, str(path))


# Any tar archive is taken for CIFAR-10: opening it says what is missing if it is another one.
CIFAR10_KIND = SourceKind(
    "cifar10",
    "cifar-10-python.tar.gz",
    detect=lambda path: not path.is_dir() and tarfile.is_tarfile(path),
    open=lambda path, labels_from_folders: open_cifar10(path),
    container=True,
)
