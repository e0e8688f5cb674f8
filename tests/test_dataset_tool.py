"""Tests of dataset_tool.py and training/datasets/ on sources written here in their real byte formats.

Fixtures: a CIFAR-10 python tarball of pickled batches (5 training batches of 4 images, a test_batch
that must be ignored, batches.meta), MNIST idx(.gz) files with their magic numbers 2051/2049 and
big-endian dimensions, image folders (labels in dataset.json or in subfolder names), a truncated PNG,
grayscale and RGB mixed, mixed resolutions, a hand-written EDM-format ZIP and a fake LMDB module.
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import types
import weakref
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.datasets import SOURCES, ImageFolderDataset, Source, SourceItem, SourceKind, convert_dataset, open_source
from training.datasets import embedded

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Fixture writers.


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(array))


def random_images(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar_tarball(path: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A cifar-10-python.tar.gz in the real layout; returns the training images (HWC) and labels."""
    images = random_images(5 * per_batch, (32, 32, 3), seed=1)
    labels = np.arange(5 * per_batch) % 10
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, obj: object) -> None:
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for b in range(5):
            sl = slice(b * per_batch, (b + 1) * per_batch)
            planes = images[sl].transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CHW plane order: R, G, B
            add(f"data_batch_{b + 1}", {b"batch_label": b"training batch", b"labels": [int(x) for x in labels[sl]],
                                        b"data": planes, b"filenames": [b"x.png"] * per_batch})
        add("test_batch", {b"labels": [0] * 3, b"data": np.zeros((3, 3072), np.uint8)})
        add("batches.meta", {b"label_names": [b"airplane"] * 10, b"num_vis": 3072})
    return images, labels


