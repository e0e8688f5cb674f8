"""The registry of dataset source kinds, and `open_source`, which picks one for --source.

Adding a kind of source is one module (a `SourceKind`: how to recognise it, how to open it), its import
and one line in SOURCES. SOURCES lists the kinds in the order messages name them, and detection tries them in
that order, except that containers (any folder, ZIP or tar) come after the kinds recognised by a mark
of their own: an LSUN database is also a folder, and an idx file must not be taken for a ZIP.
"""

from __future__ import annotations

from pathlib import Path

from training.datasets.cifar10 import CIFAR10_KIND
from training.datasets.embedded import EMBEDDED_KIND
from training.datasets.embedded import PREFIX as EMBEDDED_PREFIX
from training.datasets.folder import FOLDER_KIND, ZIP_KIND
from training.datasets.format import DatasetError, is_image_name
from training.datasets.lsun import LSUN_KIND
from training.datasets.mnist import MNIST_KIND
from training.datasets.source import Source, SourceKind

SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (
    FOLDER_KIND,
    ZIP_KIND,
    CIFAR10_KIND,
    MNIST_KIND,
    LSUN_KIND,
    EMBEDDED_KIND,
)}


def kinds_phrase() -> str:
    """The kinds --source may be, as messages list them: 'an image folder, a ZIP, ... or embedded:shapes|digits'."""
    named = [kind.description for kind in SOURCES.values()]
    return ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else "".join(named)


def detect_source(path: Path) -> str:
    """What a source path holds, judged by content: the name of its kind ('folder', 'lmdb', 'zip', 'mnist', ...)."""
    for kind in sorted(SOURCES.values(), key=lambda kind: kind.container):  # stable: registry order otherwise
        if kind.detect(path):
            return kind.name
    if is_image_name(path.name):
        raise DatasetError(f"{path} is a single image; --source takes a folder of images (or {kinds_phrase()})")
    raise DatasetError(f"cannot tell what {path} holds; --source takes {kinds_phrase()}")


def open_source(spec: str, *, labels_from_folders: bool = False) -> Source:
    """Open --source (a path or 'embedded:NAME'), detecting its kind from its content."""
    target: Path | str
    if spec.startswith(EMBEDDED_PREFIX):
        kind, target = EMBEDDED_KIND, spec[len(EMBEDDED_PREFIX) :]
    else:
        target = Path(spec).expanduser()
        if not target.exists():
            raise DatasetError(f"--source {spec} does not exist; give {kinds_phrase()}")
        kind = SOURCES[detect_source(target)]
    if labels_from_folders and not kind.labels_from_folders:
        raise DatasetError(f"--labels-from-folders applies to image folders and ZIPs, not to {spec} ({kind.name})")
    return kind.open(target, labels_from_folders)
