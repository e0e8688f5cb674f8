"""EasyDict, parsing helpers, atomic file writes and cached downloads."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any


class EasyDict(dict):
    """A dict whose items are also attributes: `d.lr` is `d['lr']`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


_RANGE = re.compile(r"^(\d+)-(\d+)$")


def parse_int_list(text: str | list[int]) -> list[int]:
    """Parse '0-3,7,10-11' into [0, 1, 2, 3, 7, 10, 11]; a list passes through."""
    if isinstance(text, list):
        return list(text)
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = _RANGE.match(part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ValueError(f"range {part!r} ends before it starts; write it as {hi}-{lo}")
            values.extend(range(lo, hi + 1))
        elif part.isdigit():
            values.append(int(part))
        else:
            raise ValueError(f"cannot read {part!r} in {text!r}: use non-negative integers and ranges such as 0-63,100")
    return values


# ----------------------------------------------------------------------------------------------
# Files: atomic writes and cached downloads.


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path`; on success fsync it and rename it onto `path`.

    On any error the temporary file is removed and `path` is left as it was, so a reader never sees
    a half-written file (a killed process leaves only a `.tmp-*` file that no loader picks up).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_url(path_or_url: str | os.PathLike) -> bool:
    """True for http(s):// addresses."""
    return isinstance(path_or_url, str) and re.match(r"^https?://", path_or_url) is not None


def cache_dir() -> Path:
    """Where downloads are kept: $PFGMPP_CACHE_DIR, else ~/.cache/pfgmpp."""
    return Path(os.environ.get("PFGMPP_CACHE_DIR") or Path.home() / ".cache" / "pfgmpp")


class DownloadError(ValueError):
    """A download failed or did not verify; the message says what to do."""


def download(
    url: str,
    *,
    sha256: str | None = None,
    cache: str | os.PathLike | None = None,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> Path:
    """Fetch `url` once into the cache and return the local file; later calls reuse it.

    The body is streamed to a temporary file, checked against Content-Length and `sha256` (when
    given), then renamed into place, so the cache never holds a partial file. Failures are retried
    `attempts` times with exponential back-off.
    """
    import requests  # deferred: only downloads need it

    name = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1].split("?")[0]) or "download"
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.is_file() and (sha256 is None or sha256_of(target) == sha256.lower()):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    last_error: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            _fetch(requests, url, target, sha256, timeout_s, progress)
            return target
        except DownloadError as error:
            if "SHA-256" in str(error):
                raise  # the server sends the wrong file: retrying will not help
            last_error = error
        except requests.RequestException as error:
            last_error = error
    raise DownloadError(
        f"could not download {url} after {attempts} attempts ({last_error}); check the address and the "
        f"network, or download the file by hand and pass its local path"
    )


def _fetch(requests, url: str, target: Path, sha256: str | None, timeout_s: float, progress: bool) -> None:
    from tqdm import tqdm  # deferred with requests

    with requests.get(url, stream=True, timeout=timeout_s) as response:
        response.raise_for_status()
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected and expected.isdigit() else None
        digest, size = hashlib.sha256(), 0
        bar = tqdm(total=expected, unit="B", unit_scale=True, desc=target.name, disable=not progress, leave=False)
        with bar, atomic_write(target) as f:
            for block in response.iter_content(chunk_size=1 << 20):
                f.write(block)
                digest.update(block)
                size += len(block)
                bar.update(len(block))
            if expected is not None and size != expected:
                raise DownloadError(f"{url}: received {size} bytes, expected {expected}")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise DownloadError(
                    f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256.lower()}; "
                    "the file at that address is not the one this program knows"
                )


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_path(path_or_url: str | os.PathLike, **download_kwargs) -> Path:
    """A local file for a path or an http(s) URL (downloaded into the cache); errors if missing."""
    if is_url(path_or_url):
        return download(str(path_or_url), **download_kwargs)
    path = Path(path_or_url).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Constructor arguments, recorded so an object can be rebuilt from a configuration.


def records_init_kwargs(cls: type) -> type:
    """Class decorator: the outermost constructor call stores its arguments in `self.init_kwargs`.

    Positional arguments are stored by name and `**kwargs` are flattened, so that
    `type(obj)(**obj.init_kwargs)` rebuilds the object. Values are deep-copied except modules.
    """
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "init_kwargs" not in self.__dict__:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            recorded: dict[str, Any] = {}
            for name, value in list(bound.arguments.items())[1:]:
                kind = signature.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    recorded.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        raise TypeError(f"{cls.__name__} records keyword arguments only; got extra positional {value}")
                else:
                    recorded[name] = value
            copied = {k: v if _is_module(v) else copy.deepcopy(v) for k, v in recorded.items()}
            object.__setattr__(self, "init_kwargs", copied)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def _is_module(value: Any) -> bool:
    return any(c.__name__ == "Module" and c.__module__.startswith("torch.nn") for c in type(value).__mro__)
