"""DDPM++ / NCSN++ / ADM networks: EDM's parameter counts and state_dict layout, EDM's outputs, and
the behaviours training relies on (labels, dropout, mixed precision, channels_last, torch.compile).

Everything but the parameter-count tests uses tiny widths (8-64 channels) so the file runs fast on CPU;
the full-size networks are built on the meta device (shapes only, no memory, no init time).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from training import preconditioners
from training.networks import NETWORKS, DhariwalUNet, EDM2UNet, Preset, SongUNet, build_network, network_kwargs, presets
from training.networks.layers import Conv2d, GroupNorm, self_attention, weight_init

# ----------------------------------------------------------------------------------------------
# Full-size configurations: parameter counts measured on EDM's published networks (REFERENCE_FACTS.md).

FULL = {
    "ddpmpp-cifar10-uncond": ("ddpmpp", dict(img_resolution=32, augment_dim=9), 55_733_891),
    "ddpmpp-cifar10-cond": ("ddpmpp", dict(img_resolution=32, augment_dim=9, label_dim=10), 55_735_299),
    "ncsnpp-cifar10-uncond": ("ncsnpp", dict(img_resolution=32, augment_dim=9), 56_397_827),
    "ncsnpp-cifar10-cond": ("ncsnpp", dict(img_resolution=32, augment_dim=9, label_dim=10), 56_400_643),
    "ddpmpp-ffhq64": ("ddpmpp", dict(img_resolution=64, augment_dim=9, channel_mult=[1, 2, 2, 2]), 61_805_571),
    # EDM's ImageNet-64 ADM: EDMPrecond (out_channels = 3, not iDDPM's 6), no augmentation labels.
    "adm-imagenet64-cond": ("adm", dict(img_resolution=64, label_dim=1000), 295_899_267),
}


@functools.lru_cache(maxsize=None)
def full_network(name: str) -> torch.nn.Module:
    """A full-size published configuration on the meta device (built once per test session)."""
    arch, kwargs, _ = FULL[name]
    with torch.device("meta"):
        return build_network(arch, in_channels=3, out_channels=3, **kwargs)


@pytest.mark.parametrize("name", list(FULL))
def test_parameter_count_equals_edm(name):
    assert sum(p.numel() for p in full_network(name).parameters()) == FULL[name][2]


# Keys and shapes follow from the architecture: C = 128 channels x mult 2 = 256 at every level of the
# CIFAR-10 networks, embedding 4 x 128 = 512, noise embedding 128 (DDPM++) or 256 (NCSN++).
EXPECTED_SHAPES = {
    "ddpmpp-cifar10-cond": {
        "map_label.weight": [128, 10], "map_label.bias": [128], "map_augment.weight": [128, 9],
        "map_layer0.weight": [512, 128], "map_layer0.bias": [512], "map_layer1.weight": [512, 512],
        "enc.32x32_conv.weight": [128, 3, 3, 3], "enc.32x32_conv.bias": [128],
        "enc.32x32_block0.norm0.weight": [128], "enc.32x32_block0.conv0.weight": [256, 128, 3, 3],
        "enc.32x32_block0.affine.weight": [256, 512], "enc.32x32_block0.norm1.bias": [256],
        "enc.32x32_block0.conv1.weight": [256, 256, 3, 3], "enc.32x32_block0.skip.weight": [256, 128, 1, 1],
        "enc.16x16_down.conv0.resample_filter": [1, 1, 2, 2], "enc.16x16_down.skip.weight": [256, 256, 1, 1],
        "enc.16x16_block0.norm2.weight": [256], "enc.16x16_block0.qkv.weight": [768, 256, 1, 1],
        "enc.16x16_block0.proj.weight": [256, 256, 1, 1],
        "dec.8x8_in0.qkv.weight": [768, 256, 1, 1], "dec.8x8_in1.conv0.weight": [256, 256, 3, 3],
        "dec.8x8_block0.conv0.weight": [256, 512, 3, 3], "dec.16x16_up.conv0.weight": [256, 256, 3, 3],
        "dec.16x16_up.conv0.resample_filter": [1, 1, 2, 2], "dec.16x16_block4.qkv.weight": [768, 256, 1, 1],
        "dec.32x32_block4.conv0.weight": [256, 384, 3, 3],
        "dec.32x32_aux_norm.weight": [256], "dec.32x32_aux_conv.weight": [3, 256, 3, 3],
    },  # fmt: skip
    "ncsnpp-cifar10-cond": {
        "map_noise.freqs": [128], "map_label.weight": [256, 10], "map_augment.weight": [256, 9],
        "map_layer0.weight": [512, 256], "enc.16x16_down.conv0.resample_filter": [1, 1, 4, 4],
        "enc.16x16_aux_residual.weight": [256, 3, 3, 3], "enc.16x16_aux_residual.resample_filter": [1, 1, 4, 4],
        "enc.8x8_aux_residual.weight": [256, 256, 3, 3], "dec.8x8_in0.proj.weight": [256, 256, 1, 1],
        "dec.16x16_up.skip.weight": [256, 256, 1, 1], "dec.32x32_aux_conv.bias": [3],
    },  # fmt: skip
    "ddpmpp-ffhq64": {
        "enc.64x64_conv.weight": [128, 3, 3, 3], "enc.64x64_block0.conv0.weight": [128, 128, 3, 3],
        "enc.32x32_block0.skip.weight": [256, 128, 1, 1], "enc.16x16_block3.qkv.weight": [768, 256, 1, 1],
        "dec.8x8_in0.qkv.weight": [768, 256, 1, 1], "dec.64x64_aux_conv.weight": [3, 128, 3, 3],
    },  # fmt: skip
    "adm-imagenet64-cond": {
        "map_label.weight": [768, 1000], "map_layer0.weight": [768, 192], "map_layer1.weight": [768, 768],
        "enc.64x64_conv.weight": [192, 3, 3, 3], "enc.64x64_block0.affine.weight": [384, 768],
        "enc.32x32_down.affine.weight": [384, 768], "enc.32x32_down.skip.resample_filter": [1, 1, 2, 2],
        "enc.32x32_block0.qkv.weight": [1152, 384, 1, 1], "enc.8x8_block2.qkv.weight": [2304, 768, 1, 1],
        "dec.8x8_in0.qkv.weight": [2304, 768, 1, 1], "dec.64x64_block3.conv0.weight": [192, 384, 3, 3],
        "out_norm.weight": [192], "out_conv.weight": [3, 192, 3, 3],
    },  # fmt: skip
}
ABSENT = {
    "ddpmpp-cifar10-cond": [
        "map_noise.freqs", "map_augment.bias", "enc.32x32_conv.resample_filter", "enc.32x32_block0.qkv.weight",
        "enc.16x16_aux_residual.weight", "dec.16x16_aux_conv.weight", "dec.8x8_in1.qkv.weight",
    ],
    "ncsnpp-cifar10-cond": ["enc.32x32_aux_residual.weight", "dec.16x16_aux_up.resample_filter"],
    "adm-imagenet64-cond": [
        "map_label.bias", "map_augment.weight", "enc.32x32_down.skip.weight", "enc.64x64_block0.qkv.weight",
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", list(EXPECTED_SHAPES))
def test_state_dict_keys_and_shapes_follow_edm(name):
    state = full_network(name).state_dict()
    shapes = {key: list(state[key].shape) for key in EXPECTED_SHAPES[name] if key in state}
    assert shapes == EXPECTED_SHAPES[name]
    assert not [key for key in ABSENT.get(name, []) if key in state]


def test_edm_init_kwargs_build_the_same_network():
    """The `_init_kwargs` EDM's train.py stores for --arch=ncsnpp --cond=1 pass straight into SongUNet."""
    edm_kwargs = dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=10, augment_dim=9, dropout=0.13,
                      model_channels=128, channel_mult=[2, 2, 2], embedding_type="fourier", channel_mult_noise=2,
                      encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1])  # fmt: skip
    with torch.device("meta"):
        net = NETWORKS["SongUNet"](**edm_kwargs)
    reference = full_network("ncsnpp-cifar10-cond").state_dict()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    assert net.init_kwargs["channel_mult"] == [2, 2, 2] and net.init_kwargs["num_blocks"] == 4


