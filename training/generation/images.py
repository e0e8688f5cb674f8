"""Images out of the sampler: uint8 quantisation (as PNGs store them) and PNG grids."""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image
import torch

from dnnlib.util import atomic_write


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [B, C, H, W] to uint8 [B, H, W, C], rounding as EDM's generate.py does."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def picture(image_uint8: np.ndarray) -> PIL.Image.Image:
    """One uint8 image [H, W, C] as a PIL picture: grayscale for one channel, RGB for three."""
    return PIL.Image.fromarray(image_uint8[:, :, 0] if image_uint8.shape[2] == 1 else image_uint8, "L" if image_uint8.shape[2] == 1 else "RGB")


def grid(images_uint8: np.ndarray, cols: int | None = None, pad: int = 1, pad_value: int = 128,
         scale: int = 1) -> PIL.Image.Image:
    """Tile uint8 images [B, H, W, C] into one picture, `cols` across (default: a near-square grid),
    separated by `pad` pixels of gray so that images filling their frame stay apart; `scale` enlarges the whole
    picture by pixel repetition (every `scale`-th pixel of it is the picture at scale 1)."""
    count, h, w, c = images_uint8.shape
    cols = cols or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    canvas = np.full([rows * (h + pad) - pad, cols * (w + pad) - pad, c], pad_value, dtype=np.uint8)
    for i in range(count):
        r, q = divmod(i, cols)
        top, left = r * (h + pad), q * (w + pad)
        canvas[top : top + h, left : left + w] = images_uint8[i]
    if scale > 1:
        canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return picture(canvas)


def view_scale(resolution: int, tile: int = 64) -> int:
    """The integer factor that shows images of `resolution` pixels at `tile` pixels or more (1 from `tile` up)."""
    return max(1, tile // max(int(resolution), 1))


def save_png(path: str | os.PathLike, picture: PIL.Image.Image) -> None:
    """Write a PNG atomically."""
    with atomic_write(path) as f:
        picture.save(f, format="PNG")
