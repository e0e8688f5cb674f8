"""EDM2's magnitude-preserving U-Net (training/networks/edm2.py): EDM2's outputs, parameter counts and state_dict
layout, forced weight normalisation, the magnitude-preserving operations against their definitions, training
through our preconditioner, compilation, snapshots, and the configurations build_network refuses.

Behaviour tests use tiny widths; the full-size presets are built on the meta device (shapes only).
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from tests.test_networks import LABEL_DIM, deterministic_state, golden_inputs, golden_summary, inputs, relative_error
from training import checkpoint, losses, preconditioners
from training.networks import EDM2UNet, build_network, network_kwargs, presets
from training.networks.edm2 import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize

# ----------------------------------------------------------------------------------------------
# Full-size presets: parameter counts of EDM2's own UNet (NVlabs/edm2 @ d8299d3, training/networks_edm2.py, built
# with img_resolution=64 and the preset's model_channels and dropout). The 4-channel conditional counts are the
# ImageNet-512 latent models of the paper (XS 125M, S 280M, M 498M, L 777M, XL 1.1B, XXL 1.5B); EDM2's Precond
# adds 128 (its uncertainty head logvar_linear). The 3-channel ones are the ImageNet-64 pixel models.
PARAMETERS = {
    # size: (latents 4 channels, cond), (pixels 3 channels, cond), (pixels 3 channels, uncond)
    "xs": (124_713_125, 124_710_821, 124_198_821),
    "s": (280_212_709, 280_209_253, 279_441_253),
    "m": (497_807_653, 497_803_045, 496_779_045),
    "l": (777_497_957, 777_492_197, 776_212_197),
    "xl": (1_119_283_621, 1_119_276_709, 1_117_740_709),
    "xxl": (1_523_164_645, 1_523_156_581, 1_521_364_581),
}
CASES = [(4, 1000), (3, 1000), (3, 0)]  # (channels, label_dim), in the order of PARAMETERS' columns


def meta_network(arch: str, channels: int = 3, label_dim: int = 1000, resolution: int = 64) -> torch.nn.Module:
    """A full-size preset on the meta device."""
    with torch.device("meta"):
        return build_network(arch, resolution, channels, channels, label_dim=label_dim)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("size", list(PARAMETERS))
def test_parameter_count_equals_edm2(size, case):
    channels, label_dim = CASES[case]
    net = meta_network(f"edm2-{size}", channels, label_dim)
    assert sum(p.numel() for p in net.parameters()) == PARAMETERS[size][case]


# The whole state_dict of EDM2's UNet for edm2-img64-xs (3 channels, 1000 classes), as the JSON text of its
# [[key, shape], ...] list in state_dict order: 200 entries with this SHA-256 (computed from EDM2's code as above).
EDM2_XS_KEYS = (200, "6c9f6084fdb735ee1560f206d387e9be764179a9f192ab48cbeb824ead4806e9")
EDM2_XS_SHAPES = {
    "out_gain": [], "emb_fourier.freqs": [128], "emb_fourier.phases": [128], "emb_noise.weight": [512, 128],
    "emb_label.weight": [512, 1000], "enc.64x64_conv.weight": [128, 4, 3, 3], "enc.64x64_block0.emb_gain": [],
    "enc.64x64_block0.conv_res0.weight": [128, 128, 3, 3], "enc.64x64_block0.emb_linear.weight": [128, 512],
    "enc.32x32_down.conv_res1.weight": [128, 128, 3, 3], "enc.16x16_block0.conv_skip.weight": [384, 256, 1, 1],
    "enc.16x16_block0.attn_qkv.weight": [1152, 384, 1, 1], "enc.16x16_block0.attn_proj.weight": [384, 384, 1, 1],
    "dec.8x8_in0.attn_qkv.weight": [1536, 512, 1, 1], "dec.64x64_block3.conv_res0.weight": [128, 256, 3, 3],
    "dec.64x64_block3.conv_skip.weight": [128, 256, 1, 1], "out_conv.weight": [3, 128, 3, 3],
}  # fmt: skip


def test_state_dict_equals_edm2():
    state = meta_network("edm2-xs").state_dict()
    listing = [[key, list(tensor.shape)] for key, tensor in state.items()]
    text = json.dumps(listing, separators=(",", ":"))
    assert (len(listing), hashlib.sha256(text.encode()).hexdigest()) == EDM2_XS_KEYS
    assert {key: list(state[key].shape) for key in EDM2_XS_SHAPES} == EDM2_XS_SHAPES
    absent = ["enc.64x64_block0.conv_skip.weight", "enc.32x32_block0.attn_qkv.weight", "dec.8x8_in1.attn_qkv.weight"]
    assert not [key for key in absent if key in state] and not [key for key in state if key.endswith("bias")]


def test_presets_and_their_32x32_use():
    found = presets()
    assert {name: entry.kwargs["model_channels"] for name, (_, entry) in found.items() if name.startswith("edm2-")} == {
        "edm2-xs": 128, "edm2-s": 192, "edm2-m": 256, "edm2-l": 320, "edm2-xl": 384, "edm2-xxl": 448}  # fmt: skip
    assert all(found[name][0] is EDM2UNet for name in found if name.startswith("edm2-"))
    assert [found[f"edm2-{s}"][1].kwargs["dropout"] for s in PARAMETERS] == [0.0, 0.0, 0.1, 0.1, 0.1, 0.1]
    assert {name: entry.kwargs for name, entry in EDM2UNet.presets.items()} == {
        name: entry.kwargs for name, (_, entry) in found.items() if name.startswith("edm2-")}
    assert network_kwargs("edm2-m", cbase=64) == {"class_name": "EDM2UNet", "model_channels": 64, "dropout": 0.1}
    # At 32x32: levels 32, 16, 8, 4 and attention at 16x16 and 8x8 (EDM2's UNet at img_resolution=32 counts
    # 119,205,797 parameters); with attention on the two lowest levels instead it is the 64x64 network.
    net = meta_network("edm2-xs", resolution=32)
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == 119_205_797
    with torch.device("meta"):
        relative = build_network("edm2-xs", 32, 3, 3, label_dim=1000, attn_resolutions=[8, 4])
    assert sum(p.numel() for p in relative.parameters()) == PARAMETERS["xs"][1]
    assert "enc.16x16_block0.attn_qkv.weight" in state and "dec.8x8_block3.attn_qkv.weight" in state
    assert "dec.4x4_in0.attn_qkv.weight" in state and "enc.32x32_block0.attn_qkv.weight" not in state


# ----------------------------------------------------------------------------------------------
# Equality with EDM2's code.

TINY = {
    # conditional; attention at 8x8 (4 heads of 8) and in the 4x4 middle block
    "cond": dict(label_dim=LABEL_DIM, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                 attn_resolutions=[8], channels_per_head=8),
    # unconditional; every other keyword off its default, attention at 16x16, a binomial filter, tight clipping
    "uncond": dict(label_dim=0, model_channels=8, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[16],
                   channels_per_head=4, channel_mult_noise=2, channel_mult_emb=3, concat_balance=0.6,
                   res_balance=0.4, attn_balance=0.2, resample_filter=[1, 3, 3, 1], clip_act=1.5),
}  # fmt: skip

# Golden outputs of EDM2's UNet (NVlabs/edm2 @ d8299d3c6a037da7e97a3feb013c679d4cde07ba, training/networks_edm2.py)
# for the TINY configurations (img_resolution 16, img_channels 3) with `edm2_state` weights and `golden_inputs`,
# in float64: EDM2's float32 casts (norms, Fourier features, weight normalisation) evaluated in float64 for the
# comparison. Values: output sum, sum of |output|, output[1, 2, 5, :4]. (EDM2's own float32 run agrees to 1e-6.)
GOLDEN = {
    "cond": [
        -43.6558734748938, 65.34427232962695, -0.04669240308763339,
        -0.0387250395428838, -0.08910033238386791, -0.09103988312456011,
    ],
    "uncond": [
        -27.67829990575094, 69.852597474339, 0.031349674017914164,
        0.023971791857937217, 0.03666144668231453, 0.02592052591904687,
    ],
}  # fmt: skip


def edm2_state(net: EDM2UNet) -> EDM2UNet:
    """tests/test_networks.py's deterministic weights, with Fourier frequencies and phases spread out."""
    deterministic_state(net)
    with torch.no_grad():
        net.emb_fourier.freqs.mul_(50)
        net.emb_fourier.phases.mul_(30)
    return net


