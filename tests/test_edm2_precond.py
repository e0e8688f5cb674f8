"""EDM2's preconditioning and loss (training/preconditioners/edm2.py, training/losses/edm2.py) and the import of EDM2's network pickles.

- EDM2Precond + EDM2UNet compute what EDM2's `Precond` computes (golden values from EDM2's code), with its
  state_dict layout;
- EDM2Loss is Eq. 21 at D = inf, its learned log-variance has the closed-form optimum, its perturbation at finite
  D is the PFGM++ kernel's (the same draws as EDMLoss);
- an EDM2 snapshot pickle (EDM2's class and keyword names, float16 weights, a latent encoder with numpy arrays)
  imports through the safe reader without running its module source, and the imported network round-trips;
- train.py's configuration with --precond=edm2 and an edm2-* network trains a step.
"""

from __future__ import annotations

import collections
import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch

from tests import edm_fixtures as fx
from tests.helpers import make_dataset
from tests.test_networks import LABEL_DIM, deterministic_state, golden_inputs, golden_summary
from tests.test_networks_edm2 import TINY
from torch_utils import distributed
from training import checkpoint, losses, pfgmpp
from training.checkpoint import legacy
from training.datasets import ImageFolderDataset
from training.losses import EDM2Loss, EDMLoss
from training.losses.edm2 import EDM2_LATENTS, EDM2_PIXELS
from training.networks import build_network
from training.preconditioners import PRECONDITIONERS, EDM2Precond
from training.train import config, data, setup, step
from training.train.stats import TickStats

UNET = {k: v for k, v in TINY["cond"].items() if k != "label_dim"}  # a tiny EDM2 UNet: 16x16, 8x8, 4x4


def edm2_net(channels: int = 3, label_dim: int = LABEL_DIM, logvar_channels: int = 32, seed: int = 0) -> EDM2Precond:
    """A tiny EDM2Precond with random weights and non-zero gains (both are zero at initialisation), eval mode."""
    torch.manual_seed(seed)
    inner = build_network("EDM2UNet", 16, channels, channels, label_dim=label_dim, **UNET)
    net = EDM2Precond(inner, img_resolution=16, img_channels=channels, label_dim=label_dim,
                      logvar_channels=logvar_channels)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net.eval()


