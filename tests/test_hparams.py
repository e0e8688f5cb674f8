"""Tests of training.hparams: the sigma -> r transfer report and its CLI, checked against sampling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from training.cli.hparams import main
from training.hparams import transfer_report
from training.pfgmpp import sample_prior

N_CIFAR = 3 * 32 * 32
DRAWS = 4000


@pytest.mark.parametrize("D", [1.0, 2.5, 128.0, 2048.0])
@pytest.mark.parametrize("sigma_max", [1.0, 80.0])
def test_radii_follow_r_equals_sigma_sqrt_D(D: float, sigma_max: float) -> None:
    report = transfer_report(D, N_CIFAR, sigma_max=sigma_max, sigma_min=0.002)
    assert report["r_max"] == pytest.approx(sigma_max * math.sqrt(D), rel=1e-15)
    assert report["r_min"] == pytest.approx(0.002 * math.sqrt(D), rel=1e-15)
    for row in report["training_noise"]:
        assert row["r"] == pytest.approx(row["sigma"] * math.sqrt(D), rel=1e-15)


def test_infinite_D_reports_no_r() -> None:
    report = transfer_report(math.inf, N_CIFAR)
    assert report["D"] == "inf"
    assert report["r_max"] is None and report["r_min"] is None
    assert all(row["r"] is None for row in report["training_noise"])
    assert any("diffusion limit" in note for note in report["notes"])
    json.dumps(report, allow_nan=False)  # JSON-able as promised


def test_training_sigma_quantiles_are_log_normal() -> None:
    # ln sigma ~ N(P_mean, P_std^2): the median is exp(P_mean), the 0.99 quantile exp(P_mean + 2.3263 P_std).
    report = transfer_report(128, N_CIFAR, P_mean=-1.2, P_std=1.2, quantiles=(0.5, 0.99))
    median, upper = (row["sigma"] for row in report["training_noise"])
    assert median == pytest.approx(math.exp(-1.2), rel=1e-12)
    assert upper == pytest.approx(math.exp(-1.2 + 2.3263478740408408 * 1.2), rel=1e-12)


def _prior_radii(D: float, sigma_max: float, seed: int = 0) -> np.ndarray:
    """||x|| for DRAWS samples of the generation prior at CIFAR-10 size."""
    generator = torch.Generator().manual_seed(seed)
    x = sample_prior([DRAWS, 3, 32, 32], sigma_max, D, generator, dtype=torch.float32)
    return x.flatten(1).double().norm(dim=1).numpy()


@pytest.mark.parametrize("D", [1.0, 128.0, math.inf])
def test_prior_radius_quantiles_match_sampled_prior(D: float) -> None:
    quantiles = (0.01, 0.1, 0.5, 0.9, 0.99)
    report = transfer_report(D, N_CIFAR, sigma_max=80.0, quantiles=quantiles)
    radii = _prior_radii(D, 80.0)
    for row in report["prior_radius"]:
        # The share of draws below the analytic quantile is Binomial(DRAWS, q) / DRAWS: allow 4 standard errors.
        q = row["q"]
        assert np.mean(radii <= row["R"]) == pytest.approx(q, abs=4 * math.sqrt(q * (1 - q) / DRAWS))
        assert row["R_per_coordinate"] == pytest.approx(row["R"] / math.sqrt(N_CIFAR), rel=1e-12)


@pytest.mark.parametrize("D", [128.0, math.inf])
def test_prior_radius_median_matches_sampled_median(D: float) -> None:
    # At D = 128 the radius has a relative spread of ~6.5%, so the sample median's error is ~0.15%.
    median = transfer_report(D, N_CIFAR, sigma_max=80.0, quantiles=(0.5,))["prior_radius"][0]["R"]
    assert median == pytest.approx(np.median(_prior_radii(D, 80.0, seed=1)), rel=0.02)


@pytest.mark.parametrize("D", [8.0, 128.0, math.inf])
def test_mean_square_norm_matches_sampled_prior(D: float) -> None:
    sigma_max = 2.0
    report = transfer_report(D, N_CIFAR, sigma_max=sigma_max, sigma_min=0.002)
    expected = sigma_max**2 * N_CIFAR * (1.0 if math.isinf(D) else D / (D - 2))
    assert report["prior_mean_square_norm"] == pytest.approx(expected, rel=1e-12)
    assert report["prior_rms_per_coordinate"] == pytest.approx(math.sqrt(expected / N_CIFAR), rel=1e-12)
    x = sample_prior([DRAWS, N_CIFAR], sigma_max, D, torch.Generator().manual_seed(1), dtype=torch.float32)
    # ||n||^2 / (sigma^2 N) ~ F(N, D) has a relative spread of ~0.7 at D = 8: 5% is ~4.5 standard errors here.
    assert x.double().square().sum(dim=1).mean().item() == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("D", [0.5, 1.0, 2.0])
def test_heavy_tail_warning_for_small_D(D: float) -> None:
    report = transfer_report(D, N_CIFAR)
    assert any(w.startswith("D <= 2: the kernel has infinite variance") for w in report["warnings"])
    assert report["prior_mean_square_norm"] is None and report["prior_rms_per_coordinate"] is None


@pytest.mark.parametrize("D", [2.0001, 128.0, 1e7, math.inf])
def test_no_heavy_tail_warning_for_large_D(D: float) -> None:
    assert not any(w.startswith("D <= 2") for w in transfer_report(D, N_CIFAR)["warnings"])


def test_practically_infinite_D_is_noted_and_close_to_diffusion() -> None:
    large, diffusion = transfer_report(1e7, N_CIFAR), transfer_report(math.inf, N_CIFAR)
    assert any("practically the diffusion limit" in note for note in large["notes"])
    for row_large, row_inf in zip(large["prior_radius"], diffusion["prior_radius"]):
        assert row_large["R"] == pytest.approx(row_inf["R"], rel=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(D=0, N=10),
        dict(D=-3.0, N=10),
        dict(D=math.nan, N=10),
        dict(D="128", N=10),
        dict(D=128, N=0),
        dict(D=128, N=2.5),
        dict(D=128, N=10, sigma_max=0.0),
        dict(D=128, N=10, sigma_max=math.inf),
        dict(D=128, N=10, sigma_min=100.0),
        dict(D=128, N=10, P_std=0.0),
        dict(D=128, N=10, P_mean=math.nan),
        dict(D=128, N=10, quantiles=(0.0, 0.5)),
        dict(D=128, N=10, quantiles=(0.5, 1.0)),
        dict(D=128, N=10, quantiles=()),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        transfer_report(**kwargs)


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.mark.parametrize("aug_dim", ["128", "inf"])
def test_cli_prints_table(aug_dim: str) -> None:
    result = CliRunner().invoke(main, [f"--aug_dim={aug_dim}"])
    assert result.exit_code == 0, result.output
    assert "r_max" in result.output and "Prior radius" in result.output


def test_cli_prints_heavy_tail_warning() -> None:
    result = CliRunner().invoke(main, ["--aug_dim=1"])
    assert result.exit_code == 0, result.output
    assert "WARNING: D <= 2" in result.output


@pytest.mark.parametrize("aug_dim, r_max", [("128", 80.0 * math.sqrt(128)), ("inf", None)])
def test_cli_json(aug_dim: str, r_max: float | None) -> None:
    result = CliRunner().invoke(main, [f"--aug_dim={aug_dim}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["N"] == N_CIFAR
    assert report["r_max"] == (None if r_max is None else pytest.approx(r_max))


def test_cli_N_overrides_resolution_and_channels() -> None:
    result = CliRunner().invoke(main, ["--aug_dim=128", "--resolution=64", "--channels=1", "--json"])
    assert json.loads(result.stdout)["N"] == 64 * 64
    result = CliRunner().invoke(main, ["--aug_dim=128", "--resolution=64", "--N=7", "--json"])
    assert json.loads(result.stdout)["N"] == 7


@pytest.mark.parametrize(
    "args",
    [
        ["--aug_dim=0"],
        ["--aug_dim=abc"],
        ["--aug_dim=-3"],
        ["--aug_dim", "-3"],
        ["--aug_dim=nan"],
        [],
        ["--aug_dim=128", "--resolution=0"],
        ["--aug_dim=128", "--sigma_max=-1"],
        ["--aug_dim=128", "--sigma_min=100"],
        ["--aug_dim=128", "--P_std=0"],
    ],
)
def test_cli_rejects_bad_input_without_traceback(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    assert "Error" in result.output
    assert "Traceback" not in result.output


def test_huge_finite_D_reports_finite_moments() -> None:
    """D = 1e308 is a valid (practically infinite) D: E||x||^2 = sigma^2 N D / (D - 2) must not overflow to inf."""
    report = transfer_report(1e308, 3072)
    assert report["prior_mean_square_norm"] == pytest.approx(80.0**2 * 3072, rel=1e-12)
    result = CliRunner().invoke(main, ["--aug_dim=1e308"])
    assert result.exit_code == 0 and "inf" not in result.output.split("E||x||^2")[1].splitlines()[0]
