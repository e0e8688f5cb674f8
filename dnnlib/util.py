"""EasyDict, parsing helpers, atomic file writes and cached downloads."""

from __future__ import annotations

import contextlib
import copy
import functools
import glob
import hashlib
import inspect
import os
import re
import secrets
import shutil
import socket
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


def parse_int_list(text: str | list[int], max_count: int | None = None) -> list[int]:
    """Parse '0-3,7,10-11' into [0, 1, 2, 3, 7, 10, 11]; a list passes through.

    With `max_count`, more values than that is a ValueError, raised before any list is built.
    """
    if isinstance(text, list):
        return list(text)
    parts: list[range] = []
    for part in text.split(","):
        part = part.strip()
        match = _RANGE.match(part)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ValueError(f"range {part!r} ends before it starts; write it as {hi}-{lo}")
            parts.append(range(lo, hi + 1))
        elif part.isdigit():
            parts.append(range(int(part), int(part) + 1))
        else:
            raise ValueError(f"cannot read {part!r} in {text!r}: use non-negative integers and ranges such as 0-63,100")
    count = sum(len(r) for r in parts)
    if max_count is not None and count > max_count:
        raise ValueError(f"{text!r} lists {count:,} values; at most {max_count:,} are taken at once: split it")
    return [value for r in parts for value in r]


# ----------------------------------------------------------------------------------------------
# Files: atomic writes and cached downloads.


_TEMP_PREFIX = ".tmp-"


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh name beside `path` for writing it: `.tmp-<name>.<host>.<pid>.<random>`, hidden from loaders.

    The host and process id let `stale_temporaries` tell a leftover of a killed writer from a live one.
    """
    path = Path(path)
    return path.with_name(f"{_TEMP_PREFIX}{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")


def _writer_alive(temp: Path, name: str) -> bool:
    """Whether the process that made `temp` (a `temporary_path` of `name`) may still be writing it."""
    rest = temp.name[len(_TEMP_PREFIX) + len(name) + 1 :]
    host, _, pid = rest.rpartition(".")[0].rpartition(".")  # <host>.<pid>.<random>; a host name may hold dots
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine's, or not named by this program: leave it
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # the process exists but belongs to someone else
        return True
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files or folders of `path` (`temporary_path`) whose writer, on this machine, is no longer running."""
    path = Path(path)
    prefix = f"{_TEMP_PREFIX}{path.name}."
    found = [p for p in path.parent.glob(f"{glob.escape(prefix)}*") if p.name.startswith(prefix)]
    return [p for p in found if not _writer_alive(p, path.name)]


def remove(path: Path) -> None:
    """Remove a file or a folder tree; nothing if it is gone already."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Open a temporary file beside `path`; on success fsync it and rename it onto `path`.

    On any error (a signal turned into an exception included) the temporary file is removed and `path`
    is left as it was, so a reader never sees a half-written file. A killed process leaves only a
    `.tmp-*` file that no loader picks up and that `stale_temporaries` finds.
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "x" + mode.replace("w", "")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if error.errno is None or error.filename is not None and str(path) in str(error):
            raise
        kept = "its previous version is kept" if path.exists() else "nothing was written"
        raise OSError(error.errno, f"{error.strerror} while writing {path} ({kept})") from error
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def check_output(path: str | os.PathLike, flag: str, overwrite: bool = False) -> Path:
    """Check, before any work, that the output file `path` can be written; ValueError saying what to do.

    Its folder must exist and take a new file, it must not be a folder, and an existing file is replaced
    only with `overwrite` (the CLI's --overwrite). `flag` names the option in messages ('--dest').
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag}={path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise ValueError(f"{flag}={path} exists; pass --overwrite to replace it, or choose another name")
    if not path.parent.is_dir():
        raise ValueError(f"{flag}={path}: its folder does not exist; create {path.parent} or choose another path")
    probe = temporary_path(path)
    try:
        probe.touch(exist_ok=False)
    except OSError as error:
        raise ValueError(f"{flag}={path} cannot be written ({error.strerror or error}); choose another folder") from None
    probe.unlink()
    return path


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class DirectoryLock:
    """An exclusive lock on a directory (a `.lock` file in it, flock'ed), held until `release` or the process ends,
    however it ends (the kernel drops the lock of a killed process). The file names its holder (host and pid).
    On file systems without flock (some NFS mounts) the lock is not taken and `held` says so."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / ".lock"
        self.file, self.held = None, False

    def acquire(self) -> None:
        """Take the lock; ValueError naming the holder when another process has it."""
        import fcntl
        import socket

        self.file = open(self.path, "a+")  # noqa: SIM115 (kept open: the lock lives as long as the file)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise ValueError(f"{self.path.parent} is in use by {holder}: wait for it to end, or give another --outdir "
                             "(two runs in one directory would interleave their stats and overwrite their snapshots)") from None
        except OSError:  # no flock here: run unlocked rather than not at all
            return
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"train.py (pid {os.getpid()} on {socket.gethostname()})\n")
        self.file.flush()
        self.held = True

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file, self.held = None, False


def is_url(path_or_url: str | os.PathLike) -> bool:
    """True for http(s):// addresses."""
    return isinstance(path_or_url, str) and re.match(r"^https?://", path_or_url) is not None


def cache_dir() -> Path:
    """Where downloads are kept: $PFGMPP_CACHE_DIR, else $XDG_CACHE_HOME/pfgmpp, else ~/.cache/pfgmpp."""
    if os.environ.get("PFGMPP_CACHE_DIR"):
        return Path(os.environ["PFGMPP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pfgmpp"


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
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise DownloadError(f"could not download {url}: the server answered {status} ({error.response.reason}); check the "
                                    "address, or download the file by hand and pass its local path") from None
            last_error = error  # 5xx, timeouts, throttling: worth another attempt
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


@functools.lru_cache(maxsize=4096)
def _content_identity(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return f"sha256:{sha256_of(Path(path))}"


def content_identity(path_or_url: str | os.PathLike) -> str:
    """What identifies a file's contents in records (cached results): 'sha256:<hex>' of a local file (hashed once per
    size and modification time in a process), a URL as it is (its cache holds one version), a folder's absolute
    path (a dataset folder is not hashed)."""
    if is_url(path_or_url):
        return str(path_or_url)
    path = Path(path_or_url).expanduser().absolute()
    if not path.is_file():
        return str(path)
    stat = path.stat()
    return _content_identity(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


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
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a file: give a file in it (for a run directory, one of its "
                         "network-snapshot-*.pt)")
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
