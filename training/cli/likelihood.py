"""pfgmpp-likelihood: bits/dim of a dataset under a trained network, for any D, on one or many GPUs.

    pfgmpp-likelihood --network=net.pt --data=datasets/cifar10-32x32-test.zip --out=bpd.json
    torchrun --standalone --nproc_per_node=8 -m training.cli.likelihood --network=net.pt --data=test.zip

Formulas, conventions and measured figures: docs/likelihood.md; the library: training/likelihood.py.
"""

from __future__ import annotations

import json
import math

import click

from dnnlib import util
from torch_utils import distributed
from torch_utils.precision import set_tf32
from training import generation
from training.cli import error_message, exit_on_signals, user_errors
from training.datasets import ImageFolderDataset
from training.generation.likelihood import ESTIMATORS, check_prior, dataset_bpd
from training.pfgmpp import format_D
from training.samplers.levels import flow_range


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--network", help="Network snapshot or EDM/PFGM++ checkpoint", metavar="PATH|URL", type=str, required=True)
@click.option("--data", help="Images: a ZIP or folder made by dataset_tool.py", metavar="ZIP|DIR", type=str, required=True)
@click.option("--out", help="Write the results here as JSON (rank 0)", metavar="JSON", type=click.Path(dir_okay=False))
@click.option("--num", help="Evaluate a seeded subset of this many images [default: all]", metavar="INT", type=click.IntRange(min=1))
@click.option("--batch", "batch_size", help="Images per ODE solve per rank", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--dequant", help="Uniform dequantisation draws averaged per image", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--estimator", help="Divergence: Hutchinson probes, or exact (small images only)", type=click.Choice(list(ESTIMATORS)), default="rademacher", show_default=True)
@click.option("--probes", "num_probes", help="Hutchinson probes averaged per trajectory", metavar="INT", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--rtol", help="RK45 relative tolerance", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True)
@click.option("--atol", help="RK45 absolute tolerance", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True)
@click.option("--sigma_min", help="Where the data sit [default: 0.002, clamped to the network]", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--sigma_max", help="Where the prior sits [default: 80, clamped to the network]", metavar="FLOAT", type=click.FloatRange(min=0, min_open=True))
@click.option("--seed", help="Seed of the subset, dequantisation and probes", metavar="INT", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--workers", help="Data loader processes", metavar="INT", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--per_image", help="Also store every image's bits/dim in the JSON", is_flag=True)
@click.option("--overwrite", help="Replace --out if it exists", is_flag=True)
def main(network, data, out, num, batch_size, seed, workers, per_image, overwrite, **options):
    """Bits/dim of a dataset under a trained network (any D), on one or many GPUs (torchrun)."""
    with user_errors():
        device = distributed.init()
    with user_errors():
        if out is not None:
            distributed.main_only(lambda: util.check_output(out, "--out", overwrite))
        net = generation.load_guided(network, device)
        check_prior(net)
        dataset = ImageFolderDataset(data, max_size=num, random_seed=seed, use_labels=bool(getattr(net, "label_dim", 0)))
        generation.check_image_shape(net, dataset.image_shape, data)
        dataset.check_images()  # an odd or cut-short image is found now, not after hours of ODE solves
        if options["estimator"] == "exact" and math.prod(dataset.image_shape) > 4096:
            raise ValueError(f"--estimator=exact needs {math.prod(dataset.image_shape)} backward passes per network call; "
                             "use --estimator=rademacher for images this large")
    net.eval().requires_grad_(False)
    set_tf32(False)  # TF32 off: the log-determinant sums N small terms
    distributed.print0(f"{type(net).__name__} D={format_D(float(net.D))}: {len(dataset)} images of {data} "
                       f"on {distributed.get_world_size()} rank(s)")
    try:
        result = dataset_bpd(net, dataset, batch_size, device, seed=seed, workers=workers, progress=True, **options)
    except (ValueError, RuntimeError) as error:
        raise click.ClickException(error_message(error)) from None
    lo, hi = flow_range(net, options["sigma_min"], options["sigma_max"])
    result.update(options)
    result.update(network=network, data=data, D=format_D(float(net.D)), sigma_min=lo, sigma_max=hi, seed=seed)
    if not per_image:
        result.pop("per_image")
    distributed.print0(f"bits/dim {result['bpd']:.4f} +- {result['bpd_se']:.4f} (standard error, "
                       f"{result['num_images']} images, {result['nfe_per_solve']:.0f} evaluations per solve)")
    if out is not None and distributed.is_main():
        with user_errors(), exit_on_signals(), util.atomic_write(out, "w") as f:
            json.dump(result, f, indent=2)
    distributed.shutdown()


if __name__ == "__main__":
    main()
