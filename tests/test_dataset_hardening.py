"""Tests of the dataset code's guards: no silent wrong result, no traceback, no data lost.

16-bit images scaled (not clipped) to 8 bits, class indices bounded, a dataset's images checked from their
headers, output sizes that cannot fit refused before any image is read, temporaries removed after a signal
and stale ones of dead writers removed by the next conversion, and clean one-line errors for user mistakes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import types
import zipfile
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import psutil
import pytest

from tests.test_dataset import png_bytes, rgb_images, write_edm_dataset
from tests.test_dataset_tool import REPO, assert_clean_failure, folder_of, run_cli
from training.datasets import (
    MAX_CLASSES,
    DatasetError,
    ImageFolderDataset,
    Source,
    SourceItem,
    convert_dataset,
    parse_labels_json,
)

ALL_16BIT = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once


def png16_bytes(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): HxW gray, HxWx3 RGB or HxWx4 RGBA."""
    color_type = {1: 0, 3: 2, 4: 6}[1 if array.ndim == 2 else array.shape[2]]
    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def converted(tmp_path: Path, *args: str, source: Path) -> np.ndarray:
    """The images dataset_tool.py writes from `source`, as N x H x W x C uint8."""
    dest = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.zip"
    result = run_cli(f"--source={source}", f"--dest={dest}", *args)
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(dest)
    return np.stack([dataset[i][0] for i in range(len(dataset))]).transpose(0, 2, 3, 1)


def in_memory(tmp_path: Path, images: list[PIL.Image.Image], **kwargs) -> Path:
    """convert_dataset on PIL images made here (modes a PNG file cannot hold, such as "I" and "F")."""

    def items():
        for i, image in enumerate(images):
            yield SourceItem(f"img{i}", None, lambda image=image: image)

    dest = tmp_path / "memory.zip"
    convert_dataset(Source("test images", len(images), items), dest, **kwargs)
    return dest


# ----------------------------------------------------------------------------------------------
# 16-bit images: value * 255 / 65535, rounded (= value / 257, never a tie), for every --channels.


@pytest.mark.parametrize("channels", ["keep", "gray", "rgb"])
def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path, channels: str) -> None:
    src = folder_of(tmp_path, ("a-mid.png", np.full((8, 8), 32768, np.uint16)), ("b-all.png", ALL_16BIT))
    assert PIL.Image.open(src / "b-all.png").mode in ("I;16", "I")  # what PIL makes of a 16-bit grayscale PNG
    out = converted(tmp_path, f"--channels={channels}", "--resolution=256x256", "--transform=pad", source=src)
    assert out.shape[3] == (3 if channels == "rgb" else 1)
    assert (out[0][124:132, 124:132] == 128).all() and out[0].sum() == 128 * 64 * out.shape[3]  # 32768 / 257 = 127.5
    expected = np.rint(ALL_16BIT / 257.0).astype(np.uint8)
    for c in range(out.shape[3]):
        np.testing.assert_array_equal(out[1][:, :, c], expected)


@pytest.mark.parametrize("channels", ["keep", "gray", "rgb"])
def test_32bit_integer_images_in_the_16bit_range_are_scaled(tmp_path: Path, channels: str) -> None:
    """Older Pillow opens 16-bit grayscale PNGs as mode "I" (32-bit integers)."""
    image = PIL.Image.fromarray(ALL_16BIT.astype(np.int32))
    assert image.mode == "I"
    dataset = ImageFolderDataset(in_memory(tmp_path, [image], channels=channels))
    np.testing.assert_array_equal(dataset[0][0][0], np.rint(ALL_16BIT / 257.0).astype(np.uint8))


@pytest.mark.parametrize(
    "array, fragment",
    [
        (np.array([[0, 70000]], np.int32), "outside 0..65535"),
        (np.array([[0.0, 0.5]], np.float32), "floating-point"),
    ],
    ids=["int32-beyond-16-bit", "float"],
)
@pytest.mark.parametrize("channels", ["keep", "gray", "rgb"])
def test_images_of_unknown_range_are_refused_not_clipped(tmp_path: Path, array, fragment: str, channels: str) -> None:
    with pytest.raises(DatasetError, match=fragment):
        in_memory(tmp_path, [PIL.Image.fromarray(array)], channels=channels)


