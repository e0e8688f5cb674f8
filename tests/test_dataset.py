"""Tests of training/datasets/ (format, loader, writer): the loader reads EDM-format datasets (written
here by hand, as EDM's tool writes them) and the format helpers that dataset_tool.py writes them with."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from training.datasets import DatasetError, ImageFolderDataset, archive_name, dataset_writer, labels_json

N = 12


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def write_edm_dataset(path: Path, images: np.ndarray, labels: list[int] | None, *, labels_file: bool = True) -> Path:
    """A dataset as EDM's dataset_tool.py writes it: PNG names 00000/img00000000.png, dataset.json."""
    files = {f"{i // 1000:05d}/img{i:08d}.png": png_bytes(image) for i, image in enumerate(images)}
    if labels_file:
        names = list(files)
        entries = None if labels is None else [[n, c] for n, c in zip(names, labels)]
        files["dataset.json"] = json.dumps({"labels": entries})
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in files.items():
                zf.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def rgb_images(n: int = N, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.fixture(params=["zip", "folder"])
def dataset_path(request, tmp_path: Path) -> Path:
    return tmp_path / ("cifar-mini.zip" if request.param == "zip" else "cifar-mini")


def test_reads_edm_dataset_pixels_and_one_hot_labels(dataset_path: Path) -> None:
    images, labels = rgb_images(), [int(x) for x in np.arange(N) % 5]
    write_edm_dataset(dataset_path, images, labels)
    ds = ImageFolderDataset(dataset_path, use_labels=True)
    assert len(ds) == N and ds.name == "cifar-mini"
    assert ds.resolution == 8 and ds.num_channels == 3 and ds.image_shape == [3, 8, 8]
    assert ds.label_dim == 5 and ds.has_labels
    for i in range(N):
        image, label = ds[i]
        assert image.dtype == np.uint8 and np.array_equal(image, images[i].transpose(2, 0, 1))
        assert label.dtype == np.float32 and label.tolist() == np.eye(5, dtype=np.float32)[labels[i]].tolist()


def test_without_labels_the_label_is_empty(dataset_path: Path) -> None:
    write_edm_dataset(dataset_path, rgb_images(), [1] * N)
    ds = ImageFolderDataset(dataset_path)  # labels present but not asked for
    image, label = ds[0]
    assert label.shape == (0,) and label.dtype == np.float32 and ds.label_dim == 0 and not ds.has_labels


@pytest.mark.parametrize("labels_file", [True, False])
def test_use_labels_on_unlabelled_dataset_is_an_error(dataset_path: Path, labels_file: bool) -> None:
    write_edm_dataset(dataset_path, rgb_images(), None, labels_file=labels_file)
    with pytest.raises(ValueError, match="cannot be used with labels"):
        ImageFolderDataset(dataset_path, use_labels=True)


def test_grayscale_dataset_has_one_channel(dataset_path: Path) -> None:
    gray = rgb_images()[..., 0]
    write_edm_dataset(dataset_path, gray, None)
    ds = ImageFolderDataset(dataset_path)
    assert ds.num_channels == 1 and np.array_equal(ds[3][0], gray[3][None])


def test_xflip_appends_mirrored_copies(dataset_path: Path) -> None:
    images = rgb_images()
    write_edm_dataset(dataset_path, images, list(range(N)))
    ds = ImageFolderDataset(dataset_path, use_labels=True, xflip=True)
    assert len(ds) == 2 * N
    for i in (0, 7):
        assert np.array_equal(ds[N + i][0], images[i].transpose(2, 0, 1)[:, :, ::-1])
        assert np.array_equal(ds[N + i][1], ds[i][1])


def test_max_size_takes_edms_seeded_subset(dataset_path: Path) -> None:
    images = rgb_images()
    write_edm_dataset(dataset_path, images, None)
    ds = ImageFolderDataset(dataset_path, max_size=5, random_seed=3)
    expected = np.sort(np.random.RandomState(3).permutation(N)[:5])  # EDM: seeded shuffle, first max_size, sorted
    assert len(ds) == 5
    for k, raw in enumerate(expected):
        assert np.array_equal(ds[k][0], images[raw].transpose(2, 0, 1))


def test_resolution_is_validated(dataset_path: Path) -> None:
    write_edm_dataset(dataset_path, rgb_images(), None)
    assert ImageFolderDataset(dataset_path, resolution=8).resolution == 8
    with pytest.raises(ValueError, match="resolution=16 was asked for.*--resolution=16x16"):
        ImageFolderDataset(dataset_path, resolution=16)


def test_an_image_of_another_size_is_a_clear_error(tmp_path: Path) -> None:
    path = write_edm_dataset(tmp_path / "mixed.zip", rgb_images(3), None)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("00000/img00000003.png", png_bytes(rgb_images(1, size=16)[0]))
    ds = ImageFolderDataset(path)
    assert ds[2][0].shape == (3, 8, 8)
    with pytest.raises(ValueError, match=r"img00000003.png is 16x16 .* first image is 8x8"):
        ds[3]


def test_cache_is_off_by_default_and_keeps_images_when_on(tmp_path: Path) -> None:
    path = write_edm_dataset(tmp_path / "folder", rgb_images(2), None)
    cached, plain = ImageFolderDataset(path, cache=True), ImageFolderDataset(path)
    first = cached[1][0]
    (path / "00000" / "img00000001.png").unlink()  # a cached image no longer needs its file
    assert np.array_equal(cached[1][0], first)
    with pytest.raises(ValueError, match="cannot read .*img00000001.png"):
        plain[1]


def test_cache_respects_its_memory_bound(tmp_path: Path) -> None:
    """With room for one 8x8x3 image only, the second is read from disk each time."""
    path = write_edm_dataset(tmp_path / "folder", rgb_images(2), None)
    bounded = ImageFolderDataset(path, cache=True, cache_limit_gib=(3 * 8 * 8 + 1) / 2**30)
    bounded[0], bounded[1]
    (path / "00000" / "img00000000.png").unlink()
    (path / "00000" / "img00000001.png").unlink()
    bounded[0]  # cached
    with pytest.raises(ValueError, match="cannot read .*img00000001.png"):
        bounded[1]


def test_pickles_and_works_in_dataloader_workers(tmp_path: Path) -> None:
    images = rgb_images()
    path = write_edm_dataset(tmp_path / "d.zip", images, list(range(N)))
    ds = ImageFolderDataset(path, use_labels=True)
    ds[0]  # opens the ZIP in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(clone[5][0], ds[5][0])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    got = torch.cat([x for x, _ in batches]).numpy()
    assert np.array_equal(got, images.transpose(0, 3, 1, 2))
    assert torch.cat([y for _, y in batches]).argmax(dim=1).tolist() == list(range(N))


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("hello"), "neither a folder nor a ZIP"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "holds no images"),
    ],
)
def test_unusable_paths_are_clear_errors(tmp_path: Path, setup, message: str) -> None:
    path = tmp_path / "data.zip"
    setup(path)
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(path)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    path = write_edm_dataset(tmp_path / "d", rgb_images(2), None)
    (path / "00000" / "img00000001.png").write_bytes(png_bytes(rgb_images(1)[0])[:60])
    with pytest.raises(DatasetError, match="img00000001.png"):
        ImageFolderDataset(path)[1]


