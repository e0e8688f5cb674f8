"""Non-leaky geometric augmentation (EDM, Karras et al. 2022, Appendix F.2; after StyleGAN2-ADA).

Each transform is chosen per sample with probability min(p * multiplier, 1); the network is told what
was done through `augment_labels`, and at sampling time the labels are zero, so the augmentations do
not leak into generated images. EDM trains with `AugmentPipe(p, xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1)`, the defaults here, which give 9 labels.

Conventions (pixel coordinates, x to the right, y down, as an image is displayed):
- xflip / yflip: once chosen, the image is mirrored with probability 1/2 (as in EDM: so xflip=1e8 flips
  half of the images, not all of them).
- rotate_int: once chosen, k ~ U{0, 1, 2, 3} quarter turns counter-clockwise (`torch.rot90(x, k, (2, 3))`);
  needs square images.
- translate_int: the content moves by round(U(-1, 1) * size * translate_int_max) pixels, reflect padding.
- scale: factor 2^(w * scale_std), w ~ N(0, 1).
- rotate_frac: angle theta ~ U(-pi, pi) * rotate_frac_max, counter-clockwise.
- aniso: stretch 2^(w * aniso_std) along an axis at angle r and its inverse across it, w ~ N(0, 1);
  r ~ U(-pi, pi) with probability aniso_rotate_prob, else r = 0 (the x axis).
- translate_frac: the content moves by (w_x W, w_y H) * translate_frac_std pixels, w ~ N(0, 1).
The four fractional transforms compose into one affine map, content' = T A R S content, about the
image centre, applied once.

Resampling: bilinear interpolation at positions mirrored about the outermost pixel centres, which is
exactly bilinear interpolation of the image reflect-padded without limit (F.pad's 'reflect', the padding
EDM uses; the same as grid_sample(padding_mode='reflection', align_corners=True)), so no padding size
has to be read back from the device; a constant image stays exactly constant. EDM instead resamples on
a 2x grid upsampled with a sym6 wavelet filter; plain bilinear blurs a little and aliases when
shrinking. Samples with no fractional transform are returned untouched, bit for bit.

Labels, one block per transform whose multiplier is > 0, in this order (zero where not applied):
  xflip [1]: 1 if mirrored; yflip [1]: 1 if mirrored;
  rotate_int [2]: (k in {1, 2}, k in {2, 3});
  translate_int [2]: pixels / (size * translate_int_max), x then y;
  scale [1]: w; rotate_frac [2]: (cos theta - 1, sin theta); aniso [2]: (w cos r, w sin r);
  translate_frac [2]: (w_x, w_y).
These are EDM's labels (EDM's y translation moves content up in translate_int; here every y is down).
EDM's aniso labels give (w, r) and (-w, r + pi), a stretch and its inverse, the same label; they are
kept for fidelity to EDM ((w cos 2r, w sin 2r) would tell the two apart).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dnnlib.util import records_init_kwargs
from torch_utils import rng

AUGMENTATIONS = ("xflip", "yflip", "rotate_int", "translate_int", "scale", "rotate_frac", "aniso", "translate_frac")
GEOMETRIC = ("scale", "rotate_frac", "aniso", "translate_frac")
LABEL_NAMES = {
    "xflip": ("xflip",),
    "yflip": ("yflip",),
    "rotate_int": ("rotate_int_x", "rotate_int_y"),
    "translate_int": ("translate_int_x", "translate_int_y"),
    "scale": ("scale",),
    "rotate_frac": ("rotate_frac_cos", "rotate_frac_sin"),
    "aniso": ("aniso_cos", "aniso_sin"),
    "translate_frac": ("translate_frac_x", "translate_frac_y"),
}
_UNIFORMS, _NORMALS = 16, 4  # draws per sample, the same for every configuration


@dataclasses.dataclass
class AugmentDraws:
    """Per-sample augmentation parameters; each is zero (the identity) where its transform was not chosen."""

    xflip: torch.Tensor  # [B] int64, 1 = mirrored left-right
    yflip: torch.Tensor  # [B] int64, 1 = mirrored top-bottom
    rotate_int: torch.Tensor  # [B] int64, quarter turns counter-clockwise
    translate_int: torch.Tensor  # [B, 2] w in [-1, 1]: shift round(w_x W, w_y H) * translate_int_max pixels
    scale: torch.Tensor  # [B] w: scale factor 2^(w * scale_std)
    rotate_frac: torch.Tensor  # [B] radians counter-clockwise
    aniso: torch.Tensor  # [B] w: stretch 2^(w * aniso_std) along the axis
    aniso_axis: torch.Tensor  # [B] the axis's angle, radians counter-clockwise from +x
    translate_frac: torch.Tensor  # [B, 2] w: shift (w_x W, w_y H) * translate_frac_std pixels

    @classmethod
    def identity(cls, batch: int, device: torch.device | str = "cpu") -> AugmentDraws:
        """Draws that change nothing (a starting point to set parameters by hand)."""
        i, f = dict(dtype=torch.int64, device=device), dict(dtype=torch.float32, device=device)
        return cls(xflip=torch.zeros(batch, **i), yflip=torch.zeros(batch, **i), rotate_int=torch.zeros(batch, **i),
                   translate_int=torch.zeros(batch, 2, **f), scale=torch.zeros(batch, **f),
                   rotate_frac=torch.zeros(batch, **f), aniso=torch.zeros(batch, **f),
                   aniso_axis=torch.zeros(batch, **f), translate_frac=torch.zeros(batch, 2, **f))  # fmt: skip


def _number(name: str, value: float, hi: float = math.inf) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0 <= value <= hi):
        bound = "finite and >= 0" if hi == math.inf else f"in [0, {hi:g}]"
        raise ValueError(f"AugmentPipe: {name} must be {bound}, got {value}")
    return value


@records_init_kwargs
class AugmentPipe:
    """EDM's geometric augmentation: `images, augment_labels = pipe(images, generator)`."""

    def __init__(
        self,
        p: float = 0.12,
        xflip: float = 1e8,
        yflip: float = 1,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale: float = 1,
        rotate_frac: float = 1,
        aniso: float = 1,
        translate_frac: float = 1,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ):
        self.p = _number("p (the overall augmentation probability)", p, hi=1)
        given = (xflip, yflip, rotate_int, translate_int, scale, rotate_frac, aniso, translate_frac)
        self.multipliers = {name: _number(f"{name} (a multiplier)", m) for name, m in zip(AUGMENTATIONS, given)}
        self.translate_int_max = _number("translate_int_max", translate_int_max)
        self.scale_std = _number("scale_std", scale_std)
        self.rotate_frac_max = _number("rotate_frac_max", rotate_frac_max)
        self.aniso_std = _number("aniso_std", aniso_std)
        self.aniso_rotate_prob = _number("aniso_rotate_prob", aniso_rotate_prob, hi=1)
        self.translate_frac_std = _number("translate_frac_std", translate_frac_std)
        self.enabled = tuple(name for name in AUGMENTATIONS if self.multipliers[name] > 0)

    @property
    def probabilities(self) -> dict[str, float]:
        """Per-sample probability that each transform is chosen: min(p * multiplier, 1)."""
        return {name: min(self.p * m, 1.0) for name, m in self.multipliers.items()}

    @property
    def label_names(self) -> list[str]:
        """What each column of `augment_labels` holds."""
        return [label for name in self.enabled for label in LABEL_NAMES[name]]

    @property
    def label_dim(self) -> int:
        """Width of `augment_labels` (the network's augment_dim): 9 for EDM's configuration."""
        return len(self.label_names)

    def __call__(self, images: torch.Tensor, generator: rng.Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images, labels [B, label_dim] float32) for float images [B, C, H, W] in [-1, 1]."""
        self._check(images)
        return self.apply(images, self.draw(images.shape[0], images.device, generator))

    def draw(self, batch: int, device: torch.device | str, generator: rng.Generators = None) -> AugmentDraws:
        """Per-sample parameters; with one generator per sample, row i depends on generator i alone."""
        u = rng.rand([batch, _UNIFORMS], generator, device=device, dtype=torch.float32)
        z = rng.randn([batch, _NORMALS], generator, device=device, dtype=torch.float32)
        chosen = {name: u[:, i] < self.probabilities[name] for i, name in enumerate(AUGMENTATIONS)}
        zero = torch.zeros_like(u[:, 0])

        def keep(name: str, value: torch.Tensor) -> torch.Tensor:
            mask = chosen[name] if value.ndim == 1 else chosen[name][:, None]
            return torch.where(mask, value, torch.zeros_like(value))

        angle = (u[:, 13] * 2 - 1) * math.pi
        axis = torch.where(u[:, 15] < self.aniso_rotate_prob, (u[:, 14] * 2 - 1) * math.pi, zero)
        return AugmentDraws(
            xflip=keep("xflip", (u[:, 8] < 0.5).long()),
            yflip=keep("yflip", (u[:, 9] < 0.5).long()),
            rotate_int=keep("rotate_int", (u[:, 10] * 4).floor().clamp(max=3).long()),
            translate_int=keep("translate_int", u[:, 11:13] * 2 - 1),
            scale=keep("scale", z[:, 0]),
            rotate_frac=keep("rotate_frac", angle * self.rotate_frac_max),
            aniso=keep("aniso", z[:, 1]),
            aniso_axis=axis,
            translate_frac=keep("translate_frac", z[:, 2:4]),
        )

    def apply(self, images: torch.Tensor, draws: AugmentDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the enabled transforms with the given parameters; returns (images, labels)."""
        self._check(images)
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        on = set(self.enabled)
        if "xflip" in on:
            images = torch.where(draws.xflip.bool()[:, None, None, None], images.flip(3), images)
        if "yflip" in on:
            images = torch.where(draws.yflip.bool()[:, None, None, None], images.flip(2), images)
        if "rotate_int" in on:
            k = draws.rotate_int[:, None, None, None]
            upright = images
            for turns in (1, 2, 3):
                images = torch.where(k == turns, upright.rot90(turns, (2, 3)), images)
        if "translate_int" in on:
            images = translate_int(images, self.translate_int_pixels(draws, *images.shape[2:]))
        if on & set(GEOMETRIC):
            images = self._warp(images, draws)
        if channels_last:  # the layout comes back as it came in (--channels_last: no conversion before the network)
            images = images.contiguous(memory_format=torch.channels_last)
        return images, self.labels(draws, images.shape[2], images.shape[3])

    def labels(self, draws: AugmentDraws, H: int, W: int) -> torch.Tensor:
        """The conditioning labels [B, label_dim] (float32) of `draws` on H x W images."""
        f = lambda x: x.to(torch.float32)  # noqa: E731
        k, extent = draws.rotate_int, self.translate_int_max
        shift = _per_axis(f(self.translate_int_pixels(draws, H, W)), 1 / (W * extent or 1), 1 / (H * extent or 1))
        blocks = {
            "xflip": [f(draws.xflip)],
            "yflip": [f(draws.yflip)],
            "rotate_int": [f((k == 1) | (k == 2)), f((k == 2) | (k == 3))],
            "translate_int": list(shift.unbind(1)),  # pixels / (size * translate_int_max), in [-1, 1]
            "scale": [draws.scale],
            "rotate_frac": [draws.rotate_frac.cos() - 1, draws.rotate_frac.sin()],
            "aniso": [draws.aniso * draws.aniso_axis.cos(), draws.aniso * draws.aniso_axis.sin()],
            "translate_frac": list(draws.translate_frac.unbind(1)),
        }
        columns = [f(column) for name in self.enabled for column in blocks[name]]
        return torch.stack(columns, dim=1) if columns else torch.zeros([k.shape[0], 0], device=k.device)

    def affine(self, draws: AugmentDraws, H: int, W: int) -> torch.Tensor:
        """[B, 2, 3] map from output to input pixel positions, both relative to the image centre.

        The content moves by T A R S (scale, then rotation, anisotropy, translation); this is its inverse.
        """
        s = (draws.scale * -self.scale_std).exp2()  # S^-1 = s I
        c, n = draws.rotate_frac.cos(), draws.rotate_frac.sin()
        R_inv = _mat2(c, -n, n, c)  # R(theta) moves (x, y) to (x c + y n, -x n + y c): counter-clockwise on screen
        a = (draws.aniso * self.aniso_std).exp2()
        cr, sr = draws.aniso_axis.cos(), draws.aniso_axis.sin()  # the axis is (cr, -sr) on screen
        off = cr * sr * (a - 1 / a)  # A^-1 = R(r) diag(1/a, a) R(r)^-1
        A_inv = _mat2(cr * cr / a + sr * sr * a, off, off, sr * sr / a + cr * cr * a)
        L_inv = _mm2(R_inv, A_inv) * s[:, None, None]
        t = _per_axis(draws.translate_frac, W * self.translate_frac_std, H * self.translate_frac_std)
        offset = -(L_inv * t[:, None, :]).sum(dim=2)  # input = L^-1 (output - t)
        return torch.cat([L_inv, offset[:, :, None]], dim=2)

    def _warp(self, images: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
        """The fractional transforms, bilinear with unlimited reflect padding; untouched samples stay exact."""
        H, W = images.shape[2:]
        work = images if images.dtype in (torch.float32, torch.float64) else images.to(torch.float32)
        m = self.affine(draws, H, W).to(work.dtype)[:, :, :, None, None]  # [B, 2, 3, 1, 1]
        cx, cy = (W - 1) / 2, (H - 1) / 2
        x = torch.arange(W, device=images.device, dtype=work.dtype).sub(cx)[None, None, :]
        y = torch.arange(H, device=images.device, dtype=work.dtype).sub(cy)[None, :, None]
        src_x = m[:, 0, 0] * x + m[:, 0, 1] * y + m[:, 0, 2] + cx  # [B, H, W], pixel positions in the input
        src_y = m[:, 1, 0] * x + m[:, 1, 1] * y + m[:, 1, 2] + cy
        warped = sample_bilinear_reflect(work, src_x, src_y).to(images.dtype)
        moved = (draws.scale != 0) | (draws.rotate_frac != 0) | (draws.aniso != 0) | (draws.translate_frac != 0).any(1)
        return torch.where(moved[:, None, None, None], warped, images)

    def translate_int_pixels(self, draws: AugmentDraws, H: int, W: int) -> torch.Tensor:
        """[B, 2] int64 whole-pixel shifts (x right, y down) of the integer translation."""
        shift = _per_axis(draws.translate_int, W * self.translate_int_max, H * self.translate_int_max)
        return shift.round().long()

    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"AugmentPipe takes float images [batch, channels, height, width] in [-1, 1], got {got} "
                             "(convert uint8 data with images.to(torch.float32) / 127.5 - 1)")
        H, W = images.shape[2:]
        if "rotate_int" in self.enabled and H != W:
            raise ValueError(f"rotate_int needs square images, got {H}x{W}; set rotate_int=0")
        if set(self.enabled) & set(GEOMETRIC) and min(H, W) < 2:
            raise ValueError(f"the fractional transforms need images of at least 2x2 pixels, got {H}x{W}")


