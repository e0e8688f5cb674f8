"""FID (and KID, Inception Score) of images, of a network's samples, and reference statistics.

    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=network-snapshot.pt \\
        --ref=fid-refs/cifar10-32x32.npz --num_images=50000 --seeds=50000-99999

Under torchrun write `--num_images`: torchrun's own parser takes `--num` for its `--numa-binding`.

`gen` samples in memory and never writes PNGs; its images are quantised to uint8 exactly as
generate.py saves them, so `gen` equals generate.py followed by `calc`. Reference files are npz
with mu and sigma, interchangeable with EDM's. The detector is Inception-v3 as EDM uses it,
downloaded once into the cache; `--detector=PATH` or $PFGMPP_DETECTOR for offline machines.
"""

from __future__ import annotations

import json

import click

from dnnlib import util
from torch_utils import distributed
from training import generation, metrics
from training.cli import exit_on_signals, user_errors
from training.cli.sampler import SeedList, sampler_options, settings_from_options

_COMMON = [
    click.option("--batch", "batch_size", help="Images per batch per rank", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True),
    click.option("--detector", "detector_source", help="Detector file or URL [default: $PFGMPP_DETECTOR, else the Inception-v3 URL]", metavar="PATH|URL"),
]


def common_options(command):
    """--batch and --detector, shared by every subcommand."""
    for option in reversed(_COMMON):
        command = option(command)
    return command


def metric_list(ctx, param, value: str) -> list[str]:
    """'fid,kid' -> ['fid', 'kid'], each a registered metric (training.metrics.METRICS)."""
    try:
        return metrics.parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def check_output(path: str | None, flag: str, overwrite: bool) -> None:
    """Before any work: can rank 0, the only writer, write `path`? (`dnnlib.util.check_output`; every rank stops.)"""
    if path is not None:
        distributed.main_only(lambda: util.check_output(path, flag, overwrite))


def finish(results: dict, record: dict, out: str | None) -> None:
    """Print the results on rank 0 and write them as JSON (atomically) with --out."""
    if not distributed.is_main():
        return
    for name, value in results.items():
        click.echo(f"{name:8s} {value:g}")
    if out is not None:
        with util.atomic_write(out, "w") as f:
            json.dump({"results": results, **record}, f, indent=2)


@click.group(context_settings=dict(help_option_names=["-h", "--help"]))
def main():
    """FID, KID and Inception Score, EDM-compatible.

    \b
    fid.py calc --images=DIR|ZIP --ref=NPZ|URL
    fid.py ref  --data=DIR|ZIP --dest=NPZ
    fid.py gen  --network=PATH|URL --ref=NPZ|URL
    """


_EVAL = [
    click.option("--ref", "ref", help="Reference statistics (npz path or URL), or a dataset folder/ZIP", metavar="NPZ|URL|DIR"),
    click.option("--metrics", "wanted", help="Metrics to compute, comma-separated: " + ", ".join(f"{n} ({m.description})" for n, m in metrics.METRICS.items()), metavar="LIST", callback=metric_list, default="fid", show_default=True),
    click.option("--out", help="Also write the results as JSON (replacing an existing file)", metavar="JSON", type=click.Path(dir_okay=False)),
]


def eval_options(command):
    """--ref, --metrics and --out, shared by calc and gen."""
    for option in reversed(_EVAL):
        command = option(command)
    return command


def _check_ref(ref, wanted) -> None:
    needing = [n for n in wanted if metrics.get(n).reference is not None]
    if ref is None and needing:
        raise click.UsageError(f"--ref is required for {', '.join(needing)} (an npz such as EDM's fid-refs, or a dataset)")