def test_missing_label_and_malformed_labels_file(tmp_path: Path) -> None:
    path = write_edm_dataset(tmp_path / "d", rgb_images(2), [0, 1])
    (path / "dataset.json").write_text(json.dumps({"labels": [["00000/img00000000.png", 0]]}))
    with pytest.raises(DatasetError, match="no label for 00000/img00000001.png"):
        ImageFolderDataset(path, use_labels=True)
    (path / "dataset.json").write_text('{"labels": [["00000/img00000000.png", -1]]}')
    with pytest.raises(DatasetError, match="labels entry 0"):
        ImageFolderDataset(path, use_labels=True)


def test_format_helpers_match_edm() -> None:
    assert archive_name(0) == "00000/img00000000.png"
    assert archive_name(1234) == "00001/img00001234.png"
    assert archive_name(49999) == "00049/img00049999.png"
    assert labels_json([("00000/img00000000.png", 6), ("00000/img00000001.png", 9)]) == (
        '{"labels": [["00000/img00000000.png", 6], ["00000/img00000001.png", 9]]}'
    )
    assert labels_json(None) == '{"labels": null}'


@pytest.mark.parametrize("name", ["out.zip", "out"])
def test_writer_is_atomic(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "sub" / name
    with pytest.raises(RuntimeError):
        with dataset_writer(dest) as write:
            write("00000/img00000000.png", b"x")
            raise RuntimeError("interrupted")
    assert list((tmp_path / "sub").iterdir()) == []
    with dataset_writer(dest) as write:
        write("00000/img00000000.png", png_bytes(rgb_images(1)[0]))
        assert not dest.exists()  # only under a temporary name until complete
    assert len(ImageFolderDataset(dest)) == 1