def tiny(name: str, dtype=torch.float32, **overrides) -> EDM2UNet:
    """A TINY network with the deterministic weights (all gains non-zero) in `dtype`."""
    kwargs = {**TINY[name], **overrides}
    net = build_network("EDM2UNet", 16, 3, 3, **kwargs)
    return edm2_state(net.to(dtype))


def golden_call(net: EDM2UNet, dtype=torch.float64) -> torch.Tensor:
    """The network on `golden_inputs` (labels only for a conditional network)."""
    x, noise, labels, _ = golden_inputs()
    return net(x.to(dtype), noise.to(dtype), labels.to(dtype) if net.label_dim else None)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", list(GOLDEN))
def test_outputs_equal_edm2(name, dtype, tol):
    net = tiny(name, torch.float64).to(dtype).eval()
    with torch.no_grad():
        summary = golden_summary(golden_call(net, dtype).double())
    assert summary == pytest.approx(GOLDEN[name], rel=tol, abs=tol * 1e-3)


@pytest.mark.parametrize("name", list(GOLDEN))
def test_a_training_call_computes_what_evaluation_does_with_the_weights_it_leaves(name):
    """In training mode the stored weights are normalised first, then used exactly as evaluation uses them."""
    net = tiny(name, torch.float64)
    with torch.no_grad():
        trained = golden_call(net.train())
        evaluated = golden_call(net.eval())
    assert relative_error(trained, evaluated) < 1e-14