def write_mnist(folder: Path, n: int = 12, gz: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz); returns the images and labels."""
    images = random_images(n, (28, 28), seed=2)
    labels = (np.arange(n) * 7) % 10
    opener, ext = (gzip.open, ".gz") if gz else (open, "")
    folder.mkdir(parents=True, exist_ok=True)
    with opener(folder / f"train-images-idx3-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
    with opener(folder / f"train-labels-idx1-ubyte{ext}", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return images, labels


def read_zip_dataset(path: Path) -> tuple[np.ndarray, list | None]:
    """All images (N, C, H, W) and labels of a dataset, through the training loader."""
    loader = ImageFolderDataset(path)
    labels = json.loads(zipfile.ZipFile(path).read("dataset.json"))["labels"] if path.suffix == ".zip" else None
    return np.stack([loader[i][0] for i in range(len(loader))]), labels


def run_cli(*args: str):
    return CliRunner().invoke(dataset_tool.main, list(args))


def assert_clean_failure(result, dest: Path, *fragments: str) -> None:
    """Exit 1 with 'Error: ...' naming `fragments`, no traceback, nothing at dest, no temporary left."""
    assert result.exit_code == 1, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)
    assert not dest.exists()
    assert not dest.parent.exists() or not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------
# Sources: pixel-exact round trips and labels.


def test_cifar10_tarball_round_trip(tmp_path: Path) -> None:
    images, labels = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    dest = tmp_path / "out" / "cifar10-32x32.zip"
    result = run_cli(f"--source={tmp_path / 'cifar-10-python.tar.gz'}", f"--dest={dest}")
    assert result.exit_code == 0, result.output
    assert "Wrote 20 images" in result.output and "labels:     yes, 10 classes" in result.output
    got, got_labels = read_zip_dataset(dest)
    assert np.array_equal(got, images.transpose(0, 3, 1, 2))  # test_batch is not used
    expected = [[f"00000/img{i:08d}.png", int(c)] for i, c in enumerate(labels)]
    assert got_labels == expected
    with zipfile.ZipFile(dest) as zf:
        assert zf.read("dataset.json").decode() == json.dumps({"labels": expected})  # EDM's exact text
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}
        assert sorted(zf.namelist()) == sorted([name for name, _ in expected] + ["dataset.json"])
        assert np.array_equal(np.asarray(PIL.Image.open(zf.open("00000/img00000005.png"))), images[5])


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for b in range(1, 6):
            data = pickle.dumps(types.SimpleNamespace(a=1))  # a class outside the allow-list
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{b}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "out.zip"
    assert_clean_failure(run_cli(f"--source={path}", f"--dest={dest}"), dest, "refusing to load types.SimpleNamespace")


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = write_mnist(tmp_path / "mnist", gz=gz)
    source = tmp_path / "mnist" / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    dest = tmp_path / "mnist.zip"
    result = run_cli(f"--source={source}", f"--dest={dest}")
    assert result.exit_code == 0, result.output
    assert "resolution: 28x28" in result.output and "channels:   1 (grayscale)" in result.output
    got, got_labels = read_zip_dataset(dest)
    assert np.array_equal(got, images[:, None])
    assert [c for _, c in got_labels] == labels.tolist()


def test_mnist_pad_reproduces_edm_32x32(tmp_path: Path) -> None:
    images, _ = write_mnist(tmp_path)
    dest = tmp_path / "mnist-32.zip"
    result = run_cli(f"--source={tmp_path / 'train-images-idx3-ubyte.gz'}", f"--dest={dest}", "--resolution=32x32",
                     "--transform=pad")
    assert result.exit_code == 0, result.output
    got, _ = read_zip_dataset(dest)
    assert np.array_equal(got[:, 0], np.pad(images, [(0, 0), (2, 2), (2, 2)]))


def test_folder_labels_from_dataset_json(tmp_path: Path) -> None:
    src = tmp_path / "src"
    names = ["b/x.png", "a.png", "a/z.png", "a-c.png"]  # sorted folder by folder: a/z, a-c, a, b/x
    arrays = random_images(len(names), (8, 8, 3), seed=3)
    for name, array in zip(names, arrays):
        write_png(src / name, array)
    table = {"b/x.png": 4, "a.png": 0, "a/z.png": 2, "a-c.png": 7}
    (src / "dataset.json").write_text(json.dumps({"labels": [[n, c] for n, c in table.items()]}))
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.png").write_bytes(b"not a png either")  # hidden files are ignored
    dest = tmp_path / "out.zip"
    assert run_cli(f"--source={src}", f"--dest={dest}").exit_code == 0
    got, labels = read_zip_dataset(dest)
    order = ["a/z.png", "a-c.png", "a.png", "b/x.png"]
    assert np.array_equal(got, arrays[[names.index(n) for n in order]].transpose(0, 3, 1, 2))
    assert [c for _, c in labels] == [table[n] for n in order]


def test_folder_labels_from_subfolders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for cls, count in (("dog", 2), ("cat", 3), ("emu", 1)):
        for i in range(count):
            write_png(src / cls / f"{i}.jpg.png", np.full((4, 4, 3), 10 * i, np.uint8))
    dest = tmp_path / "out.zip"
    plain = run_cli(f"--source={src}", f"--dest={dest}")
    assert plain.exit_code == 0 and "labels:     no" in plain.output and "--labels-from-folders" in plain.output
    result = run_cli(f"--source={src}", f"--dest={dest}", "--labels-from-folders", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "0=cat, 1=dog, 2=emu" in result.output
    _, labels = read_zip_dataset(dest)
    assert [c for _, c in labels] == [0, 0, 0, 1, 1, 2]


def test_edm_zip_source_round_trip(tmp_path: Path) -> None:
    arrays = random_images(3, (16, 16, 3), seed=4)
    src = tmp_path / "edm.zip"
    with zipfile.ZipFile(src, "w") as zf:  # as EDM's tool writes it
        for i, array in enumerate(arrays):
            zf.writestr(f"00000/img{i:08d}.png", png_bytes(array))
        zf.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", 9 - i] for i in range(3)]}))
    dest = tmp_path / "folder-out"
    assert run_cli(f"--source={src}", f"--dest={dest}").exit_code == 0
    loader = ImageFolderDataset(dest, use_labels=True)
    assert np.array_equal(np.stack([loader[i][0] for i in range(3)]), arrays.transpose(0, 3, 1, 2))
    assert [int(loader[i][1].argmax()) for i in range(3)] == [9, 8, 7]
    assert json.loads((dest / "dataset.json").read_text())["labels"][0] == ["00000/img00000000.png", 9]


def test_sources_are_recognised_by_content_not_name(tmp_path: Path) -> None:
    write_cifar_tarball(tmp_path / "c.tgz")
    (tmp_path / "c.tgz").rename(tmp_path / "download.bin")
    write_mnist(tmp_path / "m", gz=True)
    for kind in ("images", "labels"):  # any names, as long as the labels file's name pairs with the images'
        old = tmp_path / "m" / f"train-{kind}-idx{3 if kind == 'images' else 1}-ubyte.gz"
        old.rename(tmp_path / "m" / f"digits-{kind}.gz")
    with zipfile.ZipFile(tmp_path / "archive.dat", "w") as zf:
        zf.writestr("a.png", png_bytes(RGB8))
    assert open_source(str(tmp_path / "download.bin")).description.startswith("CIFAR-10 tarball")
    assert open_source(str(tmp_path / "m" / "digits-images.gz")).description.startswith("MNIST")
    assert open_source(str(tmp_path / "archive.dat")).description.startswith("ZIP")
    assert [item.label for item in open_source(str(tmp_path / "download.bin")).items()][:3] == [0, 1, 2]


def toy_arrays(count: int) -> np.ndarray:
    """The images of the toy source: image i is a 4x4 RGB ramp offset by 10 * i."""
    return (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) + 10 * np.arange(count, dtype=np.uint8)[:, None, None, None])


def open_toy(path: Path, labels_from_folders: bool) -> Source:
    count = int((path / "toy.marker").read_text())

    def items():
        for i, array in enumerate(toy_arrays(count)):
            yield SourceItem(f"{path}[{i}]", i % 2, lambda a=array: PIL.Image.fromarray(a))

    return Source(f"toy {path}", count, items, str(path))


def test_a_new_source_kind_is_one_registry_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The extension point: a kind defined here, registered with one line, read by dataset_tool.py.
    toy = SourceKind("toy", "a toy folder", detect=lambda path: (path / "toy.marker").is_file(), open=open_toy)
    src = tmp_path / "toy-source"
    src.mkdir()
    (src / "toy.marker").write_text("5")  # a folder: without the kind it holds no images
    dest = tmp_path / "toy.zip"
    assert_clean_failure(run_cli(f"--source={src}", f"--dest={dest}"), dest, "no images in")
    monkeypatch.setitem(SOURCES, "toy", toy)
    result = run_cli(f"--source={src}", f"--dest={dest}")
    assert result.exit_code == 0, result.output
    assert f"source:     toy {src}" in result.output and "labels:     yes, 2 classes" in result.output
    dataset = ImageFolderDataset(dest, use_labels=True)
    assert np.array_equal(np.stack([dataset[i][0] for i in range(5)]), toy_arrays(5).transpose(0, 3, 1, 2))
    assert [int(dataset[i][1].argmax()) for i in range(5)] == [0, 1, 0, 1, 0]
    missing = run_cli(f"--source={tmp_path / 'missing'}", f"--dest={dest}", "--overwrite")
    assert "embedded:shapes|digits or a toy folder" in missing.output  # messages list the registered kinds


class _FakeLmdbEnv:
    def __init__(self, records: dict[bytes, bytes]) -> None:
        self.records = records

    def stat(self) -> dict:
        return {"entries": len(self.records)}

    def begin(self, write: bool = False):
        env = self

        class Txn:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def cursor(self):
                return iter(sorted(env.records.items()))

        return Txn()

    def close(self) -> None:
        pass


def test_lmdb_source_with_fake_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = random_images(3, (8, 8, 3), seed=5)
    records = {f"{i:04d}".encode(): png_bytes(a) for i, a in enumerate(arrays)}
    fake = types.ModuleType("lmdb")
    fake.Error = RuntimeError
    fake.open = lambda path, **kwargs: _FakeLmdbEnv(records)
    monkeypatch.setitem(sys.modules, "lmdb", fake)
    src = tmp_path / "bedroom_train_lmdb"
    src.mkdir()
    (src / "data.mdb").write_bytes(b"")
    dest = tmp_path / "lsun.zip"
    result = run_cli(f"--source={src}", f"--dest={dest}", "--max-images=2")
    assert result.exit_code == 0, result.output
    got, labels = read_zip_dataset(dest)
    assert np.array_equal(got, arrays[:2].transpose(0, 3, 1, 2)) and labels is None


def test_lmdb_without_package_says_pip_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb raises ImportError
    src = tmp_path / "cat_lmdb"
    src.mkdir()
    (src / "data.mdb").write_bytes(b"")
    dest = tmp_path / "lsun.zip"
    assert_clean_failure(run_cli(f"--source={src}", f"--dest={dest}"), dest, "pip install lmdb")


def test_embedded_shapes_is_deterministic_labelled_and_prefix_stable(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.zip" for n in "abc")
    assert run_cli("--source=embedded:shapes", f"--dest={a}", "--max-images=150").exit_code == 0
    assert run_cli("--source=embedded:shapes", f"--dest={b}", "--max-images=150").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    result = run_cli("--source=embedded:shapes", f"--dest={c}", "--max-images=40")
    assert "labels:     yes, 10 classes" in result.output and "0=disc" in result.output
    big, labels = read_zip_dataset(a)
    small, small_labels = read_zip_dataset(c)
    assert np.array_equal(big[:40], small) and labels[:40] == small_labels
    assert big.shape == (150, 3, 32, 32)
    assert np.bincount([c for _, c in labels[:100]], minlength=10).tolist() == [10] * 10  # balanced chunks


def _shape_features(images: np.ndarray) -> np.ndarray:
    """Each image's foreground (differing from the corner colour), cropped to its box and resized to 12x12."""
    features = []
    for image in images.astype(int):
        diff = np.abs(image - image[0, 0]).max(axis=-1)  # the shape never reaches the corner
        ys, xs = np.nonzero(diff > diff.max() / 2)
        crop = (diff[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] / diff.max()).astype(np.float32)
        features.append(np.asarray(PIL.Image.fromarray(crop, "F").resize((12, 12), PIL.Image.Resampling.BILINEAR)))
    return np.stack(features).reshape(len(images), -1)


