"""The training recipes (training/train/options.py RECIPES): EDM's defaults stay; EDM2's for the edm2-* networks."""

import math

import pytest

from training import losses, networks
from training.train import config
from training.train.step import ADAM_BETA1, learning_rate


def test_edm_stays_the_default():
    c = config.training_config(data="x.zip")
    assert ADAM_BETA1 == 0.9  # beta1 is not an option; beta2 is the recipe's
    assert (c.precond, c.lr, c.beta2, c.lr_decay, c.ema) == ("edm", 10e-4, 0.999, 0.0, 0.5)  # ema: 500 kimg in Mimg
    loss = config.build_loss(c)  # the sigma distribution comes with the loss (EDM's defaults)
    assert (type(loss), c.loss, loss.P_mean, loss.P_std) == (losses.EDMLoss, "edm", -1.2, 1.2)
    assert (c.augment, config.augment_pipe(c).p, c.network_kwargs["dropout"]) == (0.12, 0.12, 0.13)


@pytest.mark.parametrize("arch, lr, dropout", [("edm2-xs", 0.0120, 0.0), ("edm2-s", 0.0100, 0.0), ("edm2-m", 0.0090, 0.1),
                                               ("edm2-xl", 0.0070, 0.1), ("edm2-xxl", 0.0065, 0.1)])
def test_edm2_presets_train_with_edm2s_recipe(arch, lr, dropout):
    c = config.training_config(data="x.zip", arch=arch)
    assert (c.network_kwargs["class_name"], c.precond, c.lr, c.beta2, c.lr_decay) == ("EDM2UNet", "edm2", lr, 0.99, 35000.0)
    assert networks.preset(arch).training["lr"] == lr  # EDM2's lr per size is the preset's
    loss = config.build_loss(c)
    assert (type(loss), c.loss, loss.P_mean, loss.P_std) == (losses.EDM2Loss, "edm2", -0.8, 1.6)
    assert (c.augment, config.augment_pipe(c), c.network_kwargs["dropout"]) == (0.0, None, dropout)
    assert c.lr_rampup == 10.0  # Mimg: 10_000 kimg
    assert config.run_description(c, "data", 8) == f"data-uncond-{arch}-edm2-gpus8-batch512-tf32"


def test_options_override_the_recipe():
    c = config.training_config(data="x.zip", arch="edm2-s", lr=0.02, lr_decay=0, P_mean=-0.4, dropout=0.2, precond="edm",
                               pfgmpp=True, aug_dim=128)
    assert (c.lr, c.lr_decay, c.loss_kwargs["P_mean"], c.network_kwargs["dropout"], c.precond, c.D) == \
        (0.02, 0, -0.4, 0.2, "edm", 128.0)
    assert config.build_loss(c).P_mean == -0.4
    assert config.run_description(c, "d", 1, "cpu") == "d-uncond-edm2-s-edm-D128-gpus1-batch512-fp32"
    with pytest.raises(ValueError, match="--P_mean applies only to"):
        config.training_config(data="x.zip", precond="pfgm", P_mean=-1.0)


def test_learning_rate_schedules():
    edm = config.training_config(data="x.zip", batch=512)
    assert learning_rate(edm, 0) == 0 and learning_rate(edm, 5_000_000) == pytest.approx(5e-4)
    assert learning_rate(edm, 10**9) == pytest.approx(10e-4)
    edm2 = config.training_config(data="x.zip", arch="edm2-s", batch=2048)
    t_ref = 35000 * 2048  # EDM2: alpha_ref / sqrt(max(t / t_ref, 1)), after a 10 Mimg linear ramp-up
    assert learning_rate(edm2, 5_000_000) == pytest.approx(0.01 * 0.5)
    assert learning_rate(edm2, t_ref) == pytest.approx(0.01)
    for factor in (4, 9, 100):
        assert learning_rate(edm2, factor * t_ref) == pytest.approx(0.01 / math.sqrt(factor))


def test_resume_refuses_another_decay():
    saved = config.training_config(data="x.zip", arch="edm2-xs")
    now = config.training_config(data="x.zip", arch="edm2-xs", lr_decay=1000)
    assert config.resume_mismatches(saved, now) == ["--lr_decay 35000 in the state, 1000 now"]


def test_edm2_with_augmentation_is_refused_before_anything_is_built():
    """train.py checks the network's options with `check_network` before the run directory exists."""
    with pytest.raises(ValueError, match="EDM2UNet takes no augmentation labels.*--augment=0"):
        networks.check_network("EDM2UNet", 64, 3, 3, augment_dim=9)
    networks.check_network("EDM2UNet", 64, 3, 3, augment_dim=0)
