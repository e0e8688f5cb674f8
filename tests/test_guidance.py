"""Guidance (training/samplers/guidance.py): D_g + w (D - D_g) in generate.py and fid.py gen, label dropout."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from tests.helpers import make_dataset, run_train, tiny_network
from training import checkpoint, networks, preconditioners, samplers
from training.samplers.guidance import Guided, guided
from training.train import config


def conditional(label_dropout: float = 0.0, D: float = 128.0, seed: int = 0):
    torch.manual_seed(seed)
    model = networks.build_network("ddpmpp", 8, 3, 3, label_dim=4, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                   attn_resolutions=[], label_dropout=label_dropout, dropout=0.0)
    with torch.no_grad():  # the output layer starts at zero (EDM), which would make every label irrelevant
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    return preconditioners.PRECONDITIONERS["edm"](model, img_resolution=8, img_channels=3, label_dim=4, D=D).eval()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    paths = dict(net=folder / "net.pt", guide=folder / "guide.pt", dropout=folder / "dropout.pt",
                 uncond=folder / "uncond.pt", other_D=folder / "other_D.pt")
    checkpoint.save_network(paths["net"], conditional(seed=0))
    checkpoint.save_network(paths["guide"], conditional(seed=1))
    checkpoint.save_network(paths["dropout"], conditional(label_dropout=0.1, seed=2))
    torch.manual_seed(3)
    checkpoint.save_network(paths["uncond"], tiny_network())
    checkpoint.save_network(paths["other_D"], conditional(D=math.inf, seed=4))
    return paths


def images(outdir, *args, ok=True):
    result = CliRunner().invoke(generate.main, [f"--outdir={outdir}", "--seeds=0-3", "--steps=4", "--class=1",
                                                "--precision=fp32", *map(str, args)])
    if not ok:
        return result
    assert result.exit_code == 0, result.output
    return [np.asarray(PIL.Image.open(p)) for p in sorted(outdir.rglob("*.png"))], result.output


def test_weight_one_and_self_guide_give_the_unguided_images(nets, tmp_path):
    plain, _ = images(tmp_path / "plain", f"--network={nets['net']}")
    one, _ = images(tmp_path / "one", f"--network={nets['net']}", f"--gnet={nets['guide']}", "--guidance=1")
    same, _ = images(tmp_path / "same", f"--network={nets['net']}", f"--gnet={nets['net']}", "--guidance=2.5")
    assert len(plain) == 4
    for a, b, c in zip(plain, one, same):
        assert np.array_equal(a, b) and np.array_equal(a, c)


def test_weight_zero_gives_the_guiding_network_alone(nets, tmp_path):
    guide_alone, _ = images(tmp_path / "guide", f"--network={nets['guide']}")
    zero, _ = images(tmp_path / "zero", f"--network={nets['net']}", f"--gnet={nets['guide']}", "--guidance=0")
    differs, _ = images(tmp_path / "w2", f"--network={nets['net']}", f"--gnet={nets['guide']}", "--guidance=2")
    assert all(np.array_equal(a, b) for a, b in zip(guide_alone, zero))
    assert not all(np.array_equal(a, b) for a, b in zip(guide_alone, differs))


def test_an_unconditional_guide_gets_no_labels_and_the_evaluations_double(nets):
    net, guide = checkpoint.load_network(nets["net"]), checkpoint.load_network(nets["uncond"])
    g = guided(net, guide, 3.0)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    labels = torch.eye(4)[[1, 2]]
    expected = guide(x, sigma) + 3.0 * (net(x, sigma, labels) - guide(x, sigma))
    calls = []
    guide.register_forward_pre_hook(lambda module, args: calls.append(args[2:]))
    torch.testing.assert_close(g(x, sigma, labels), expected, rtol=1e-5, atol=1e-6)
    assert calls == [(None,)]
    settings = samplers.SamplerSettings("heun", dict(num_steps=4))
    plain_info, guided_info = samplers.SampleInfo(), samplers.SampleInfo()
    latents = settings.prior_latents(net, [torch.Generator().manual_seed(0)])
    settings.sample(net, latents, labels[:1], info=plain_info)
    settings.sample(g, latents, labels[:1], info=guided_info)
    assert guided_info.nfe == 2 * plain_info.nfe == 2 * 7


def test_self_guidance_uses_the_networks_own_unconditional_output(nets, tmp_path):
    net = checkpoint.load_network(nets["dropout"])
    g = guided(net, None, 2.0)
    assert isinstance(g, Guided) and g.guide is net
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(4)[[0, 3]]
    uncond = net(x, sigma, torch.zeros_like(labels))
    torch.testing.assert_close(g(x, sigma, labels), uncond + 2.0 * (net(x, sigma, labels) - uncond), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(uncond, net(x, sigma, labels))  # the labels matter, so the guidance does
    out, output = images(tmp_path / "self", f"--network={nets['dropout']}", "--guidance=2")
    assert len(out) == 4


def test_label_dropout_zeroes_the_labels_in_training():
    net = conditional(label_dropout=1.0).train()
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(4)[[0, 3]]
    torch.testing.assert_close(net(x, sigma, labels), net(x, sigma, torch.zeros_like(labels)))
    half = conditional(label_dropout=0.5).train()
    torch.manual_seed(0)
    kept = [not torch.equal(half(x[:1], sigma[:1], labels[:1]), half(x[:1], sigma[:1], 0 * labels[:1])) for _ in range(40)]
    assert 8 < sum(kept) < 32  # Binomial(40, 0.5): outside with probability < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--guidance=2"], "trained with label dropout"),
    (["--guidance=2", "--gnet={other_D}"], "D 128 vs inf"),
    (["--guidance=nan", "--gnet={guide}"], "not a finite number"),
    (["--guidance=2", "--gnet={missing}"], "missing"),
])  # fmt: skip
def test_guidance_errors_are_clear(nets, tmp_path, args, message):
    paths = {**{k: str(v) for k, v in nets.items()}, "missing": str(tmp_path / "missing.pt")}
    result = images(tmp_path / "out", f"--network={nets['net']}", *(a.format(**paths) for a in args), ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output, result.output


def test_label_dropout_option(tmp_path):
    c = config.training_config(data="x.zip", cond=True, label_dropout=0.1)
    assert c.network_kwargs["label_dropout"] == 0.1
    assert "label_dropout" not in config.training_config(data="x.zip", cond=True).network_kwargs
    with pytest.raises(ValueError, match=r"--label_dropout has no effect without --cond=1 \(.*\); add --cond=1"):
        config.training_config(data="x.zip", label_dropout=0.1)


def test_a_label_dropout_run_trains_and_self_guides(tmp_path):
    data = make_dataset(tmp_path / "data.zip", count=16, resolution=8, labels=True)
    run_train(tmp_path / "run", [f"--data={data}", "--cond=1", "--label_dropout=0.2", "--batch=4", "--duration=0.000008",
                                 "--grid=0"])
    snapshot = sorted((tmp_path / "run").glob("network-snapshot-*.pt"))[-1]
    assert checkpoint.load_network(snapshot).model.label_dropout == 0.2
    out, _ = images(tmp_path / "img", f"--network={snapshot}", "--guidance=1.5")
    assert len(out) == 4