@pytest.mark.parametrize("channels", ["keep", "rgb"])
def test_16bit_rgb_png_is_not_clipped(tmp_path: Path, channels: str) -> None:
    """PIL reads 16-bit colour as 8-bit (the high byte): within one level of value / 257, never clipped."""
    rgb = np.stack([ALL_16BIT, ALL_16BIT[::-1], np.full_like(ALL_16BIT, 32768)], axis=2)
    src = folder_of(tmp_path, ("a.png", png16_bytes(rgb)))
    out = converted(tmp_path, f"--channels={channels}", source=src)[0].astype(int)
    assert (out[:, :, 2] == 128).all()
    assert np.abs(out - rgb / 257.0).max() <= 1


# ----------------------------------------------------------------------------------------------
# Class indices: bounded, so that a typo cannot ask training for a 10**12-wide one-hot label.


def test_class_index_bound_in_the_labels_file() -> None:
    assert MAX_CLASSES == 2**20
    ok = json.dumps({"labels": [["a.png", MAX_CLASSES - 1], ["b.png", 0]]})
    assert parse_labels_json(ok, "dataset.json") == {"a.png": MAX_CLASSES - 1, "b.png": 0}
    for label in (MAX_CLASSES, 10**12):
        with pytest.raises(DatasetError, match=rf"class index {label}.*renumber the classes 0\.\.K-1"):
            parse_labels_json(json.dumps({"labels": [["a.png", label]]}), "dataset.json")


def test_dataset_tool_refuses_an_absurd_class_index(tmp_path: Path) -> None:
    labels = json.dumps({"labels": [["a.png", 10**12], ["b.png", 0]]}).encode()
    src = folder_of(tmp_path, ("a.png", rgb_images(1)[0]), ("b.png", rgb_images(1)[0]), ("dataset.json", labels))
    dest = tmp_path / "out.zip"
    assert_clean_failure(run_cli(f"--source={src}", f"--dest={dest}"), dest, "1000000000000", "renumber")


def test_loader_refuses_an_absurd_class_index_and_accepts_sparse_labels(tmp_path: Path) -> None:
    huge = write_edm_dataset(tmp_path / "huge.zip", rgb_images(2), [0, 10**12])
    with pytest.raises(DatasetError, match="renumber"):
        ImageFolderDataset(huge, use_labels=True)
    assert ImageFolderDataset(huge).label_dim == 0  # unlabelled use never reads the labels
    sparse = ImageFolderDataset(write_edm_dataset(tmp_path / "sparse.zip", rgb_images(2), [0, 999]), use_labels=True)
    assert sparse.label_dim == 1000 and sparse[1][1].argmax() == 999


# ----------------------------------------------------------------------------------------------
# check_images: every image's size and channels from its header, before training starts.


@pytest.fixture(params=["zip", "folder"])
def dataset_path(request, tmp_path: Path) -> Path:
    return tmp_path / ("data.zip" if request.param == "zip" else "data")


def replace_image(path: Path, index: int, data: bytes) -> None:
    name = f"00000/img{index:08d}.png"
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            files = {info.filename: zf.read(info) for info in zf.infolist()}
        files[name] = data
        with zipfile.ZipFile(path, "w") as zf:
            for key, value in files.items():
                zf.writestr(key, value)
    else:
        (path / name).write_bytes(data)