# ----------------------------------------------------------------------------------------------
# Forced weight normalisation and the magnitude-preserving operations, against their definitions.


def rms_normalised(w: torch.Tensor) -> torch.Tensor:
    """w_i / (1e-4 + sqrt(mean(w_i^2))) for every output channel i (Eq. 66 with EDM2's eps)."""
    rms = w.square().flatten(1).mean(dim=1).sqrt().reshape(-1, *([1] * (w.ndim - 1)))
    return w / (1e-4 + rms)


def test_forced_weight_normalisation_in_training_only():
    net = tiny("cond", torch.float64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1 + torch.rand_like(p))  # magnitudes away from one
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        golden_call(net.eval())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # evaluation writes nothing
    with torch.no_grad():
        golden_call(net.train())
    after = net.state_dict()
    convs = [name for name, m in net.named_modules() if isinstance(m, MPConv)]
    for name in convs:
        expected = rms_normalised(before[f"{name}.weight"])
        torch.testing.assert_close(after[f"{name}.weight"], expected, rtol=1e-12, atol=0)
    others = [k for k in after if not any(k == f"{name}.weight" for name in convs)]
    assert others and all(torch.equal(after[k], before[k]) for k in others)  # gains and Fourier buffers untouched


@pytest.mark.parametrize("kernel", [[], [3, 3]])
def test_mp_conv_uses_unit_norm_filters(kernel):
    """Eq. 47: each output channel's filter scaled to unit L2 norm (up to eps), times the gain."""
    layer = MPConv(5, 4, kernel).double().eval()
    w = layer.weight.detach()
    unit = w / w.flatten(1).norm(dim=1).reshape(-1, *([1] * (w.ndim - 1)))
    x = torch.randn(2, 5, *([6, 6] if kernel else []), dtype=torch.float64)
    expected = torch.nn.functional.conv2d(x, unit, padding=1) if kernel else x @ unit.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(layer(x, gain=torch.tensor(0.5)), expected * 0.5, rtol=1e-3, atol=1e-6)