def test_embedded_shapes_classes_are_learnable() -> None:
    # Clearly distinct classes: a nearest-centroid classifier on position- and size-normalised
    # foreground masks, fitted on 500 images, labels 500 others almost perfectly (chance: 10%).
    train = [embedded.shapes_chunk(k) for k in range(5)]
    test = [embedded.shapes_chunk(k) for k in range(5, 10)]
    x_train, y_train = _shape_features(np.concatenate([x for x, _ in train])), np.concatenate([y for _, y in train])
    x_test, y_test = _shape_features(np.concatenate([x for x, _ in test])), np.concatenate([y for _, y in test])
    centroids = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
    predicted = ((x_test[:, None] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (predicted == y_test).mean() > 0.95
    images, _ = train[0]
    contrast = np.abs(images.astype(int) - images[:, :1, :1].astype(int)).max(axis=(1, 2, 3))
    assert contrast.min() > 60  # vivid shape on a dark background


def test_folder_output_layout_1000_per_subfolder(tmp_path: Path) -> None:
    dest = tmp_path / "shapes"
    result = run_cli("--source=embedded:shapes", f"--dest={dest}", "--max-images=1003")
    assert result.exit_code == 0, result.output
    assert len(list((dest / "00000").iterdir())) == 1000
    assert sorted(p.name for p in (dest / "00001").iterdir()) == [f"img{i:08d}.png" for i in range(1000, 1003)]
    assert len(ImageFolderDataset(dest, use_labels=True)) == 1003


# ----------------------------------------------------------------------------------------------
# Geometry.


def convert_arrays(tmp_path: Path, arrays: list[np.ndarray], **kwargs) -> np.ndarray:
    """Run convert_dataset on in-memory images; return the output as HWC (or HW) arrays."""

    def items():
        for i, array in enumerate(arrays):
            yield SourceItem(f"img{i}", None, lambda a=array: PIL.Image.fromarray(a))

    dest = tmp_path / f"geometry-{len(list(tmp_path.iterdir()))}.zip"
    convert_dataset(Source("test images", len(arrays), items), dest, **kwargs)
    chw = np.stack([x for x, _ in (ImageFolderDataset(dest)[i] for i in range(len(arrays)))])
    return chw.transpose(0, 2, 3, 1)


def test_center_crop_keeps_the_central_square(tmp_path: Path) -> None:
    image = np.zeros((64, 96, 3), np.uint8)  # H=64, W=96: the crop keeps columns 16..79
    image[:, 0:16] = [255, 0, 0]  # outside the crop
    image[:, 16:32] = [0, 255, 0]  # the crop's first quarter
    out = convert_arrays(tmp_path, [image], resolution=(32, 32), transform="center-crop")[0]
    assert out.shape == (32, 32, 3)
    assert out[:, :, 0].max() <= 8  # no red
    assert (out[:, 1:7, 1] >= 240).all() and (out[:, 10:, 1] <= 8).all()


def test_center_crop_wide_letterboxes(tmp_path: Path) -> None:
    wide = np.zeros((64, 256, 3), np.uint8)  # 4:1 -> crop to 2:1 = columns 64..191, then 64x32 in a 64x64 canvas
    wide[:, :64] = [255, 0, 0]
    wide[:, 64:96] = [0, 255, 0]
    tall = np.zeros((128, 64, 3), np.uint8)  # 1:2 -> crop to 2:1 = rows 48..79
    tall[48:80, :32] = [0, 0, 255]
    tall[:48] = [255, 0, 0]
    out = convert_arrays(tmp_path, [wide, tall], resolution=(64, 32), transform="center-crop-wide")
    assert out.shape == (2, 64, 64, 3)
    assert not out[:, :16].any() and not out[:, 48:].any()  # black bars, exactly
    assert (out[0, 16:48, 1:14, 1] >= 240).all() and (out[0, 16:48, 18:, 1] <= 8).all()
    assert out[:, 16:48, :, 0].max() <= 8  # red was cropped away in both
    assert (out[1, 16:48, 2:30, 2] >= 240).all() and (out[1, 16:48, 34:, 2] <= 8).all()


def test_resize_is_lanczos_and_identity_at_the_same_size(tmp_path: Path) -> None:
    blocks = np.kron(random_images(1, (4, 4, 3), seed=6)[0], np.ones((16, 16, 1), np.uint8))  # 64x64 of 16px blocks
    same, half = convert_arrays(tmp_path, [blocks], resolution=(64, 64))[0], convert_arrays(
        tmp_path, [blocks], resolution=(32, 32))[0]
    assert np.array_equal(same, blocks)
    # Away from block edges a Lanczos downscale of a piecewise-constant image reproduces the blocks.
    centres = half.reshape(4, 8, 4, 8, 3)[:, 3:5, :, 3:5].astype(int)  # 3 px (Lanczos-3's reach) from edges
    assert np.abs(centres - blocks[::16, ::16][:, None, :, None].astype(int)).max() <= 1
    expected = np.asarray(PIL.Image.fromarray(blocks).resize((32, 32), PIL.Image.Resampling.LANCZOS))
    assert np.array_equal(half, expected)


@pytest.mark.parametrize("channels, mode_channels", [("rgb", 3), ("gray", 1)])
def test_channels_option_converts_a_mix(tmp_path: Path, channels: str, mode_channels: int) -> None:
    gray, rgb = np.full((8, 8), 100, np.uint8), np.zeros((8, 8, 3), np.uint8) + np.uint8([10, 200, 30])
    out = convert_arrays(tmp_path, [gray, rgb], channels=channels)
    assert out.shape == (2, 8, 8, mode_channels)
    if channels == "rgb":
        assert (out[0] == 100).all() and (out[1] == [10, 200, 30]).all()
    else:  # ITU-R 601-2 luma: 0.299 * 10 + 0.587 * 200 + 0.114 * 30 = 123.8
        assert out[0].max() == out[0].min() == 100 and (out[1] == 124).all()


# ----------------------------------------------------------------------------------------------
# Bad input: clean errors, nothing half-written.


def folder_of(tmp_path: Path, *images: tuple[str, np.ndarray | bytes]) -> Path:
    src = tmp_path / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name, content in images:
        if isinstance(content, bytes):
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(content)
        else:
            write_png(src / name, content)
    return src


RGB8, GRAY8 = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
TRUNCATED = png_bytes(random_images(1, (32, 32, 3))[0])[:300]


@pytest.mark.parametrize(
    "files, args, fragments",
    [
        ([], [], ["no images in"]),
        ([("a.png", RGB8), ("bad.png", TRUNCATED), ("c.png", RGB8)], [], ["bad.png", "--skip-bad"]),
        ([("a.png", RGB8), ("b.png", np.zeros((16, 8, 3), np.uint8))], [], ["a.png is 8x8", "b.png is 8x16",
                                                                             "--resolution=8x8"]),
        ([("a.png", np.zeros((8, 16, 3), np.uint8))], [], ["is 16x8", "square", "--resolution="]),
        ([("a.png", RGB8), ("b.png", GRAY8)], [], ["a.png is RGB", "b.png is grayscale", "--channels=rgb"]),
        ([("a.png", RGB8), ("dataset.json", b'{"labels": [["a.png", 1]')], [], ["dataset.json is not valid JSON"]),
        ([("a.png", RGB8), ("dataset.json", b'{"label": null}')], [], ['"labels" key']),
        ([("a.png", RGB8), ("dataset.json", b'{"labels": [["a.png", "cat"]]}')], [], ["labels entry 0"]),
        ([("a.png", RGB8), ("b.png", RGB8), ("dataset.json", b'{"labels": [["a.png", 1]]}')], [],
         ["no label for b.png"]),
        ([("a.png", RGB8)], ["--labels-from-folders"], ["a.png is not in a class subfolder"]),
        ([("a.png", RGB8)], ["--transform=center-crop"], ["needs --resolution=WxH"]),
        ([("a.png", RGB8)], ["--resolution=64x48"], ["not square"]),
        ([("a.png", np.zeros((8, 8, 4), np.uint8))], [], ["alpha channel", "--channels=rgb"]),
        ([("a.png", RGB8)], ["--transform=pad", "--resolution=4x4"], ["larger than --resolution=4x4"]),
    ],
    ids=["empty", "truncated", "mixed-resolution", "not-square", "mixed-channels", "json-syntax", "json-key",
         "json-entry", "json-missing", "loose-image", "crop-needs-resolution", "not-square-resolution", "alpha",
         "pad-too-small"],
)
def test_folder_errors_are_clean(tmp_path: Path, files: list, args: list[str], fragments: list[str]) -> None:
    src = folder_of(tmp_path, *files)
    dest = tmp_path / "out" / "dataset.zip"
    assert_clean_failure(run_cli(f"--source={src}", f"--dest={dest}", *args), dest, *fragments)


def test_skip_bad_counts_and_names_skipped_files(tmp_path: Path) -> None:
    src = folder_of(tmp_path, ("a.png", RGB8), ("bad.png", TRUNCATED), ("c.png", RGB8 + 5), ("d.jpg", b"junk"))
    dest = tmp_path / "out.zip"
    result = run_cli(f"--source={src}", f"--dest={dest}", "--skip-bad")
    assert result.exit_code == 0, result.output
    assert "Wrote 2 images" in result.output and "skipped:    2" in result.output and "bad.png" in result.output
    got, _ = read_zip_dataset(dest)
    assert np.array_equal(got[1], (RGB8 + 5).transpose(2, 0, 1))
    only_bad = folder_of(tmp_path / "x", ("bad.png", TRUNCATED))
    assert_clean_failure(run_cli(f"--source={only_bad}", f"--dest={tmp_path / 'y.zip'}", "--skip-bad"),
                         tmp_path / "y.zip", "all 1 images were unreadable")


@pytest.mark.parametrize(
    "source, fragments",
    [
        ("missing-folder", ["does not exist"]),
        ("embedded:squares", ["unknown embedded dataset"]),
        ("plain.tar", ["without data_batch_1", "cifar-10-python.tar.gz"]),
        ("lonely/train-images-idx3-ubyte.gz", ["cannot find the labels", "train-labels-idx1-ubyte.gz"]),
        ("idx/train-labels-idx1-ubyte.gz", ["the labels file?", "give the images file"]),
        ("short/train-images-idx3-ubyte.gz", ["truncated"]),
        ("notes.txt", ["cannot tell what"]),
        ("one.png", ["single image"]),
    ],
)
def test_source_errors_are_clean(tmp_path: Path, source: str, fragments: list[str]) -> None:
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        tar.add(__file__, arcname="readme.py")
    write_mnist(tmp_path / "idx")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").rename(tmp_path / "lonely" / "train-images-idx3-ubyte.gz")
    write_mnist(tmp_path / "short")
    data = gzip.decompress((tmp_path / "short" / "train-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "short" / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[: 16 + 784 * 5 + 10]))
    (tmp_path / "notes.txt").write_text("hello")
    write_png(tmp_path / "one.png", RGB8)
    dest = tmp_path / "out.zip"
    spec = source if source.startswith("embedded:") else str(tmp_path / source)
    assert_clean_failure(run_cli(f"--source={spec}", f"--dest={dest}"), dest, *fragments)


def test_labels_from_folders_only_for_folders(tmp_path: Path) -> None:
    write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    dest = tmp_path / "out.zip"
    result = run_cli(f"--source={tmp_path / 'cifar-10-python.tar.gz'}", f"--dest={dest}", "--labels-from-folders")
    assert_clean_failure(result, dest, "--labels-from-folders applies to image folders and ZIPs, not to", "(cifar10)")


@pytest.mark.parametrize("dest_name", ["old.zip", "old-folder"])
def test_existing_dest_is_refused_kept_on_failure_and_replaced_with_overwrite(tmp_path: Path, dest_name: str) -> None:
    dest = tmp_path / dest_name
    if dest.suffix == ".zip":
        dest.write_bytes(b"precious")
    else:
        (dest / "sub").mkdir(parents=True)
        (dest / "sub" / "file").write_bytes(b"precious")
    snapshot = sorted((str(p), p.read_bytes() if p.is_file() else b"") for p in [dest, *dest.rglob("*")])

    def unchanged() -> bool:
        return snapshot == sorted((str(p), p.read_bytes() if p.is_file() else b"") for p in [dest, *dest.rglob("*")])

    refused = run_cli("--source=embedded:shapes", f"--dest={dest}", "--max-images=3")
    assert refused.exit_code == 1 and "already exists; pass --overwrite" in refused.output and unchanged()
    bad = folder_of(tmp_path, ("a.png", RGB8), ("b.png", RGB8), ("c.png", TRUNCATED))  # fails at the 3rd image
    failed = run_cli(f"--source={bad}", f"--dest={dest}", "--overwrite")
    assert failed.exit_code == 1 and "c.png" in failed.output and unchanged()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    replaced = run_cli("--source=embedded:shapes", f"--dest={dest}", "--max-images=3", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert len(ImageFolderDataset(dest)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_dest_may_not_replace_the_source(tmp_path: Path) -> None:
    src = folder_of(tmp_path, ("a.png", RGB8))
    result = run_cli(f"--source={src}", f"--dest={src}", "--overwrite")
    assert result.exit_code == 1 and "would replace the source" in result.output
    assert (src / "a.png").is_file()


def test_streaming_holds_a_bounded_number_of_images(tmp_path: Path) -> None:
    # An endless source: if the writer collected items into a list it would never finish. Each
    # decoded image is tracked by a weak reference; at most a couple may be alive at any time.
    alive: list[weakref.ref] = []
    most_alive = 0

    def items():
        nonlocal most_alive
        for i in itertools.count():
            array = np.full((8, 8, 3), i % 256, np.uint8)
            alive.append(weakref.ref(array))
            most_alive = max(most_alive, sum(ref() is not None for ref in alive))
            yield SourceItem(f"gen[{i}]", i % 3, lambda a=array: PIL.Image.fromarray(a))
            del array

    summary = convert_dataset(Source("endless", None, items), tmp_path / "gen.zip", max_images=300)
    assert summary.num_images == 300 and len(alive) == 300 and most_alive <= 2
    assert summary.num_classes == 3


# ----------------------------------------------------------------------------------------------
# The real command line.


def test_subprocess_cli(tmp_path: Path) -> None:
    dest = tmp_path / "datasets" / "shapes-32x32.zip"
    cmd = [sys.executable, "dataset_tool.py", "--source=embedded:shapes", f"--dest={dest}", "--max-images=25"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Wrote 25 images" in done.stdout and "resolution: 32x32" in done.stdout
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and again.stderr.startswith("Error:") and "Traceback" not in again.stderr
    assert os.path.getsize(dest) > 25 * 32 * 32 * 3  # uncompressed PNGs


def test_embedded_digits_are_the_real_uci_digits(tmp_path: Path) -> None:
    """embedded:digits: 1,797 labelled 8x8 images, equal to scikit-learn's own loader (scaled 0..16 -> 0..255)."""
    datasets = pytest.importorskip("sklearn.datasets")
    reference = datasets.load_digits()
    images, labels = embedded.digits_arrays()
    assert images.shape == (1797, 8, 8) and np.array_equal(labels, reference.target)
    np.testing.assert_array_equal(images, np.rint(reference.images * 255 / 16).astype(np.uint8))
    dest = tmp_path / "digits.zip"
    result = CliRunner().invoke(dataset_tool.main, ["--source=embedded:digits", f"--dest={dest}", "--resolution=16x16"])
    assert result.exit_code == 0, result.output
    dataset = ImageFolderDataset(dest, use_labels=True)
    assert len(dataset) == 1797 and dataset.image_shape == [1, 16, 16] and dataset.label_dim == 10