@pytest.mark.parametrize(
    "odd, fragments",
    [
        (png_bytes(rgb_images(1, size=16)[0]), ["is 16x16 with 3 channels", "8x8 with 3", "--resolution=8x8"]),
        (png_bytes(rgb_images(1)[0][:, :, 0]), ["is 8x8 with 1 channels", "--channels"]),
        (png16_bytes(np.zeros((8, 8), np.uint16)), ["I;16", "--channels"]),
        (png_bytes(np.zeros((8, 8, 4), np.uint8)), ["RGBA", "--channels"]),
        (b"not an image at all", ["cannot read", "dataset_tool.py"]),
    ],
    ids=["size", "channels", "16-bit", "alpha", "junk"],
)
def test_check_images_names_the_first_odd_image(dataset_path: Path, odd: bytes, fragments: list[str]) -> None:
    write_edm_dataset(dataset_path, rgb_images(5), None)
    dataset = ImageFolderDataset(dataset_path)
    dataset.check_images(progress=True)  # consistent: passes
    replace_image(dataset_path, 3, odd)
    replace_image(dataset_path, 4, odd)
    with pytest.raises(DatasetError, match="img00000003.png") as error:
        ImageFolderDataset(dataset_path).check_images()
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_check_images_reads_jpeg_and_palette_headers(tmp_path: Path) -> None:
    """Images PIL opens as 'L' or 'RGB' pass, whatever their file format; others are named."""
    folder = write_edm_dataset(tmp_path / "d", rgb_images(2), None)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb_images(1)[0]).save(buffer, format="JPEG")
    (folder / "00000" / "img00000002.jpg").write_bytes(buffer.getvalue())
    ImageFolderDataset(folder).check_images()
    buffer = io.BytesIO()
    PIL.Image.fromarray(rgb_images(1)[0]).convert("P").save(buffer, format="PNG")
    (folder / "00000" / "img00000003.png").write_bytes(buffer.getvalue())
    with pytest.raises(DatasetError, match=r"img00000003.png is a P image"):
        ImageFolderDataset(folder).check_images()


# ----------------------------------------------------------------------------------------------
# Output sizes that cannot fit: refused before any image is read.


def never_read() -> Source:
    def items():
        raise AssertionError("an image was read")
        yield  # a generator

    return Source("never read", 1, items)


def test_huge_resolution_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Memory:
        available = 2**40

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())  # PIL's limit binds, whatever this machine has
    with pytest.raises(DatasetError, match=r"100000x100000 .*decompression-bomb.* --resolution=\d+x\d+"):
        convert_dataset(never_read(), tmp_path / "out.zip", resolution=(100000, 100000))
    dest = tmp_path / "cli.zip"
    assert_clean_failure(run_cli("--source=embedded:shapes", f"--dest={dest}", "--resolution=100000x100000"), dest,
                         "largest that fits")
    side = int(PIL.Image.MAX_IMAGE_PIXELS**0.5)
    with pytest.raises(DatasetError, match=rf"--resolution={side}x{side}\b"):
        convert_dataset(never_read(), tmp_path / "out.zip", resolution=(side + 1, side + 1))


def test_resolution_is_bounded_by_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Memory:
        available = 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    with pytest.raises(DatasetError, match=r"8000x8000 .*available memory.* --resolution=\d+x\d+"):
        convert_dataset(never_read(), tmp_path / "out.zip", resolution=(8000, 8000))


# ----------------------------------------------------------------------------------------------
# Signals and stale temporaries.


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def temporary_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob(".tmp-*")) if folder.is_dir() else 0


def test_sigterm_mid_conversion_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "shapes.zip"
    cmd = [sys.executable, "dataset_tool.py", "--source=embedded:shapes", f"--dest={dest}"]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # Well into the writing: a signal during a lazy import at the start can be lost in third-party code
        # (Cython module initialisation swallows exceptions), which no handler of ours can prevent.
        while temporary_bytes(dest.parent) < 2**18:
            assert process.poll() is None and time.monotonic() < deadline, "the tool ended before writing"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode not in (0, None), stderr
    assert "Traceback" not in stderr
    assert temporaries(dest.parent) == [] and not dest.exists()


def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path: Path) -> None:
    host, dead = socket.gethostname(), dead_pid()
    dest = tmp_path / "out.zip"
    stale_file = tmp_path / f".tmp-out.zip.{host}.{dead}.0a0b0c0d"
    stale_folder = tmp_path / f".tmp-out.zip.{host}.{dead}.1a1b1c1d"
    live = tmp_path / f".tmp-out.zip.{host}.{os.getpid()}.2a2b2c2d"
    other_host = tmp_path / f".tmp-out.zip.elsewhere.{dead}.3a3b3c3d"
    for path in (stale_file, live, other_host):
        path.write_bytes(b"x" * 1000)
    (stale_folder / "00000").mkdir(parents=True)
    result = run_cli("--source=embedded:shapes", f"--dest={dest}", "--max-images=3")
    assert result.exit_code == 0, result.output
    assert temporaries(tmp_path) == sorted([live.name, other_host.name])
    assert "removed 2 temporaries" in result.output