def test_magnitude_preserving_operations_keep_unit_magnitude():
    """Eqs. 75, 81, 88, 103: unit-variance inputs give outputs of unit second moment."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 16, 20_000, generator=g, dtype=torch.float64)

    def moment(y: torch.Tensor) -> float:
        return y.square().mean().item()

    assert moment(mp_silu(a)) == pytest.approx(1.0, abs=0.01)
    assert moment(mp_sum(a, b, t=0.3)) == pytest.approx(1.0, abs=0.01)
    assert moment(mp_cat(a[:4], b, dim=0, t=0.3)) == pytest.approx(1.0, abs=0.01)
    fourier = MPFourier(100_000).double()
    assert moment(fourier(torch.tensor([0.7], dtype=torch.float64))) == pytest.approx(1.0, abs=0.02)
    # mp_cat's branch weights: (1 - t) and t of the total magnitude (Eq. 103).
    cat = mp_cat(torch.ones(1, 16), torch.ones(1, 48), t=0.3)
    ratio = cat[:, :16].square().sum() / cat[:, 16:].square().sum()
    assert ratio.item() == pytest.approx(0.7**2 / 0.3**2)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)  # pixel norm: unit rms over the channels of every pixel
    torch.testing.assert_close(normalize(x, dim=1).square().mean(dim=1), torch.ones(3, 5, 5, dtype=torch.float64),
                               rtol=1e-3, atol=0)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Behaviour: labels, dtypes, layouts, gradients, compilation.


def perturbed(name: str = "cond", **overrides) -> EDM2UNet:
    """A tiny float32 network with random weights and non-zero gains (out_gain is zero at initialisation)."""
    torch.manual_seed(0)
    net = build_network("EDM2UNet", 16, 3, 3, **{**TINY[name], **overrides})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def test_missing_labels_are_zero_labels_and_label_dropout_one_is_unconditional():
    net = perturbed(label_dropout=1.0)
    x, noise, labels, _ = inputs()
    with torch.no_grad():
        dropped = net.train()(x, noise, labels)  # normalises the stored weights; evaluation then computes the same
        net.eval()
        zero = net(x, noise, torch.zeros_like(labels))
        assert relative_error(dropped, zero) < 1e-6
        torch.testing.assert_close(net(x, noise, None), zero)
        assert relative_error(net(x, noise, labels), zero) > 1e-3


def test_gradients_reach_every_parameter():
    net = perturbed().train()
    x, noise, labels, _ = inputs()
    net(x, noise, labels).square().mean().backward()
    assert not [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


@pytest.mark.parametrize("variant", ["float16", "bfloat16-autocast", "channels_last"])
def test_reduced_precision_and_channels_last(variant):
    """EDM2's fp16 mode: float16 images, float32 noise and labels, output in float16; embedding kept in float32."""
    net = perturbed().eval()
    x, noise, labels, _ = inputs()
    with torch.no_grad():
        reference = net(x, noise, labels)
        if variant == "float16":
            out = net(x.half(), noise, labels)
            assert out.dtype == torch.float16 and net.embedding(noise, labels).dtype == torch.float32
            assert relative_error(out, reference) < 1e-2
        elif variant == "bfloat16-autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = net(x, noise, labels)
            assert relative_error(out, reference) < 0.05
        else:
            out = net(x.to(memory_format=torch.channels_last), noise, labels)
            assert out.is_contiguous(memory_format=torch.channels_last) and relative_error(out, reference) < 1e-5


