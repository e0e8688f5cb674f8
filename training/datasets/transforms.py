"""Channel conversion and geometry (resize, centre crops, padding) for dataset_tool.py."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import PIL.Image

from training.datasets.format import DatasetError

TRANSFORMS = ("center-crop", "center-crop-wide", "pad")
CHANNELS = ("keep", "rgb", "gray")


def parse_resolution(text: str) -> tuple[int, int]:
    """Parse 'WxH' or 'W,H' (e.g. '64x64') into (W, H)."""
    match = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"cannot read resolution {text!r}: write width x height, e.g. 64x64")
    return int(match[1]), int(match[2])


Transform = Callable[[PIL.Image.Image, str], PIL.Image.Image]


def set_channels(image: PIL.Image.Image, channels: str, name: str) -> PIL.Image.Image:
    """An 'L' or 'RGB' image: converted for --channels=rgb|gray; for 'keep' as stored (palettes expanded)."""
    if channels in ("rgb", "gray"):
        mode = "RGB" if channels == "rgb" else "L"
        return image if image.mode == mode else image.convert(mode)  # drops alpha
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        raise DatasetError(f"{name} has an alpha channel ({image.mode}); pass --channels=rgb (or gray) to drop it")
    raise DatasetError(f"{name} is a {image.mode} image; pass --channels=rgb or --channels=gray to convert it")


def make_transform(transform: str | None, resolution: tuple[int, int] | None) -> Transform:
    """The geometry step for --transform and --resolution=WxH; checks that the output will be square."""
    if transform is not None and transform not in TRANSFORMS:
        raise DatasetError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if resolution is None:
        if transform is not None:
            raise DatasetError(f"--transform={transform} needs --resolution=WxH, e.g. --resolution=64x64")
        return lambda image, name: image
    w, h = resolution
    if transform == "center-crop-wide" and h > w:
        raise DatasetError(f"--transform=center-crop-wide letterboxes wide images: it needs W >= H, not {w}x{h}")
    if transform != "center-crop-wide" and w != h:
        raise DatasetError(
            f"--resolution={w}x{h} is not square and training needs square images: use --resolution={w}x{w}, "
            f"or --transform=center-crop-wide to letterbox {w}x{h} images into {w}x{w}"
        )
    step = {None: _resize, "center-crop": _center_crop, "center-crop-wide": _center_crop_wide, "pad": _pad}
    return functools.partial(step[transform], (w, h))


def _resize(size: tuple[int, int], image: PIL.Image.Image, name: str = "") -> PIL.Image.Image:
    """Lanczos resize to `size`; an image already of that size is returned untouched."""
    return image if image.size == size else image.resize(size, PIL.Image.Resampling.LANCZOS)


def _center_crop(size: tuple[int, int], image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """The central square, resized to `size`."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return _resize(size, image.crop((left, top, left + side, top + side)))


def _center_crop_wide(size: tuple[int, int], image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """The central W:H region, resized to WxH and centred on a black WxW canvas (EDM's letterbox)."""
    (W, H), (w, h) = size, image.size
    if w * H > W * h:  # wider than W:H: crop columns
        cw = max(1, round(h * W / H))
        box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
    else:  # taller: crop rows
        ch = max(1, round(w * H / W))
        box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    canvas = PIL.Image.new(image.mode, (W, W), 0)
    canvas.paste(_resize((W, H), image.crop(box)), (0, (W - H) // 2))
    return canvas


def _pad(size: tuple[int, int], image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """The image centred on a black canvas of `size` (EDM's MNIST 28x28 -> 32x32)."""
    (W, H), (w, h) = size, image.size
    if w > W or h > H:
        raise DatasetError(f"{name} is {w}x{h}, larger than --resolution={W}x{H}; --transform=pad only adds borders")
    canvas = PIL.Image.new(image.mode, (W, H), 0)
    canvas.paste(image, ((W - w) // 2, (H - h) // 2))
    return canvas
