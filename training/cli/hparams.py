"""pfgmpp-hparams: what the EDM hyper-parameters (stated in sigma) become in PFGM++ for a given D.

    pfgmpp-hparams --aug_dim=128 --resolution=32 --channels=3 --sigma_max=80
    python -m training.cli.hparams --aug_dim=inf --resolution=64 --json
"""

from __future__ import annotations

import json

import click

from training.cli import AugDim, user_errors
from training.hparams import format_report, transfer_report

_POSITIVE = click.FloatRange(min=0, min_open=True)


@click.command()
@click.option("--aug_dim", type=AugDim(), required=True, help="Augmentation dimension D: a number > 0, or inf")
@click.option("--resolution", type=click.IntRange(min=1), default=32, show_default=True, help="Image resolution")
@click.option("--channels", type=click.IntRange(min=1), default=3, show_default=True, help="Image channels")
@click.option("--N", "N", type=click.IntRange(min=1), help="Values per sample  [default: channels*resolution^2]")
@click.option("--sigma_max", type=_POSITIVE, default=80.0, show_default=True, help="Largest noise level")
@click.option("--sigma_min", type=_POSITIVE, default=0.002, show_default=True, help="Smallest noise level")
@click.option("--P_mean", "P_mean", type=float, default=-1.2, show_default=True, help="Mean of ln sigma in training")
@click.option("--P_std", "P_std", type=_POSITIVE, default=1.2, show_default=True, help="Std of ln sigma in training")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (warnings also go to stderr)")
def main(
    aug_dim: float,
    resolution: int,
    channels: int,
    N: int | None,
    sigma_max: float,
    sigma_min: float,
    P_mean: float,
    P_std: float,
    as_json: bool,
) -> None:
    """Show what the EDM hyper-parameters (stated in sigma) become in PFGM++ for a given D."""
    if N is None:
        N = channels * resolution**2
    with user_errors():
        report = transfer_report(aug_dim, N, sigma_max=sigma_max, sigma_min=sigma_min, P_mean=P_mean, P_std=P_std)
    if as_json:
        click.echo(json.dumps(report, indent=2, allow_nan=False))
        for warning in report["warnings"]:
            click.secho(f"WARNING: {warning}", fg="yellow", err=True)
        return
    click.echo(format_report(report))
    for warning in report["warnings"]:
        click.secho(f"\nWARNING: {warning}", fg="yellow", bold=True)


if __name__ == "__main__":
    main()