# ----------------------------------------------------------------------------------------------
# Tiny configurations for behaviour tests.

TINY = {
    "ddpmpp": ("ddpmpp", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    "ncsnpp": ("ncsnpp", dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
    "song-skip": ("SongUNet", dict(model_channels=8, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[16],
                                   encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1])),
    # 64 channels at 8x8 give ADM one attention head (it uses 64 channels per head).
    "adm": ("adm", dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])),
}  # fmt: skip
LABEL_DIM, AUGMENT_DIM = 4, 9


def tiny(name: str, resolution: int = 16, seed: int = 0, dropout: float = 0.0, **overrides) -> torch.nn.Module:
    """A tiny network with every parameter perturbed away from its (partly zero) initialisation."""
    arch, kwargs = TINY[name]
    torch.manual_seed(seed)
    net = build_network(arch, resolution, 3, 3, label_dim=LABEL_DIM, augment_dim=AUGMENT_DIM, dropout=dropout,
                        **{**kwargs, **overrides})  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(batch: int = 2, resolution: int = 16, seed: int = 1, dtype=torch.float32):
    """(x, noise_labels, one-hot class_labels, augment_labels) drawn from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, 3, resolution, resolution], generator=g, dtype=dtype)
    noise = torch.randn([batch], generator=g, dtype=dtype)
    labels = F.one_hot(torch.arange(batch) % LABEL_DIM, LABEL_DIM).to(dtype)
    augment = torch.randn([batch, AUGMENT_DIM], generator=g, dtype=dtype)
    return x, noise, labels, augment


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(
    "name, resolution, overrides",
    [("ddpmpp", 32, {}), ("ncsnpp", 32, {}), ("song-skip", 32, {}), ("adm", 64, {}), ("ddpmpp", 64, {}),
     ("ddpmpp", 256, dict(model_channels=8, channel_mult=[1, 1, 1, 1, 1, 1], attn_resolutions=[8]))],
)  # fmt: skip
def test_output_shape(name, resolution, overrides):
    lowest = resolution >> (len(overrides.get("channel_mult", TINY[name][1]["channel_mult"])) - 1)
    net = tiny(name, resolution, **{"attn_resolutions": [lowest], **overrides}).eval()
    x, noise, labels, augment = inputs(1, resolution)
    with torch.no_grad():
        assert net(x, noise, labels, augment).shape == x.shape


@pytest.mark.parametrize("cls", [SongUNet, DhariwalUNet])
def test_out_channels_may_differ_from_in_channels(cls):
    net = cls(img_resolution=8, in_channels=2, out_channels=6, model_channels=8, channel_mult=[1, 2], num_blocks=1,
              attn_resolutions=[4]).eval()  # fmt: skip
    with torch.no_grad():
        assert net(torch.randn(3, 2, 8, 8), torch.randn(3)).shape == (3, 6, 8, 8)


@pytest.mark.parametrize("name", list(TINY))
def test_gradients_reach_every_parameter(name):
    net = tiny(name).train()
    x, noise, labels, augment = inputs()
    net(x, noise, labels, augment).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", list(TINY))
def test_eval_mode_is_deterministic_and_dropout_acts_in_training(name):
    net = tiny(name, dropout=0.3)
    args = inputs()
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(*args), net(*args))
        net.train()
        assert not torch.equal(net(*args), net(*args))


@pytest.mark.parametrize("name", list(TINY))
def test_class_and_augment_labels_change_the_output(name):
    net = tiny(name).eval()
    x, noise, labels, augment = inputs()
    with torch.no_grad():
        base = net(x, noise, labels, augment)
        assert relative_error(net(x, noise, labels.flip(0), augment), base) > 1e-3
        assert relative_error(net(x, noise, labels, -augment), base) > 1e-3
        assert relative_error(net(x, noise + 1, labels, augment), base) > 1e-3
        # Missing labels mean zero labels (the preconditioner's convention), missing augment labels zero augmentation.
        torch.testing.assert_close(net(x, noise, None, augment), net(x, noise, torch.zeros_like(labels), augment))
        torch.testing.assert_close(net(x, noise, labels), net(x, noise, labels, torch.zeros_like(augment)))


@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_label_dropout_drops_whole_samples_in_training_only(name):
    net = tiny(name, resolution=8, label_dropout=0.5, attn_resolutions=[4])
    x, noise, labels, augment = inputs(batch=32, resolution=8)
    with torch.no_grad():
        net.eval()
        kept, dropped = net(x, noise, labels, augment), net(x, noise, torch.zeros_like(labels), augment)
        assert torch.equal(net(x, noise, labels, augment), kept)  # no dropout in eval mode
        net.train()
        torch.manual_seed(0)
        out = net(x, noise, labels, augment)
    is_kept = [torch.allclose(o, k, atol=1e-5, rtol=1e-5) for o, k in zip(out, kept)]
    is_dropped = [torch.allclose(o, d, atol=1e-5, rtol=1e-5) for o, d in zip(out, dropped)]
    assert all(k != d for k, d in zip(is_kept, is_dropped))  # each sample entirely one or the other
    assert 6 <= sum(is_dropped) <= 26  # Binomial(32, 0.5): outside this range with probability < 1e-3


def test_label_dropout_one_is_the_unconditional_model():
    net = tiny("ncsnpp", resolution=8, label_dropout=1.0, attn_resolutions=[4]).train()
    x, noise, labels, augment = inputs(resolution=8)
    with torch.no_grad():
        out = net(x, noise, labels, augment)
        net.eval()
        torch.testing.assert_close(out, net(x, noise, None, augment))


# ----------------------------------------------------------------------------------------------
# Numerics: equality with EDM, dtypes, layouts, compilation.

# Golden outputs of EDM's training/networks.py (NVlabs/edm @ 0a2ff34) for these configurations, with the
# deterministic weights and inputs below, in float64 (EDM's attention, which forces float32, evaluated
# in float64 for the comparison). Values: output sum, sum of |output|, output[1, 2, 5, :4].
GOLDEN = {
    "ddpmpp": [
        240.83548499241846, 369.1314090890049, -0.09452354348035981,
        0.09485843531361382, -0.19847022316609012, 0.16072195555612806,
    ],
    "ncsnpp": [
        224.34277269927804, 340.4701442601179, -0.037305538716854034,
        0.01754987768319141, -0.1772317147309684, -0.01853464094730682,
    ],
    "song-skip": [
        685.3324872985539, 745.2016653729036, 0.013660276131346573,
        0.012615058919216382, 0.03817290180254895, 0.034478591478998746,
    ],
    "adm": [
        462.6560275593548, 579.7209961280873, 0.3070964819743836,
        0.3043359672284838, 0.42713013731212834, 0.25065911243826117,
    ],
}  # fmt: skip


def deterministic_state(net: torch.nn.Module) -> torch.nn.Module:
    """Parameters and Fourier frequencies from an exact integer LCG: uniform in [-0.1, 0.1), GroupNorm scales 1 + that."""
    with torch.no_grad():
        for i, (key, tensor) in enumerate(net.state_dict().items()):
            if not key.endswith("resample_filter"):
                j = torch.arange(tensor.numel(), dtype=torch.int64)
                u = ((j * 1103515245 + 12345 + 7919 * i) % 2**31).to(torch.float64) / 2**31
                gain = 1.0 if "norm" in key and key.endswith(".weight") else 0.0  # GroupNorm scales near 1
                tensor.copy_((gain + 0.2 * u - 0.1).reshape(tensor.shape))
    return net


def golden_inputs(resolution: int = 16):
    """Deterministic float64 inputs for the golden comparison."""
    n = 2 * 3 * resolution * resolution
    x = torch.sin(0.11 * torch.arange(n, dtype=torch.float64)).reshape(2, 3, resolution, resolution)
    noise = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    labels = torch.eye(LABEL_DIM, dtype=torch.float64)[[1, 3]]
    augment = torch.cos(0.7 * torch.arange(2 * AUGMENT_DIM, dtype=torch.float64)).reshape(2, AUGMENT_DIM)
    return x, noise, labels, augment


def golden_summary(y: torch.Tensor) -> list[float]:
    return [y.sum().item(), y.abs().sum().item(), *y[1, 2, 5, :4].tolist()]


@pytest.mark.parametrize("name", list(GOLDEN))
def test_outputs_equal_edm(name):
    arch, kwargs = TINY[name]
    net = build_network(arch, 16, 3, 3, label_dim=LABEL_DIM, augment_dim=AUGMENT_DIM, dropout=0.0, **kwargs)
    net = deterministic_state(net.double()).eval()
    with torch.no_grad():
        summary = golden_summary(net(*golden_inputs()))
    assert summary == pytest.approx(GOLDEN[name], rel=1e-9, abs=1e-12)


def test_attention_channel_layout_matches_the_explicit_formula():
    """softmax(q^T k / sqrt(d)) v per head, with qkv channels ordered (head, channel, {q, k, v}) as in EDM."""
    B, heads, d, H, W = 2, 3, 4, 5, 3
    qkv = torch.randn(B, heads * d * 3, H, W, dtype=torch.float64)
    t = qkv.reshape(B, heads, d, 3, H * W)
    q, k, v = t[:, :, :, 0], t[:, :, :, 1], t[:, :, :, 2]  # [B, heads, d, HW]
    w = torch.einsum("bhcq,bhck->bhqk", q, k).div(math.sqrt(d)).softmax(dim=-1)
    expected = torch.einsum("bhqk,bhck->bhcq", w, v).reshape(B, heads * d, H, W)
    torch.testing.assert_close(self_attention(qkv, heads), expected)
    torch.testing.assert_close(self_attention(qkv.to(memory_format=torch.channels_last), heads), expected)


@pytest.mark.parametrize("filt", [[1, 1], [1, 3, 3, 1]])
def test_resampling_is_the_fir_filter(filt):
    """Up: transposed conv with 4 f f^T, stride 2; down: conv with f f^T, stride 2 (f normalised to sum 1)."""
    up = Conv2d(4, 4, kernel=0, up=True, resample_filter=filt)
    down = Conv2d(4, 4, kernel=0, down=True, resample_filter=filt)
    f = torch.tensor(filt, dtype=torch.float64)
    f2 = (torch.outer(f, f) / f.sum() ** 2).expand(4, 1, len(filt), len(filt))
    torch.testing.assert_close(up.resample_filter.double()[0, 0], f2[0, 0])
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    pad = (len(filt) - 1) // 2
    torch.testing.assert_close(up(x), F.conv_transpose2d(x, 4 * f2, groups=4, stride=2, padding=pad))
    torch.testing.assert_close(down(x), F.conv2d(x, f2, groups=4, stride=2, padding=pad))
    assert up(x).shape[-1] == 16 and down(x).shape[-1] == 4
    ones = torch.ones(1, 4, 8, 8, dtype=torch.float64)  # unit gain: constant images stay constant inside
    torch.testing.assert_close(up(ones)[..., 2:-2, 2:-2], torch.ones(1, 4, 12, 12, dtype=torch.float64))
    torch.testing.assert_close(down(ones)[..., 1:-1, 1:-1], torch.ones(1, 4, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_weight_init_variance(mode):
    """Glorot: var = 2 / (fan_in + fan_out); He (EDM's form): var = 1 / fan_in; uniform bound sqrt(3 var)."""
    torch.manual_seed(0)
    fan_in, fan_out = 300, 100
    w = weight_init([400, 500], mode, fan_in, fan_out)
    var = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    assert w.var().item() == pytest.approx(var, rel=0.02)
    if mode.endswith("uniform"):
        assert w.abs().max().item() <= math.sqrt(3 * var)
    with pytest.raises(ValueError, match="init_mode must be one of"):
        weight_init([2], "orthogonal", 1, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_statistics_in_float32_for_half_inputs(dtype):
    """Mean 30 over 4096 values per group overflows a float16 sum; the result must still be right."""
    x = (30 + torch.randn(2, 64, 16, 16)).to(dtype)
    out = GroupNorm(64)(x)
    assert out.dtype == dtype
    expected = F.group_norm(x.double(), 16)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", list(TINY))
def test_channels_last_equals_contiguous(name):
    net = tiny(name).eval()
    x, noise, labels, augment = inputs()
    with torch.no_grad():
        out = net(x.to(memory_format=torch.channels_last), noise, labels, augment)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(out, net(x, noise, labels, augment)) < 1e-5


@pytest.mark.parametrize("name", list(TINY))
def test_bf16_autocast_is_close_to_fp32(name):
    net = tiny(name).eval()
    args = inputs()
    with torch.no_grad():
        reference = net(*args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(*args)
    assert relative_error(out, reference) < 0.05


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("name", ["ddpmpp", "adm"])
def test_network_runs_in_the_input_dtype(name, dtype, tol):
    """EDM's fp16 mode feeds float16 images with float32 noise and class labels; layers cast their weights."""
    net = tiny(name).eval()
    x, noise, labels, augment = inputs()
    with torch.no_grad():
        out = net(x.to(dtype), noise, labels, augment)
        assert out.dtype == dtype
        assert relative_error(out, net(x, noise, labels, augment)) < tol


@pytest.mark.parametrize("name", list(TINY))
def test_no_graph_breaks_under_torch_compile(name):
    net = tiny(name, dropout=0.1, label_dropout=0.2).train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(net)(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(TINY))
def test_cuda_fp16_mode_runs_in_float16_without_host_syncs(name):
    """EDM's use_fp16: float16 images, float32 noise and labels; no device-to-host copies in training steps."""
    net = tiny(name, dropout=0.1, label_dropout=0.2).cuda().train()
    x, noise, labels, augment = (t.cuda() for t in inputs())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = net(x.half(), noise, labels, augment)
        out.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.dtype == torch.float16
    net.eval()
    with torch.no_grad():
        assert relative_error(net(x.half(), noise, labels, augment), net(x, noise, labels, augment)) < 1e-2


def test_inside_the_edm_preconditioner():
    inner = tiny("ddpmpp")
    net = preconditioners.EDMPrecond(inner, img_resolution=16, img_channels=3, label_dim=LABEL_DIM, D=128.0).eval()
    x, _, labels, _ = inputs()
    with torch.no_grad():
        assert net(x, torch.tensor([0.5, 20.0]), labels).shape == x.shape
    assert all(key.startswith("model.") for key in net.state_dict())
    assert "model.enc.16x16_block0.conv0.weight" in net.state_dict()


# ----------------------------------------------------------------------------------------------
# Configuration: presets, overrides and the errors for configurations that cannot work.


def test_presets_and_overrides():
    assert NETWORKS == {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "EDM2UNet": EDM2UNet}
    assert set(presets()) == {"ddpmpp", "ncsnpp", "adm", *(f"edm2-{s}" for s in ("xs", "s", "m", "l", "xl", "xxl"))}
    assert {arch: cls for arch, (cls, _) in presets().items() if not arch.startswith("edm2-")} == {
        "ddpmpp": SongUNet, "ncsnpp": SongUNet, "adm": DhariwalUNet}
    assert all(cls is EDM2UNet for arch, (cls, _) in presets().items() if arch.startswith("edm2-"))
    assert all(isinstance(entry, Preset) and "class_name" not in entry.kwargs for _, entry in presets().values())
    kwargs = network_kwargs("ddpmpp", cbase=64, cres="1,2,2,2", nblock=2, attn=[8], dropout=0.05)
    assert kwargs["class_name"] == "SongUNet" and kwargs["model_channels"] == 64
    assert kwargs["channel_mult"] == [1, 2, 2, 2] and kwargs["num_blocks"] == 2
    assert kwargs["attn_resolutions"] == [8] and kwargs["dropout"] == 0.05 and kwargs["embedding_type"] == "positional"
    assert network_kwargs("ncsnpp", label_dropout=0.1)["resample_filter"] == [1, 3, 3, 1]
    assert network_kwargs("adm") == {"class_name": "DhariwalUNet", "model_channels": 192, "channel_mult": [1, 2, 3, 4]}
    assert presets()["ddpmpp"][1].kwargs["model_channels"] == 128  # the presets themselves are not modified
    assert presets()["ddpmpp"][1].kwargs["channel_mult"] == [2, 2, 2] and SongUNet.presets["ddpmpp"].kwargs["num_blocks"] == 4
    kwargs = network_kwargs("ncsnpp", cbase=8, cres=[1, 2], nblock=1, attn=[4])
    with torch.device("meta"):
        net = build_network(kwargs.pop("class_name"), 8, 3, 3, **kwargs)
    assert isinstance(net, SongUNet) and "enc.4x4_aux_residual.weight" in net.state_dict()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_network("unet", 32, 3, 3), r"unknown network 'unet'.*ddpmpp, ncsnpp, adm.*SongUNet, DhariwalUNet"),
        (lambda: network_kwargs("ddpm"), r"unknown network 'ddpm'"),
        (lambda: build_network("ddpmpp", 48, 3, 3), r"power of two from 8 to 512, got 48"),
        (lambda: build_network("ddpmpp", 1024, 3, 3), r"power of two from 8 to 512, got 1024"),
        (lambda: build_network("ddpmpp", 4, 3, 3), r"power of two from 8 to 512, got 4"),
        (lambda: build_network("ddpmpp", 8, 3, 3, channel_mult=[1, 1, 1, 1, 1]),
         r"img_resolution 8 is not divisible by 2\*\*\(len\(channel_mult\) - 1\) = 16"),
        (lambda: build_network("ddpmpp", 32, 3, 3, attn_resolutions=[16, 64, 3]),
         r"attn_resolutions \[3, 64\] do not occur.*resolutions are \[32, 16, 8\]"),
        (lambda: build_network("adm", 64, 3, 3, attn_resolutions=[4]),
         r"attn_resolutions \[4\] do not occur.*\[64, 32, 16, 8\]"),
        (lambda: build_network("adm", 32, 3, 3, model_channels=16, channel_mult=[1, 2, 4], attn_resolutions=[16, 8]),
         r"64 channels per head.*16x16 has 32"),
        (lambda: build_network("ddpmpp", 32, 0, 3), r"in_channels must be an integer >= 1, got 0"),
        (lambda: build_network("ddpmpp", 32, 3, 3, model_channels=0), r"model_channels must be an integer >= 1"),
        (lambda: build_network("ddpmpp", 32, 3, 3, channel_mult=[1, 0]), r"channel_mult must be a non-empty list"),
        (lambda: build_network("ddpmpp", 32, 3, 3, label_dim=-1), r"label_dim must be an integer >= 0"),
        (lambda: build_network("ddpmpp", 32, 3, 3, model_channels=2), r"GroupNorm over 2 channels"),
        (lambda: build_network("ncsnpp", 32, 3, 3, label_dropout=1.5), r"label_dropout in \[0, 1\]"),
        (lambda: build_network("ddpmpp", 32, 3, 3, embedding_type="sinusoidal"),
         r"embedding_type must be one of positional, fourier"),
        (lambda: build_network("adm", 64, 3, 3, encoder_type="skip"), r"DhariwalUNet does not take encoder_type"),
        (lambda: network_kwargs("ddpmpp", bogus=1), r"SongUNet does not take bogus"),
        (lambda: network_kwargs("ddpmpp", cres="1,x"), r"cres must be a list of integers"),
    ],
)  # fmt: skip
def test_bad_configurations_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