def call(net, channels: int = 3, sigma=(0.05, 1.0, 30.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(D_theta, u) of `net` on fixed inputs, one noise level per sample."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn([len(sigma), channels, 16, 16], generator=g)
    labels = torch.eye(net.label_dim)[: len(sigma)] if net.label_dim else None
    with torch.no_grad():
        return net(x, torch.tensor(sigma), labels, return_logvar=True)


# ----------------------------------------------------------------------------------------------
# Equality with EDM2's Precond.

# Golden values of EDM2's `Precond` (NVlabs/edm2 @ d8299d3c6a037da7e97a3feb013c679d4cde07ba,
# training/networks_edm2.py), computed once by running EDM2's code in a scratch folder outside this repository:
# Precond(img_resolution=16, img_channels=3, label_dim=4, use_fp16=False, logvar_channels=32, **UNET) with
# tests/test_networks.py's `deterministic_state` over its whole state_dict, the freqs of both Fourier layers (the
# UNet's and the log-variance head's) x 50 and their phases x 30, eval mode, on `golden_inputs`' x and labels at
# sigma = (0.2, 3.0) with return_logvar=True, in float64 (EDM2's float32 casts made float64; EDM2's own float32
# run agrees to 3e-6). Values: sum of D, sum of |D|, D[1, 2, 5, :4], then u(0.2), u(3.0).
GOLDEN = [
    -1.2620690942011814, 444.339219144237, -0.03579920302977426, -0.04110575020570726,
    -0.05151230617899897, -0.05041637703655931, -0.5291922053836766, 0.5771070101430602,
]  # fmt: skip
GOLDEN_SIGMA = (0.2, 3.0)


def test_outputs_and_logvar_equal_edm2():
    net = edm2_net(logvar_channels=32)
    deterministic_state(net)  # EDM2's state_dict order: the same values land in the same weights
    with torch.no_grad():
        for fourier in (net.model.emb_fourier, net.logvar_fourier):
            fourier.freqs.mul_(50)
            fourier.phases.mul_(30)
    x, _, labels, _ = golden_inputs()
    with torch.no_grad():
        denoised, logvar = net(x, torch.tensor(GOLDEN_SIGMA), labels, return_logvar=True)
    assert denoised.dtype == logvar.dtype == torch.float32 and logvar.shape == (2, 1, 1, 1)
    summary = golden_summary(denoised.double()) + logvar.double().flatten().tolist()
    assert summary == pytest.approx(GOLDEN, rel=1e-5, abs=1e-5)


def test_state_dict_layout_and_plain_calls():
    """The network under `model.` as every preconditioner here, the head under EDM2's own names; without
    return_logvar the network is a plain denoiser, and u depends on sigma alone."""
    net = edm2_net()
    keys = list(net.state_dict())
    assert keys[-3:] == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
    assert all(k.startswith("model.") for k in keys[:-3])
    assert net.state_dict()["logvar_linear.weight"].shape == (1, 32) and net.D == math.inf
    denoised, logvar = call(net)
    x = torch.randn([3, 3, 16, 16], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(net(x, torch.tensor([0.05, 1.0, 30.0]), torch.eye(LABEL_DIM)[:3]), denoised)
        assert torch.equal(net.logvar(torch.tensor([0.05, 1.0, 30.0]), 3), logvar.flatten())
        # A scalar sigma: u of one sample; to float rounding, since a batch of one may take another kernel (a
        # matrix-vector product) than a batch of three on some CPUs (ATEN_CPU_CAPABILITY=default).
        torch.testing.assert_close(net(x[:1], 1.0, return_logvar=True)[1].flatten(), logvar[1].flatten(), rtol=1e-6,
                                   atol=1e-7)
    assert PRECONDITIONERS["edm2"] is EDM2Precond and net.out_channels(3) == 3


# ----------------------------------------------------------------------------------------------
# The loss.


def test_loss_at_D_inf_is_edm2s_formula():
    """Eq. 21 with a fixed draw: lambda(sigma) / exp(u(sigma)) (D_theta(y + n, sigma) - y)^2 + u(sigma)."""
    net = edm2_net(label_dim=0)
    loss_fn = EDM2Loss()
    y = torch.rand([4, 3, 16, 16], generator=torch.Generator().manual_seed(1)) * 2 - 1
    sigma, n = loss_fn.draw(y.shape, "cpu", torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = loss_fn(net, y, draws=(sigma, n))
        denoised, u = net(y + n, sigma, return_logvar=True)
    s = sigma.double().reshape(-1, 1, 1, 1)
    weight = (s**2 + 0.5**2) / (s * 0.5) ** 2
    expected = weight / u.double().exp() * (denoised.double() - y.double()) ** 2 + u.double()
    assert loss.shape == y.shape
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


class ConstantLogvar(torch.nn.Module):
    """A fixed denoiser D(x) = x / 2 with one learnable log-variance u for every noise level."""

    def __init__(self, u: float):
        super().__init__()
        self.u = torch.nn.Parameter(torch.tensor(float(u), dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logvar=False):
        denoised = x.double() / 2
        return (denoised, self.u.expand(x.shape[0]).reshape(-1, 1, 1, 1)) if return_logvar else denoised


@pytest.mark.parametrize("sigma", [0.05, 0.7, 20.0])
def test_the_learned_log_variance_is_optimal_where_the_closed_form_says(sigma):
    """For fixed D_theta, d loss / d u = 0 at u = ln(lambda(sigma) E(D_theta - y)^2), and that is the minimum."""
    loss_fn = EDM2Loss()
    y = torch.rand([8, 3, 8, 8], generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2 - 1
    sigmas = torch.full([8], sigma, dtype=torch.float64)
    n = sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    u_star = math.log(lam * ((y + n) / 2 - y).square().mean().item())
    net = ConstantLogvar(u_star)
    loss = loss_fn(net, y, draws=(sigmas, n)).mean()
    loss.backward()
    assert abs(net.u.grad.item()) < 1e-12
    grid = u_star + torch.linspace(-2, 2, 401, dtype=torch.float64)
    values = []
    with torch.no_grad():
        for u in grid:
            net.u.fill_(u)
            values.append(loss_fn(net, y, draws=(sigmas, n)).mean().item())
    assert int(np.argmin(values)) == 200 and values[200] == pytest.approx(1 + u_star, rel=1e-12)  # L(u*) = 1 + u*


@pytest.mark.parametrize("D", [1.0, 8.0, 128.0, 2048.0, math.inf])
def test_the_perturbation_is_the_pfgmpp_kernel(D):
    """With one generator, EDM2Loss and EDMLoss draw the same sigma and kernel noise: sigma first, then the
    PFGM++ kernel at r = sigma sqrt(D), for the batch drawn by the training loop and for a loss drawing itself."""
    shape = [6, 3, 8, 8]
    edm2, edm = EDM2Loss(D=D, P_mean=-1.2, P_std=1.2), EDMLoss(D=D)
    a = edm2.draw(shape, "cpu", torch.Generator().manual_seed(3))
    b = edm.draw(shape, "cpu", torch.Generator().manual_seed(3))
    assert len(a) == len(b) == 2 and all(torch.equal(p, q) for p, q in zip(a, b))
    g = torch.Generator().manual_seed(3)
    sigma = edm2.sample_sigma(shape[0], "cpu", g)
    assert torch.equal(a[1], pfgmpp.sample_prior(shape, sigma, D, generator=g, device="cpu"))
    seen = []

    def recording(x, sigma, labels=None, augment_labels=None, return_logvar=False):
        seen.append((x, sigma))
        return (x, torch.zeros_like(sigma)) if return_logvar else x

    y = torch.zeros(shape)
    edm2(recording, y, generator=torch.Generator().manual_seed(9))
    edm(recording, y, generator=torch.Generator().manual_seed(9))
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])


def test_noise_levels_follow_edm2s_distribution():
    """ln sigma ~ N(P_mean, P_std^2), EDM2's pixel values by default (KS test against scipy)."""
    loss_fn = EDM2Loss()
    assert (loss_fn.P_mean, loss_fn.P_std) == (EDM2_PIXELS["P_mean"], EDM2_PIXELS["P_std"]) == (-0.8, 1.6)
    sigma = loss_fn.sample_sigma(20000, "cpu", torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(sigma.log().double().numpy(), "norm", args=(-0.8, 1.6)).pvalue > 1e-3


# ----------------------------------------------------------------------------------------------
# Training configuration and one step.


def edm2_config(tmp_path, **options):
    """train.py's configuration of a tiny edm2-xs network on 16 8x8 images (CPU, no augmentation: EDM2 has none)."""
    data = make_dataset(tmp_path / "d.zip", count=16, labels=False)
    return config.training_config(data=str(data), precond="edm2", arch="edm2-xs", cbase=8, cres="1,2", nblock=1,
                                  attn="", batch=8, workers=0, precision="fp32", augment=0, dropout=0, **options)


def test_training_options_default_to_edm2s():
    """P_mean / P_std left unset take EDM2's values; set, they are used; EDM's defaults are EDM's."""
    options = dict(stf=False, fp_reg=False, P_mean=None, P_std=None, sigma_scale=1.0)
    assert EDM2Precond.default_loss == "edm2" and losses.get("edm2") is EDM2Loss
    assert EDM2Loss.compatible(EDM2Precond) and not EDMLoss.compatible(EDM2Precond)
    D, precond_kwargs, loss_kwargs = EDM2Loss.configure(options, D=math.inf, cond=True, pfgmpp_on=False)
    assert D == math.inf and precond_kwargs == {"D": math.inf}
    assert "P_mean" not in loss_kwargs and "P_std" not in loss_kwargs  # unset: the loss's own defaults
    loss_fn = EDM2Loss(**loss_kwargs)
    assert (loss_fn.P_mean, loss_fn.P_std) == (-0.8, 1.6)
    loss_kwargs = EDM2Loss.configure({**options, **EDM2_LATENTS}, D=128.0, cond=False, pfgmpp_on=True)[2]
    assert (loss_kwargs["P_mean"], loss_kwargs["P_std"], loss_kwargs["D"]) == (-0.4, 1.0, 128.0)
    loss_fn = EDM2Loss(**loss_kwargs)
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.D) == (-0.4, 1.0, 128.0)
    edm = EDMLoss(**EDMLoss.configure(options, D=math.inf, cond=True, pfgmpp_on=False)[2])
    assert (edm.P_mean, edm.P_std) == (-1.2, 1.2)


def test_one_training_step_through_the_trainer(tmp_path):
    c = edm2_config(tmp_path)
    assert c.precond == "edm2" and c.loss == "edm2" and c.network_kwargs["class_name"] == "EDM2UNet"
    loss_fn = config.build_loss(c)
    assert (loss_fn.P_mean, loss_fn.P_std) == (-0.8, 1.6)  # EDM2's, unset on the command line
    set_loss = config.build_loss(edm2_config(tmp_path, P_mean=-0.4, P_std=1.0))
    assert edm2_config(tmp_path, P_mean=-0.4, P_std=1.0).loss_kwargs["P_mean"] == -0.4 and set_loss.P_mean == -0.4
    dataset = ImageFolderDataset(**config.dataset_kwargs(c))
    c = config.complete(c, dataset)
    device = torch.device("cpu")
    net = setup.build_denoiser(c, dataset, device)
    loss_fn = config.build_loss(c)
    assert type(net) is EDM2Precond and type(loss_fn) is EDM2Loss
    opt = step.optimizer(c, net, device)
    train_step = step.TrainStep(c, net, net, opt, loss_fn, config.augment_pipe(c), dataset, TickStats(device),
                                distributed.get_rank(), distributed.get_world_size(), device)
    train_step(0, 0, data.training_batches(dataset, c, 0, device), None)
    assert train_step.stats.reduce()["steps"] == 1 and all(p.isfinite().all() for p in net.parameters())
    head = net.logvar_linear.weight.grad
    assert head is not None and head.abs().sum() > 0  # the loss trained the log-variance head


# ----------------------------------------------------------------------------------------------
# Import of EDM2's network pickles.

EDM2_NAMES = {"EDM2Precond": "Precond", "EDM2UNet": "UNet", "MPBlock": "Block"}  # MPConv, MPFourier: as EDM2's


def rename_as_edm2(record) -> None:
    """Give a mirrored module tree EDM2's class names, in place (plain torch containers keep theirs)."""
    if hasattr(record, "meta"):
        state = record.meta["state"]
        record.meta["class_name"] = state["_orig_class_name"] = EDM2_NAMES.get(record.meta["class_name"],
                                                                               record.meta["class_name"])
    else:
        state = record.state
    for child in state["_modules"].values():
        if child is not None:
            rename_as_edm2(child)


def edm2_record(net: EDM2Precond, module_src: str):
    """EDM2's record of `net`: `Precond` with EDM2's keywords holding its `UNet` as `unet`, weights as they are."""
    interface = dict(img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim)
    top = dict(**interface, use_fp16=True, logvar_channels=net.logvar_fourier.num_channels, **UNET)
    record = fx.as_edm_record(net, module_src, init_kwargs=top)
    children = record.meta["state"]["_modules"]
    children["model"].meta["state"]["_init_kwargs"] = dict(**interface, **UNET)
    record.meta["state"]["_modules"] = collections.OrderedDict(
        ("unet" if name == "model" else name, child) for name, child in children.items())
    rename_as_edm2(record)
    return record


ENCODERS = {  # EDM2's encoders as its snapshots hold them (training/encoders.py): pixels, or a VAE's latents
    3: ("StandardRGBEncoder", {}),
    4: ("StabilityVAEEncoder", dict(vae_name="stabilityai/sd-vae-ft-mse", batch_size=8, _vae=None,
                                    scale=np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]),
                                    bias=np.float32([0.5, 0.5, 0.5, 0.5]))),
}  # fmt: skip


def write_edm2_snapshot(path, net: EDM2Precond, module_src: str):
    """EDM2's network-snapshot / published pickle: dict(encoder, dataset_kwargs, loss_fn, ema) with `ema` in float16."""
    half = copy.deepcopy(net).half()
    name, state = ENCODERS[net.img_channels]
    data = dict(
        encoder=fx.Persistent(name, {**state, "_init_args": (), "_init_kwargs": {}}, module_src),
        dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="img64.zip", use_labels=True),
        loss_fn=fx.Persistent("EDM2Loss", dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5, _init_args=(),
                                                _init_kwargs=dict(P_mean=-0.8, P_std=1.6)), module_src),
        ema=edm2_record(half, module_src),
    )  # fmt: skip
    fx.write_pickle(path, data)
    expected = copy.deepcopy(net)  # what the file holds: the float16 weights, as float32
    expected.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    return expected


