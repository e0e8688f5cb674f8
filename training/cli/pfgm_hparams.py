"""pfgmpp-pfgm-hparams: PFGM's hyper-parameters M, z_max and upper_norm from the data (PFGM App. B.1.1, B.2.1).

    pfgmpp-pfgm-hparams --data_norm=32 --resolution=32     # CIFAR-10: M = 291
    pfgmpp-pfgm-hparams --data=datasets/cifar10-32x32.zip
"""

from __future__ import annotations

import json

import click

from training.cli import user_errors
from training.datasets import ImageFolderDataset
from training.losses.pfgm import average_norm, derive_hparams


@click.command()
@click.option("--data", help="Measure the average norm on this dataset (ZIP or folder)", metavar="ZIP|DIR", type=str)
@click.option("--data_norm", help="Average data norm |y| (y in [-1, 1]) [default: measured on --data]", type=click.FloatRange(min=0, min_open=True))
@click.option("--resolution", help="Image resolution (without --data)", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--channels", help="Image channels (without --data)", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--sigma_end", help="Smallest perturbation scale", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--tau", help="Growth of the perturbation scale per unit of m", type=click.FloatRange(min=0, min_open=True), default=0.03, show_default=True)
@click.option("--max_images", help="Images measured with --data", type=click.IntRange(min=1), default=10000, show_default=True)
@click.option("--json", "as_json", help="Print JSON", is_flag=True)
def main(data, data_norm, resolution, channels, sigma_end, tau, max_images, as_json) -> None:
    """PFGM's hyper-parameter helper: M, z_max and upper_norm from the average data norm and N."""
    with user_errors():
        N = channels * resolution**2
        if data is not None:
            dataset = ImageFolderDataset(path=data)
            N = dataset.num_channels * dataset.resolution**2
            data_norm = data_norm or average_norm(dataset, max_images)
        if data_norm is None:
            raise ValueError("give --data_norm (CIFAR-10: 32) or --data to measure it")
        report = derive_hparams(data_norm, N, sigma_end, tau)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"PFGM hyper-parameters for N = {N}, average data norm {report['data_norm']:.4g}, "
               f"sigma_end = {sigma_end:g}, tau = {tau:g}:")
    click.echo(f"  M          = {report['M']}      (train.py --pfgm_M)")
    click.echo(f"  z_max      = {report['z_max']:.4g}  (train.py --z_max)")
    click.echo(f"  upper_norm = {report['upper_norm']:.4g}  (train.py --upper_norm)")


if __name__ == "__main__":
    main()