@main.command()
@click.option("--images", "image_path", help="Images to evaluate", metavar="DIR|ZIP", type=str, required=True)
@click.option("--num", "--num_images", "num_expected", help="Number of images to use (--num_images under torchrun)", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--seed", help="Which images to use when there are more than --num", metavar="INT", type=int, default=0, show_default=True)
@click.option("--workers", help="Image-reading processes per rank", metavar="INT", type=click.IntRange(min=0), default=lambda: distributed.default_workers(3), show_default="3, fewer where a rank has fewer cores")
@eval_options
@common_options
def calc(image_path, num_expected, seed, workers, ref, wanted, out, batch_size, detector_source):
    """Evaluate a folder or ZIP of images (e.g. from generate.py)."""
    _check_ref(ref, wanted)
    with user_errors():
        device = distributed.init()

    with exit_on_signals(), user_errors():
        check_output(out, "--out", overwrite=True)
        dataset = metrics.open_images(image_path, num_expected, seed)
        det = metrics.detector.load_shared(detector_source, device)
        needs = metrics.reference_needs(wanted)
        reference = None if ref is None else metrics.open_reference(ref, needs, det, device, batch_size, workers, progress=True)
        batches = metrics.dataset_batches(dataset, batch_size, workers, progress=True)
        results = metrics.evaluate(wanted, metrics.statistics(batches, det, len(dataset), device, wanted), reference, seed)
        finish(results, dict(images=image_path, num=num_expected, ref=ref, detector=detector_source), out)
    distributed.shutdown()


@main.command()
@click.option("--data", "dataset_path", help="Dataset to describe", metavar="DIR|ZIP", type=str, required=True)
@click.option("--dest", help="Where to write the npz (a new file unless --overwrite)", metavar="NPZ", type=click.Path(dir_okay=False), required=True)
@click.option("--overwrite", help="Replace --dest if it exists", is_flag=True)
@click.option("--features", "keep_features", help="Also store the features (needed for KID; large)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--workers", help="Image-reading processes per rank", metavar="INT", type=click.IntRange(min=0), default=lambda: distributed.default_workers(3), show_default="3, fewer where a rank has fewer cores")
@common_options
def ref(dataset_path, dest, overwrite, keep_features, workers, batch_size, detector_source):
    """Compute reference statistics of a dataset (EDM-compatible npz)."""
    with user_errors():
        device = distributed.init()

    with exit_on_signals(), user_errors():
        check_output(dest, "--dest", overwrite)
        dataset = metrics.open_images(dataset_path)
        det = metrics.detector.load_shared(detector_source, device)
        keep = {"features"} if keep_features else set()
        batches = metrics.dataset_batches(dataset, batch_size, workers, progress=True)
        stats = metrics.compute_stats(batches, det, len(dataset), device, keep)
        if distributed.is_main():
            metrics.save_reference(dest, stats, keep_features)
        count = len(dataset)
    distributed.print0(f"wrote {dest}: statistics of {count} images")
    distributed.shutdown()


@main.command()
@click.option("--network", help="Network snapshot or EDM/PFGM++ checkpoint", metavar="PATH|URL", type=str, required=True)
@click.option("--num", "--num_images", "num", help="Number of images [default: the number of seeds, else 50000; --num_images under torchrun]", metavar="INT", type=click.IntRange(min=2))
@click.option("--seeds", help="Seeds of the images [default: 0 to num-1]", metavar="LIST", type=SeedList())
@click.option("--class", "class_idx", help="Class label [default: random]", metavar="INT", type=click.IntRange(min=0))
@eval_options
@common_options
@sampler_options
def gen(network, num, seeds, class_idx, ref, wanted, out, batch_size, detector_source, **opts):
    """Sample a network in memory and evaluate the samples (no PNGs written)."""
    _check_ref(ref, wanted)
    seed_list = _seed_list(seeds, num)
    settings = settings_from_options(opts)
    with user_errors():
        device = distributed.init()
    nfe = []

    def in_memory(net):
        for b in generation.generate(net, seed_list, batch_size, device, settings, class_idx, opts["precision"], progress=True):
            nfe.append(b.nfe)
            yield b.indices, b.images.permute(0, 3, 1, 2)

    with exit_on_signals(), user_errors():
        check_output(out, "--out", overwrite=True)
        net = generation.load_network(network, device, opts.get("aug_dim"), opts.get("pfgmpp"), class_idx)
        det = metrics.detector.load_shared(detector_source, device)
        needs = metrics.reference_needs(wanted)
        reference = None if ref is None else metrics.open_reference(ref, needs, det, device, batch_size, distributed.default_workers(3), progress=True)
        stats = metrics.statistics(in_memory(net), det, len(seed_list), device, wanted)
        results = metrics.evaluate(wanted, stats, reference, seed_list[0])
        sampler = dict(solver=settings.solver, **settings.options, nfe_per_batch=sum(nfe) / max(len(nfe), 1))
        contiguous = seed_list == list(range(seed_list[0], seed_list[-1] + 1))
        finish(results, dict(network=network, num=len(seed_list), seeds=f"{seed_list[0]}-{seed_list[-1]}" if contiguous else seed_list,
                             ref=ref, detector=detector_source, sampler=sampler), out)
    distributed.shutdown()


def _seed_list(seeds: list[int] | None, num: int | None) -> list[int]:
    """The seeds to sample: --seeds, or 0..num-1; their count must equal --num when both are given."""
    if seeds is None:
        return list(range(50000 if num is None else num))
    if num is not None and len(seeds) != num:
        raise click.UsageError(f"--seeds lists {len(seeds)} seeds but --num={num}; give one or make them agree")
    if len(seeds) < 2:
        raise click.BadParameter("need at least 2 seeds", param_hint="--seeds")
    return seeds


if __name__ == "__main__":
    main()