def test_a_dataset_moved_aside_by_a_dead_writer_is_restored(tmp_path: Path) -> None:
    """A writer killed between moving the old dataset aside and renaming the new one into place."""
    host, dead = socket.gethostname(), dead_pid()
    dest = tmp_path / "out.zip"
    moved = tmp_path / f".tmp-.old-out.zip.{host}.{dead}.0a0b0c0d"
    moved.write_bytes(b"precious")
    result = run_cli("--source=embedded:shapes", f"--dest={dest}", "--max-images=3")
    assert result.exit_code == 1 and "already exists" in result.output and "restored" in result.output
    assert dest.read_bytes() == b"precious" and temporaries(tmp_path) == []
    leftover = tmp_path / f".tmp-.old-out.zip.{host}.{dead}.1a1b1c1d"  # the new dataset was in place: removed
    leftover.write_bytes(b"superseded")
    result = run_cli("--source=embedded:shapes", f"--dest={dest}", "--max-images=3", "--overwrite")
    assert result.exit_code == 0, result.output
    assert temporaries(tmp_path) == [] and len(ImageFolderDataset(dest)) == 3


# ----------------------------------------------------------------------------------------------
# User mistakes: one line, non-zero exit, no traceback.


def one_image_folder(tmp_path: Path) -> Path:
    return folder_of(tmp_path, ("a.png", rgb_images(1)[0]))


def test_dest_below_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    dest = tmp_path / "afile" / "out.zip"
    result = run_cli(f"--source={one_image_folder(tmp_path)}", f"--dest={dest}")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "Error:" in result.output and "afile is a file, not a folder" in result.output
    assert temporaries(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions (root ignores them)")
def test_dest_in_a_read_only_folder_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run_cli(f"--source={one_image_folder(tmp_path)}", f"--dest={folder / 'out.zip'}")
        assert_clean_failure(result, folder / "out.zip", "cannot write", "read-only")
    finally:
        folder.chmod(0o755)


def test_an_unreadable_subfolder_is_an_error_not_a_smaller_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = folder_of(tmp_path, ("a/x.png", rgb_images(1)[0]), ("b/y.png", rgb_images(1)[0]))
    real_scandir = os.scandir

    def scandir(path="."):  # what the OS does for a folder without read permission (root is never refused)
        if Path(path) == src / "b":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    dest = tmp_path / "out.zip"
    assert_clean_failure(run_cli(f"--source={src}", f"--dest={dest}"), dest, "cannot list", "Permission denied")
    write_edm_dataset(tmp_path / "data", rgb_images(2), None)
    real = tmp_path / "data" / "00000"
    monkeypatch.setattr(os, "scandir", lambda path=".": scandir(src / "b" if Path(path) == real else path))
    with pytest.raises(DatasetError, match="cannot list"):
        ImageFolderDataset(tmp_path / "data")


def test_out_of_memory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def items():
        def load():
            raise MemoryError()

        yield SourceItem("huge.png", None, load)

    import dataset_tool

    monkeypatch.setattr(dataset_tool, "open_source", lambda spec, **kwargs: Source("huge", 1, items))
    dest = tmp_path / "out.zip"
    assert_clean_failure(run_cli("--source=anything", f"--dest={dest}"), dest, "memory", "huge.png")


@pytest.mark.parametrize("args", [["--max-images=0"], ["--resolution=0x0"], ["--channels=cmyk"]])
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    result = run_cli("--source=embedded:shapes", f"--dest={tmp_path / 'out.zip'}", *args)
    assert result.exit_code == 2 and "Error:" in result.output and "Traceback" not in result.output


def test_a_corrupt_lmdb_found_while_reading_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Corrupt(Exception):
        pass

    def cursor():
        yield b"0000", png_bytes(rgb_images(1)[0])
        raise Corrupt("MDB_CORRUPTED: Located page was wrong type")

    class Env:
        def stat(self) -> dict:
            return {"entries": 2}

        @contextlib.contextmanager
        def begin(self, write: bool = False):
            yield types.SimpleNamespace(cursor=cursor)

        def close(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "lmdb", types.SimpleNamespace(Error=Corrupt, open=lambda path, **kwargs: Env()))
    src = tmp_path / "church_outdoor_train_lmdb"
    src.mkdir()
    (src / "data.mdb").write_bytes(b"")
    dest = tmp_path / "lsun.zip"
    assert_clean_failure(run_cli(f"--source={src}", f"--dest={dest}"), dest, "MDB_CORRUPTED", "download it again")
