"""Channel conversion and geometry (resize, centre crops, padding) for dataset_tool.py."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import numpy as np
import PIL.Image
import psutil

from training.datasets.format import DatasetError

TRANSFORMS = ("center-crop", "center-crop-wide", "pad")
CHANNELS = ("keep", "rgb", "gray")
PIXEL_BYTES = 4  # PIL holds an 8-bit RGB pixel in 4 bytes
IMAGE_COPIES = 6  # copies of one output image alive at once: resize passes, a canvas, the PNG and its buffer


def parse_resolution(text: str) -> tuple[int, int]:
    """Parse 'WxH' or 'W,H' (e.g. '64x64') into (W, H)."""
    match = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"cannot read resolution {text!r}: write width x height, e.g. 64x64")
    return int(match[1]), int(match[2])


Transform = Callable[[PIL.Image.Image, str], PIL.Image.Image]


def to_8bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """16-bit grayscale (PIL 'I;16*', or 'I' in 0..65535) as 8-bit 'L', value * 255 / 65535 rounded; others as given.

    PIL's own conversion clips such images at 255. Floating-point images ('F') and 32-bit integers beyond
    16 bits have no known range, so they are refused rather than guessed.
    """
    if image.mode == "F":
        raise DatasetError(f"{name} is a floating-point image, whose range is unknown; save it as an 8- or 16-bit PNG")
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DatasetError(f"{name} holds 32-bit values outside 0..65535, whose range is unknown; save it as an 8- "
                           "or 16-bit PNG")
    return PIL.Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8))  # rounds: no ties


def set_channels(image: PIL.Image.Image, channels: str, name: str) -> PIL.Image.Image:
    """An 'L' or 'RGB' image: converted for --channels=rgb|gray; for 'keep' as stored (palettes expanded).

    16-bit grayscale is scaled to 8 bits first (`to_8bit`); PIL reads 16-bit colour as its high bytes.
    """
    image = to_8bit(image, name)
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
    check_output_size((w, w) if transform == "center-crop-wide" else (w, h))
    step = {None: _resize, "center-crop": _center_crop, "center-crop-wide": _center_crop_wide, "pad": _pad}
    return functools.partial(step[transform], (w, h))


def check_output_size(size: tuple[int, int]) -> None:
    """Refuse output images larger than PIL opens (its decompression-bomb limit) or memory holds a few copies of."""
    limits = [(psutil.virtual_memory().available // (PIXEL_BYTES * IMAGE_COPIES), "the available memory")]
    if PIL.Image.MAX_IMAGE_PIXELS:
        limits.append((PIL.Image.MAX_IMAGE_PIXELS, "PIL's decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS)"))
    limit, what = min(limits)
    (w, h), pixels = size, size[0] * size[1]
    if pixels > limit:
        side = math.isqrt(limit)
        raise DatasetError(
            f"--resolution gives {w}x{h} images ({pixels / 1e6:.0f} megapixels), more than {what} allows "
            f"({limit / 1e6:.0f} megapixels); the largest that fits is --resolution={side}x{side}"
        )


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
