"""Augmentation: exact pixel blits, geometry checked by centres of mass, EDM's probabilities and labels."""

import dataclasses
import math

import pytest
import scipy.stats
import torch

from torch_utils import rng
from training.augment import AugmentDraws, AugmentPipe, sample_bilinear_reflect

OFF = dict(xflip=0, yflip=0, rotate_int=0, translate_int=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)
ALL = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)


def _only(p=1.0, **kwargs) -> AugmentPipe:
    """A pipe with every transform off except those named."""
    return AugmentPipe(p=p, **{**OFF, **kwargs})


def _images(shape=(4, 3, 16, 16), seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1)


def _blob(x0, y0, H=64, W=64, sigma=2.0) -> torch.Tensor:
    """A Gaussian blob centred on pixel position (x0, y0) (x right, y down), in [-1, 1], [1, 1, H, W] float64."""
    y = torch.arange(H, dtype=torch.float64)[:, None]
    x = torch.arange(W, dtype=torch.float64)[None, :]
    return (2 * torch.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma**2)) - 1)[None, None]


def _centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    """[B, 2] (x, y) centre of mass of images + 1 (pixel positions)."""
    mass = (images + 1).sum(dim=1)  # [B, H, W]
    H, W = mass.shape[1:]
    total = mass.sum(dim=(1, 2))
    x = (mass * torch.arange(W, dtype=mass.dtype)).sum(dim=(1, 2)) / total
    y = (mass * torch.arange(H, dtype=mass.dtype)[:, None]).sum(dim=(1, 2)) / total
    return torch.stack([x, y], dim=1)


def _pad_shift(image: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """Oracle: content moved by (tx right, ty down) pixels with F.pad's reflect padding."""
    H, W = image.shape[-2:]
    padded = torch.nn.functional.pad(image[None], [abs(tx)] * 2 + [abs(ty)] * 2, mode="reflect")[0]
    return padded[..., abs(ty) - ty : abs(ty) - ty + H, abs(tx) - tx : abs(tx) - tx + W]


# ---------------------------------------------------------------------------------------------------------------
# Configuration, identity, bad input.


def test_defaults_are_edms_training_configuration():
    pipe = AugmentPipe(p=0.12)
    assert pipe.label_dim == 9
    assert pipe.label_names == ["xflip", "yflip", "scale", "rotate_frac_cos", "rotate_frac_sin", "aniso_cos",
                                "aniso_sin", "translate_frac_x", "translate_frac_y"]  # fmt: skip
    assert pipe.probabilities["xflip"] == 1.0 and pipe.probabilities["yflip"] == pytest.approx(0.12)
    assert type(pipe)(**pipe.init_kwargs).init_kwargs == pipe.init_kwargs


@pytest.mark.parametrize("config", [{}, ALL], ids=["edm", "all"])
def test_p0_is_the_identity_with_zero_labels(config):
    images = _images()
    pipe = AugmentPipe(p=0, **config)
    out, labels = pipe(images, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, images)
    assert labels.shape == (4, pipe.label_dim) and labels.dtype == torch.float32
    assert torch.equal(labels, torch.zeros_like(labels))


@pytest.mark.parametrize("kwargs, name", [
    (dict(p=-0.1), "p"), (dict(p=1.5), "p"), (dict(p=math.nan), "p"), (dict(xflip=-1), "xflip"),
    (dict(translate_frac=-0.5), "translate_frac"), (dict(scale_std=-1), "scale_std"),
    (dict(aniso_rotate_prob=1.5), "aniso_rotate_prob"), (dict(translate_int_max=math.inf), "translate_int_max"),
])  # fmt: skip
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=rf"AugmentPipe: {name}\b"):
        AugmentPipe(**kwargs)