def translate_int(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move each image's content by shift[i] = (x right, y down) whole pixels, reflect padding."""
    B, C, H, W = images.shape
    x = _reflect(torch.arange(W, device=images.device)[None, :] - shift[:, 0:1], W)  # source column of each column
    y = _reflect(torch.arange(H, device=images.device)[None, :] - shift[:, 1:2], H)
    images = images.gather(3, x[:, None, None, :].expand(B, C, H, W))
    return images.gather(2, y[:, None, :, None].expand(B, C, H, W))


def sample_bilinear_reflect(images: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of images [B, C, H, W] at pixel positions x, y [B, h, w] (0 = first pixel centre).

    Positions outside are mirrored about the outermost pixel centres first, which equals interpolating
    the image reflect-padded without limit (F.pad's 'reflect'). Written as gathers and lerps, so that a
    constant image stays exactly constant and whole-pixel positions return pixels exactly.
    """
    B, C, H, W = images.shape
    (x0, fx), (y0, fy) = _fold(x, W), _fold(y, H)
    flat = images.reshape(B, C, H * W)

    def corner(dy: int, dx: int) -> torch.Tensor:
        index = ((y0 + dy) * W + (x0 + dx)).reshape(B, 1, -1).expand(B, C, -1)
        return flat.gather(2, index).reshape(B, C, *x.shape[1:])

    fx, fy = fx[:, None].to(images.dtype), fy[:, None].to(images.dtype)
    top = torch.lerp(corner(0, 0), corner(0, 1), fx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), fx)
    return torch.lerp(top, bottom, fy)


def _fold(t: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions mirrored into [0, size - 1] (size >= 2): (index of the pixel to the left, fraction past it)."""
    t = _reflect(t, size)
    left = t.floor().clamp(max=size - 2)
    return left.long(), t - left


def _reflect(t: torch.Tensor, size: int) -> torch.Tensor:
    """Positions (integer or not) folded into [0, size - 1] by mirroring about the first and last pixel centres."""
    return (size - 1) - ((size - 1) - t.remainder(max(2 * size - 2, 1))).abs()


def _per_axis(v: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """[B, 2] (x, y) pairs scaled by (x, y), without copying constants to the device."""
    return torch.stack([v[:, 0] * x, v[:, 1] * y], dim=1)


def _mat2(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 matrices [[a, b], [c, d]] from [B] tensors."""
    return torch.stack([a, b, c, d], dim=1).reshape(-1, 2, 2)


def _mm2(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Batched 2x2 product, elementwise (row i does not depend on the batch it is in)."""
    return (P[:, :, :, None] * Q[:, None, :, :]).sum(dim=2)