@pytest.mark.parametrize("channels", [3, 4])
def test_import_of_an_edm2_pickle(tmp_path, channels):
    """EDM2's classes map to EDM2Precond(EDM2UNet) with its keywords, `unet.` to `model.`, float16 to float32,
    D = inf; the module source is never executed (the marker), the outputs and log-variances are equal."""
    marker = tmp_path / "MARKER"
    expected = write_edm2_snapshot(tmp_path / "edm2-img64-xs-0.130.pkl", edm2_net(channels), fx.marker_source(marker))
    loaded = checkpoint.load_network(tmp_path / "edm2-img64-xs-0.130.pkl")
    assert not marker.exists()
    assert type(loaded) is EDM2Precond and type(loaded.model).__name__ == "EDM2UNet" and loaded.D == math.inf
    assert loaded.use_fp16 and loaded.label_dim == LABEL_DIM and loaded.model.in_channels == channels
    assert {k: v for k, v in loaded.model.init_kwargs.items() if k in UNET} == UNET
    state = loaded.state_dict()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v) for k, v in expected.state_dict().items())
    for a, b in zip(call(loaded, channels), call(expected, channels)):
        assert torch.equal(a, b)
    encoder = loaded.provenance["encoder"]
    assert encoder["class_name"] == ENCODERS[channels][0]
    if channels == 4:
        assert encoder["vae_name"] == "stabilityai/sd-vae-ft-mse" and encoder["scale"] == pytest.approx(
            (0.5 / np.float32([4.17, 4.62, 3.71, 3.28])).tolist())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_an_imported_network_round_trips(tmp_path, suffix):
    write_edm2_snapshot(tmp_path / "net.pkl", edm2_net(seed=1), "")
    imported = checkpoint.load_network(tmp_path / "net.pkl")
    checkpoint.save_network(tmp_path / f"snap{suffix}", imported, provenance=imported.provenance)
    loaded = checkpoint.load_network(tmp_path / f"snap{suffix}")
    config, before = checkpoint.network_config(loaded), checkpoint.network_config(imported)
    assert type(loaded) is EDM2Precond and [config[k] for k in ("precond", "model", "provenance")] == [
        before[k] for k in ("precond", "model", "provenance")]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in imported.state_dict().items())
    for a, b in zip(call(loaded), call(imported)):
        assert torch.equal(a, b)


def test_what_an_edm2_pickle_may_not_hold(tmp_path):
    """A `Precond` without its `unet` is not EDM2's; a numpy array of objects is refused like any unsafe data."""
    record = edm2_record(edm2_net(), "")
    del record.meta["state"]["_modules"]["unet"]
    fx.write_pickle(tmp_path / "a.pkl", {"ema": record})
    with pytest.raises(ValueError, match="Precond holds no network under 'unet'"):
        checkpoint.load_network(tmp_path / "a.pkl")
    fx.write_pickle(tmp_path / "b.pkl", {"ema": edm2_record(edm2_net(), ""), "encoder": np.array([1, None], dtype=object)})
    with pytest.raises(legacy.UnsafeCheckpointError, match="numpy array of dtype object"):
        checkpoint.load_network(tmp_path / "b.pkl")