@pytest.mark.parametrize("images, pipe", [
    (torch.zeros(3, 8, 8), AugmentPipe()),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), AugmentPipe()),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), AugmentPipe()),
    ([[0.0]], AugmentPipe()),
    (torch.zeros(2, 3, 8, 6), _only(rotate_int=1)),
    (torch.zeros(2, 3, 1, 1), _only(scale=1)),
])  # fmt: skip
def test_bad_images_raise_value_error(images, pipe):
    with pytest.raises(ValueError):
        pipe(images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_shape_dtype_device_preserved_and_constant_stays_constant(dtype):
    pipe = AugmentPipe(p=1, **ALL)
    images = torch.full([6, 3, 12, 12], 0.3, dtype=dtype)
    out, labels = pipe(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
    assert labels.shape == (6, 13) and labels.abs().sum() > 0
    assert torch.equal(out, images)  # reflect padding brings in no other value; lerp(a, a, w) == a


# ---------------------------------------------------------------------------------------------------------------
# Pixel blits: exact.


@pytest.mark.parametrize("name, dim", [("xflip", 3), ("yflip", 2)])
def test_flips_are_exact_and_labelled(name, dim):
    images = _images((64, 3, 8, 8))
    out, labels = _only(**{name: 1})(images, generator=torch.Generator().manual_seed(0))
    assert labels.shape == (64, 1)
    flipped = labels[:, 0] == 1
    assert torch.equal(out[flipped], images[flipped].flip(dim))
    assert torch.equal(out[~flipped], images[~flipped])
    assert 0 < flipped.sum() < 64 and set(labels[:, 0].tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("name", ["xflip", "yflip"])
@pytest.mark.parametrize("p, multiplier", [(1.0, 1.0), (1.0, 0.5), (0.12, 1e8), (0.3, 1.0)])
def test_flip_frequency_is_edms(name, p, multiplier):
    """EDM: the flip is chosen with probability min(p * multiplier, 1), then done with probability 1/2."""
    n = 4000
    _, labels = _only(p=p, **{name: multiplier})(torch.zeros(n, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    expected = min(p * multiplier, 1.0) / 2
    assert scipy.stats.binomtest(int(labels[:, 0].sum()), n, expected).pvalue > 1e-3


def test_rotate_int_is_torch_rot90_with_k_read_from_labels():
    images = _images((200, 2, 6, 6))
    out, labels = _only(rotate_int=1)(images, generator=torch.Generator().manual_seed(0))
    code = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}  # EDM's two bits: (k in {1, 2}, k in {2, 3})
    ks = [code[(int(a), int(b))] for a, b in labels.tolist()]
    for image, result, k in zip(images, out, ks):
        assert torch.equal(result, torch.rot90(image, k, (1, 2)))
    counts = torch.bincount(torch.tensor(ks), minlength=4)
    assert scipy.stats.chisquare(counts.numpy()).pvalue > 1e-3  # uniform over the four quarter turns


def test_translate_int_is_a_reflect_padded_integer_shift():
    H, W, max_frac = 12, 16, 0.25
    images = _images((40, 2, H, W))
    pipe = _only(translate_int=1, translate_int_max=max_frac)
    out, labels = pipe(images, generator=torch.Generator().manual_seed(0))
    shifts = (labels * torch.tensor([W * max_frac, H * max_frac])).round().long()
    torch.testing.assert_close(shifts.float(), labels * torch.tensor([W * max_frac, H * max_frac]), rtol=0, atol=1e-5)
    assert shifts[:, 0].abs().max() <= W * max_frac and shifts[:, 1].abs().max() <= H * max_frac
    assert len(set(map(tuple, shifts.tolist()))) > 10
    for image, result, (tx, ty) in zip(images, out, shifts.tolist()):
        assert torch.equal(result, _pad_shift(image, tx, ty))
        # Interior: output pixel (y, x) is source pixel (y - ty, x - tx).
        assert torch.equal(result[:, 4 + ty : 8 + ty, 4 + tx : 12 + tx], image[:, 4:8, 4:12])


# ---------------------------------------------------------------------------------------------------------------
# Fractional transforms: bilinear resampling, checked against geometry.


@pytest.mark.parametrize("kwargs, draws", [
    (dict(scale=1, scale_std=0), dict(scale=1.3)),  # 2^(1.3 * 0) = 1
    (dict(rotate_frac=1), dict(rotate_frac=2 * math.pi)),
    (dict(aniso=1, aniso_std=0), dict(aniso=0.7, aniso_axis=0.4)),
    (dict(translate_frac=1, translate_frac_std=0), dict(translate_frac=(0.5, -0.5))),
    (dict(scale=1, rotate_frac=1), dict(scale=0.0, rotate_frac=-2 * math.pi)),
])  # fmt: skip
def test_identity_parameters_return_the_input(kwargs, draws):
    """Non-zero draws whose composed map is the identity go through the resampler and change nothing."""
    images = _images((3, 3, 16, 20), dtype=torch.float64).float()
    d = _draws(3, **draws)
    out, _ = _only(**kwargs).apply(images, d)
    torch.testing.assert_close(out, images, rtol=0, atol=1e-5)


def _draws(batch, **values) -> AugmentDraws:
    d = AugmentDraws.identity(batch)
    updates = {k: torch.tensor(v, dtype=torch.float32).expand_as(getattr(d, k)).clone() for k, v in values.items()}
    return dataclasses.replace(d, **updates)


@pytest.mark.parametrize("shift", [(2.5, -1.75), (-6.3, 4.1), (0.0, 0.4)])
def test_fractional_translation_moves_the_centre_of_mass(shift):
    std, W, H = 0.125, 64, 48
    image = _blob(30.0, 22.0, H=H, W=W)
    d = _draws(1, translate_frac=(shift[0] / (W * std), shift[1] / (H * std)))
    out, labels = _only(translate_frac=1, translate_frac_std=std).apply(image, d)
    moved = _centre_of_mass(out) - _centre_of_mass(image)
    torch.testing.assert_close(moved, torch.tensor([shift], dtype=torch.float64), rtol=0, atol=1e-3)
    torch.testing.assert_close(labels, d.translate_frac)


@pytest.mark.parametrize("theta, k", [(math.pi / 2, 1), (-math.pi / 2, 3), (math.pi, 2)])
def test_fractional_rotation_by_quarter_turns_matches_rot90(theta, k):
    images = _images((2, 3, 16, 16))
    out, labels = _only(rotate_frac=1).apply(images, _draws(2, rotate_frac=theta))
    torch.testing.assert_close(out, torch.rot90(images, k, (2, 3)), rtol=0, atol=1e-5)
    torch.testing.assert_close(labels[0], torch.tensor([math.cos(theta) - 1, math.sin(theta)]), rtol=0, atol=1e-6)


def test_fractional_integer_translation_matches_reflect_padding():
    """Bilinear sampling with reflection == interpolating F.pad(mode='reflect') without limit, up to the borders."""
    images = _images((1, 2, 10, 14))
    std = 0.125
    draws = _draws(1, translate_frac=(3 / (14 * std), -2 / (10 * std)))  # +3 px in x, -2 px in y
    out, _ = _only(translate_frac=1, translate_frac_std=std).apply(images, draws)
    torch.testing.assert_close(out[0], _pad_shift(images[0], 3, -2), rtol=0, atol=1e-5)


def test_bilinear_reflect_sampling_matches_grid_sample():
    """Oracle: torch's grid_sample with reflection about the edge pixel centres (align_corners=True)."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand([3, 2, 9, 13], generator=g, dtype=torch.float64)
    x = torch.rand([3, 7, 5], generator=g, dtype=torch.float64) * 60 - 25  # far outside: several reflections
    y = torch.rand([3, 7, 5], generator=g, dtype=torch.float64) * 40 - 15
    grid = torch.stack([x / 6 - 1, y / 4 - 1], dim=3)  # pixel position -> [-1, 1] over the pixel centres
    expected = torch.nn.functional.grid_sample(images, grid, padding_mode="reflection", align_corners=True)  # bilinear
    torch.testing.assert_close(sample_bilinear_reflect(images, x, y), expected, rtol=0, atol=1e-12)


def test_anisotropic_scaling_stretches_along_its_axis():
    """A blob at distance 8 along the axis moves to 8a, one across it to 8/a (a = 2^(w aniso_std))."""
    w, r, std = 1.5, 0.6, 0.2
    a = 2 ** (w * std)
    along = torch.tensor([math.cos(r), -math.sin(r)], dtype=torch.float64)  # counter-clockwise on screen, y down
    across = torch.tensor([math.sin(r), math.cos(r)], dtype=torch.float64)
    centre = torch.tensor([31.5, 31.5], dtype=torch.float64)
    pipe = _only(aniso=1, aniso_std=std)
    for direction, factor in ((along, a), (across, 1 / a)):
        image = _blob(*(centre + 8 * direction).tolist())
        out, _ = pipe.apply(image, _draws(1, aniso=w, aniso_axis=r))
        torch.testing.assert_close(_centre_of_mass(out)[0], centre + 8 * factor * direction, rtol=0, atol=0.02)


@pytest.mark.parametrize("name", ["scale", "rotate_frac", "translate_frac"])
def test_drawn_labels_describe_the_applied_transform(name):
    """Blobs at (8, -4) from the centre land where the labelled scale / rotation / translation puts them."""
    B, std = 8, dict(scale=0.2, rotate_frac=None, translate_frac=0.05)[name]
    centre = torch.tensor([31.5, 31.5], dtype=torch.float64)
    offset = torch.tensor([8.0, -4.0], dtype=torch.float64)
    images = _blob(*(centre + offset).tolist()).expand(B, 3, 64, 64)
    kwargs = {f"{name}_std": std} if std is not None else {}
    out, labels = _only(**{name: 1}, **kwargs)(images, generator=torch.Generator().manual_seed(7))
    labels = labels.double()
    if name == "scale":
        expected = centre + offset * 2 ** (labels[:, :1] * std)
    elif name == "rotate_frac":
        c, s = labels[:, 0] + 1, labels[:, 1]
        expected = centre + torch.stack([offset[0] * c + offset[1] * s, -offset[0] * s + offset[1] * c], dim=1)
    else:
        expected = centre + offset + labels * 64 * std
    assert labels.abs().min() > 0  # every sample was transformed (p = 1)
    torch.testing.assert_close(_centre_of_mass(out), expected, rtol=0, atol=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Randomness.


def test_per_sample_generators_make_samples_independent_of_the_batch():
    pipe = AugmentPipe(p=0.7, **ALL)
    images = _images((5, 3, 16, 16))
    out, labels = pipe(images, generator=rng.seeded_generators(range(10, 15)))
    for i in range(5):
        one, one_labels = pipe(images[i : i + 1], generator=rng.seeded_generators([10 + i]))
        assert torch.equal(one[0], out[i]) and torch.equal(one_labels[0], labels[i])


def test_same_generator_same_result_and_no_global_rng():
    pipe = AugmentPipe(p=0.5, **ALL)
    images = _images((6, 3, 16, 16))
    state = torch.random.get_rng_state()
    a = pipe(images, generator=torch.Generator().manual_seed(4))
    b = pipe(images, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_without_host_syncs():
    pipe = AugmentPipe(p=0.5, **ALL)
    images = _images((8, 3, 32, 32)).cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    pipe(images, generator=generator)  # warm-up (lazy initialisation may synchronise)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, labels = pipe(images, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device == images.device and labels.device == images.device
    draws = pipe.draw(8, "cpu", torch.Generator().manual_seed(1))
    on_cuda = AugmentDraws(**{f.name: getattr(draws, f.name).cuda() for f in dataclasses.fields(draws)})
    expected, expected_labels = pipe.apply(images.cpu(), draws)
    out, labels = pipe.apply(images, on_cuda)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(labels.cpu(), expected_labels)
