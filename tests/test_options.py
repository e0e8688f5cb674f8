"""The option tables (training/options.py): train.py's click options, its configuration's keys, what a resume may
change and what defines the objective all come from `training.train.options.OPTIONS`; the sampler's from
`training.samplers.options.OPTIONS`."""

from __future__ import annotations

import math

import pytest

import fid
import generate
import train
from training import losses
from training.options import Option, check_needs, check_range, table
from training.samplers import options as sampler_options
from training.train import config
from training.train.options import OPTIONS, RECIPES, objective, resumable, saved


def test_every_train_option_is_named_as_its_flag():
    assert [o.name for o in OPTIONS.values() if o.cli_flag != f"--{o.name}"] == []
    assert {o.name: o.aliases for o in OPTIONS.values() if o.aliases} == {
        "batch_gpu": ("--batch-gpu",), "dry_run": ("-n", "--dry-run")}  # EDM's spellings, kept beside ours


def test_train_py_has_one_click_option_per_table_entry():
    params = {p.name: p for p in train.main.params}
    assert list(params) == list(OPTIONS)
    for name, option in OPTIONS.items():
        assert params[name].opts[0] == option.cli_flag and set(option.aliases) <= set(params[name].opts)
        assert params[name].required == option.required


def test_the_configuration_is_keyed_by_the_option_names():
    c = config.training_config(data="x.zip")
    assert set(c) == set(saved()) | set(config.DERIVED)
    assert not set(saved()) & set(config.DERIVED)
    # Resolved: the recipe's values where nothing was given; the loss named by the preconditioner.
    assert (c.lr, c.ema, c.augment, c.beta2, c.precond, c.loss) == (RECIPES["edm"]["lr"], 0.5, 0.12, 0.999, "edm", "edm")
    c = config.training_config(data="x.zip", arch="edm2-m")
    assert (c.lr, c.ema_std, c.precond, c.loss, c.network_kwargs["dropout"]) == (0.0090, [0.05, 0.1], "edm2", "edm2", 0.1)


def test_what_a_resume_may_change_comes_from_the_table():
    state = config.training_config(data="x.zip")
    for name in ("duration", "tick", "snap", "workers", "precision", "data"):
        assert name in resumable()
    changed = config.training_config(data="y.zip", duration=1.0, tick=5.0, snap=2, workers=3, precision="bf16")
    assert config.resume_mismatches(state, changed) == []
    changed = config.training_config(data="x.zip", lr=2e-3, seed=4)
    assert config.resume_mismatches(state, changed) == ["--lr 0.001 in the state, 0.002 now", "--seed 0 in the state, 4 now"]


def test_the_objective_options_are_those_the_losses_read():
    read = {name for cls in losses.LOSSES.values() for name in cls.options}
    assert read == set(objective())
    with pytest.raises(ValueError, match="--P_mean applies only to --precond=edm or edm2, not to --precond=vp"):
        config.training_config(data="x.zip", precond="vp", P_mean=0.0)
    with pytest.raises(ValueError, match="--P_mean applies only to --loss=edm or edm2, not to --loss=vp"):
        config.training_config(data="x.zip", loss="vp", P_mean=0.0)


@pytest.mark.parametrize("given, message", [
    (dict(aug_dim=64.0), "--aug_dim has no effect without --pfgmpp=1 (the reference silently trains a diffusion model)"),
    (dict(label_dropout=0.1), "--label_dropout has no effect without --cond=1"),
    (dict(fp_alpha=1.0), "--fp_alpha has no effect without --fp_reg=1; add --fp_reg=1 or leave --fp_alpha out"),
    (dict(metrics_ref="ref.npz"), "--metrics_ref has no effect without --metrics; add --metrics=... or leave"),
    (dict(lr=-1.0), "--lr must be > 0, got -1"),
    (dict(dropout=1.0), "--dropout must be < 1, got 1"),
    (dict(lr=math.inf), "--lr must be a finite number"),
    (dict(typo=1), "unknown train option"),
    (dict(loss="edm2"), "--loss=edm2 does not train what --precond=edm computes"),
    (dict(precond="edm2", loss="edm"), "use --loss=edm2 with it"),
])
def test_the_table_checks_what_it_declares(given, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        config.training_config(data="x.zip", **given)


def test_an_option_table_refuses_a_name_or_flag_twice():
    with pytest.raises(ValueError, match="twice"):
        table([Option("a", "int", "A"), Option("a", "int", "again")])
    with pytest.raises(ValueError, match="twice"):
        table([Option("a", "int", "A", aliases=("--b",)), Option("b", "int", "B")])
    with pytest.raises(ValueError, match="kind"):
        Option("a", "number", "A")
    check_needs(table([Option("a", "bool", "A", default=False), Option("b", "int", "B", needs="a")]), dict(a=True, b=3))
    check_range(Option("c", "int", "C", low=0, high=3), 3)


def test_the_sampler_table_keeps_edm_flag_names_and_feeds_both_tools():
    assert sampler_options.flag("num_steps") == "--steps" and sampler_options.flag("discretization") == "--disc"
    for command in (generate.main, fid.main.commands["gen"]):
        names = {p.name for p in command.params}
        assert set(sampler_options.OPTIONS) <= names
    settings = sampler_options.sampler_settings({"solver": "euler", "num_steps": 5, "rho": None})
    assert (settings.solver, dict(settings.options)) == ("euler", {"num_steps": 5})