def test_no_graph_breaks_under_torch_compile():
    """As tests/test_networks.py checks for the other networks; the forced normalisation's in-place write included."""
    net = perturbed(dropout=0.1, label_dropout=0.2).train()
    x, noise, labels, _ = inputs()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(net)(x, noise, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_one_training_step_through_the_edm_preconditioner():
    torch.manual_seed(0)
    inner = build_network("EDM2UNet", 16, 3, 3, **{**TINY["cond"], "dropout": 0.1})
    net = preconditioners.EDMPrecond(inner, img_resolution=16, img_channels=3, label_dim=LABEL_DIM, D=128.0).train()
    loss_fn = losses.EDMLoss(D=128.0, P_mean=-0.8, P_std=1.6)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    x, _, labels, _ = inputs()
    loss = loss_fn(net, x.clamp(-1, 1), labels, generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    assert torch.isfinite(loss) and net.model.out_gain.grad.abs().item() > 0
    optimizer.step()
    assert net.model.out_gain.item() != 0 and all(p.isfinite().all() for p in net.parameters())
    with torch.no_grad():
        assert net(x, torch.tensor([0.5, 20.0]), labels).shape == x.shape


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_snapshot_round_trip_is_exact(tmp_path, suffix):
    inner = perturbed("uncond", clip_act=None, channel_mult_emb=None)  # None survives the JSON config
    net = preconditioners.EDMPrecond(inner, img_resolution=16, img_channels=3, D=2048.0).eval()
    path = tmp_path / f"network-snapshot-000001{suffix}"
    checkpoint.save_network(path, net)
    loaded = checkpoint.load_network(path)
    assert type(loaded.model) is EDM2UNet and loaded.model.init_kwargs == inner.init_kwargs
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([0.1, 10.0])), net(x, torch.tensor([0.1, 10.0])))


# ----------------------------------------------------------------------------------------------
# Configurations that cannot work.


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: build_network("edm2-xs", 64, 3, 3, augment_dim=9), r"no augmentation labels.*--augment=0"),
        (lambda: perturbed()(*inputs()), r"augment_labels must be None"),
        (lambda: build_network("edm2-xs", 32, 3, 3, model_channels=16),
         r"EDM2UNet attends with 64 channels per head.*8x8 has 48, 16x16 has 32.*lower channels_per_head"),
        (lambda: build_network("EDM2UNet", 16, 3, 3, model_channels=15, channel_mult=[1, 3], attn_resolutions=[8],
                               channels_per_head=20), r"45 channels cannot be split into 2 heads"),
        (lambda: build_network("edm2-s", 64, 3, 3, channel_mult_noise=0), r"channel_mult_noise must be an integer"),
        (lambda: build_network("edm2-s", 64, 3, 3, channels_per_head=0), r"channels_per_head must be an integer"),
        (lambda: build_network("edm2-s", 64, 3, 3, concat_balance=1.5), r"balances must lie in \[0, 1\]"),
        (lambda: build_network("edm2-s", 64, 3, 3, resample_filter=[1, 2, 1]), r"even number of taps"),
        (lambda: build_network("edm2-s", 64, 3, 3, label_dropout=2), r"label_dropout in \[0, 1\]"),
        (lambda: build_network("edm2-s", 8, 3, 3), r"attn_resolutions \[16\] do not occur"),
        (lambda: network_kwargs("edm2-s", embedding_type="fourier"), r"EDM2UNet does not take embedding_type"),
    ],
)  # fmt: skip
def test_bad_configurations_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_widths_need_not_suit_group_norm():
    """No GroupNorm in EDM2's network: any width works (SongUNet and ADM need multiples of 4 / 32)."""
    net = build_network("EDM2UNet", 8, 2, 5, model_channels=6, channel_mult=[1, 3], num_blocks=1, attn_resolutions=[4],
                        channels_per_head=6).eval()  # fmt: skip
    assert math.prod(net(torch.randn(3, 2, 8, 8), torch.randn(3)).shape) == 3 * 5 * 8 * 8
