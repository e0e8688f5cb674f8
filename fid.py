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
from pathlib import Path

import click
import torch

from dnnlib import util
from torch_utils import distributed
from training import detector as detectors
from training import generation, metrics
from training.dataset import DatasetError, ImageFolderDataset

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
    """'fid,kid' -> ['fid', 'kid'], each one of metrics.METRICS."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in metrics.METRICS]
    if bad or not names:
        raise click.BadParameter(f"choose among {', '.join(metrics.METRICS)} (comma-separated), got {value!r}")
    return names


def _fail_on_user_errors(fn):
    """Run fn, turning the library's errors for bad input into click errors (no traceback)."""
    try:
        return fn()
    except (ValueError, OSError) as error:
        raise click.ClickException(str(error)) from None


def open_images(path: str, num: int | None, seed: int) -> ImageFolderDataset:
    """The images of a folder or ZIP; with `num`, a seeded choice of exactly num of them (EDM's subset)."""
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num:
        raise DatasetError(f"found {len(dataset)} images in {path}, but --num={num}; generate more or lower --num")
    return dataset


def dataset_batches(dataset, batch_size: int, workers: int):
    """This rank's batches of (positions, uint8 NCHW), read by `workers` loader processes."""
    batches = [list(b) for b in generation.rank_batches(len(dataset), batch_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    for positions, (images, _labels) in zip(batches, loader):
        yield positions, images


def load_detector(source: str | None, device):
    """The feature detector, downloaded by rank 0 before the other ranks read it from the cache."""
    return distributed.main_first(lambda: detectors.load_detector(source, device=device, progress=distributed.is_main()))


def _reference(ref: str, wanted: list[str], det, device, batch_size: int, workers: int) -> metrics.Reference:
    """Reference statistics from an npz (path or URL), or computed here from a dataset folder or ZIP."""
    if not util.is_url(ref) and Path(ref).exists() and not ref.endswith(".npz"):
        dataset = ImageFolderDataset(ref)
        stats = metrics.compute_stats(dataset_batches(dataset, batch_size, workers), det, len(dataset), device, {"fid", "kid"})
        mu, sigma = stats.mean_cov()
        return metrics.Reference(mu, sigma, stats.features.cpu().numpy(), len(dataset))
    reference = distributed.main_first(lambda: metrics.load_reference(ref))
    if "kid" in wanted and reference.features is None:
        raise ValueError(f"{ref} holds no features, which KID needs: make it with `fid.py ref --features=1`, "
                         "or pass the dataset itself as --ref")
    return reference


def report(stats: metrics.FeatureStats, reference: metrics.Reference | None, wanted: list[str], seed: int) -> dict:
    """The requested metrics from the statistics of the evaluated images and the reference."""
    results = {}
    if "fid" in wanted:
        mu, sigma = stats.mean_cov()
        results["fid"] = metrics.fid_from_stats(mu, sigma, reference.mu, reference.sigma)
    if "kid" in wanted:
        generator = torch.Generator().manual_seed(seed)
        ref_features = torch.as_tensor(reference.features, device=stats.features.device)
        results["kid"] = metrics.kid_from_features(stats.features, ref_features, generator=generator)
    if "is" in wanted:
        results["is_mean"], results["is_std"] = metrics.inception_score(stats.probs)
    return results


def finish(results: dict, record: dict, out: str | None) -> None:
    """Print the results on rank 0 and write them as JSON (atomically) with --out."""
    if not distributed.is_main():
        return
    for name, value in results.items():
        click.echo(f"{name:8s} {value:g}")
    if out is not None:
        with util.atomic_write(out, "w") as f:
            json.dump({"results": results, **record}, f, indent=2)


@click.group()
def main():
    """FID, KID and Inception Score, EDM-compatible.

    \b
    fid.py calc --images=DIR|ZIP --ref=NPZ|URL
    fid.py ref  --data=DIR|ZIP --dest=NPZ
    fid.py gen  --network=PATH|URL --ref=NPZ|URL
    """


_EVAL = [
    click.option("--ref", "ref", help="Reference statistics (npz path or URL), or a dataset folder/ZIP", metavar="NPZ|URL|DIR"),
    click.option("--metrics", "wanted", help="Metrics to compute: fid, kid, is", metavar="LIST", callback=metric_list, default="fid", show_default=True),
    click.option("--out", help="Also write the results as JSON", metavar="JSON", type=click.Path(dir_okay=False)),
]


def eval_options(command):
    """--ref, --metrics and --out, shared by calc and gen."""
    for option in reversed(_EVAL):
        command = option(command)
    return command


def _check_ref(ref, wanted) -> None:
    if ref is None and ("fid" in wanted or "kid" in wanted):
        raise click.UsageError("--ref is required for FID and KID (an npz such as EDM's fid-refs, or a dataset)")


@main.command()
@click.option("--images", "image_path", help="Images to evaluate", metavar="DIR|ZIP", type=str, required=True)
@click.option("--num", "--num_images", "num_expected", help="Number of images to use (--num_images under torchrun)", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--seed", help="Which images to use when there are more than --num", metavar="INT", type=int, default=0, show_default=True)
@click.option("--workers", help="Image-reading processes per rank", metavar="INT", type=click.IntRange(min=0), default=3, show_default=True)
@eval_options
@common_options
def calc(image_path, num_expected, seed, workers, ref, wanted, out, batch_size, detector_source):
    """Evaluate a folder or ZIP of images (e.g. from generate.py)."""
    _check_ref(ref, wanted)
    device = distributed.init()

    def run():
        dataset = open_images(image_path, num_expected, seed)
        det = load_detector(detector_source, device)
        reference = None if ref is None else _reference(ref, wanted, det, device, batch_size, workers)
        stats = metrics.compute_stats(dataset_batches(dataset, batch_size, workers), det, len(dataset), device, wanted)
        return report(stats, reference, wanted, seed)

    results = _fail_on_user_errors(run)
    finish(results, dict(images=image_path, num=num_expected, ref=ref, detector=detector_source), out)
    distributed.shutdown()


@main.command()
@click.option("--data", "dataset_path", help="Dataset to describe", metavar="DIR|ZIP", type=str, required=True)
@click.option("--dest", help="Where to write the npz", metavar="NPZ", type=click.Path(dir_okay=False), required=True)
@click.option("--features", "keep_features", help="Also store the features (needed for KID; large)", metavar="BOOL", type=bool, default=False, show_default=True)
@click.option("--workers", help="Image-reading processes per rank", metavar="INT", type=click.IntRange(min=0), default=3, show_default=True)
@common_options
def ref(dataset_path, dest, keep_features, workers, batch_size, detector_source):
    """Compute reference statistics of a dataset (EDM-compatible npz)."""
    device = distributed.init()

    def run():
        dataset = ImageFolderDataset(dataset_path)
        det = load_detector(detector_source, device)
        wanted = {"fid", "kid"} if keep_features else {"fid"}
        stats = metrics.compute_stats(dataset_batches(dataset, batch_size, workers), det, len(dataset), device, wanted)
        if distributed.is_main():
            metrics.save_reference(dest, stats, keep_features)
        return len(dataset)

    count = _fail_on_user_errors(run)
    distributed.print0(f"wrote {dest}: statistics of {count} images")
    distributed.shutdown()


@main.command()
@click.option("--network", help="Network snapshot or EDM/PFGM++ checkpoint", metavar="PATH|URL", type=str, required=True)
@click.option("--num", "--num_images", "num", help="Number of images [default: the number of seeds, else 50000; --num_images under torchrun]", metavar="INT", type=click.IntRange(min=2))
@click.option("--seeds", help="Seeds of the images [default: 0 to num-1]", metavar="LIST", type=generation.SeedList())
@click.option("--class", "class_idx", help="Class label [default: random]", metavar="INT", type=click.IntRange(min=0))
@eval_options
@common_options
@generation.sampler_options
def gen(network, num, seeds, class_idx, ref, wanted, out, batch_size, detector_source, **opts):
    """Sample a network in memory and evaluate the samples (no PNGs written)."""
    _check_ref(ref, wanted)
    seed_list = _seed_list(seeds, num)
    try:
        settings = generation.settings_from_options(opts)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    device = distributed.init()
    nfe = []

    def in_memory(net):
        for b in generation.generate(net, seed_list, batch_size, device, settings, class_idx, opts["precision"], progress=True):
            nfe.append(b.nfe)
            yield b.indices, b.images.permute(0, 3, 1, 2)

    def run():
        net = generation.load_network(network, device, opts.get("aug_dim"), opts.get("pfgmpp"), class_idx)
        det = load_detector(detector_source, device)
        reference = None if ref is None else _reference(ref, wanted, det, device, batch_size, 3)
        stats = metrics.compute_stats(in_memory(net), det, len(seed_list), device, wanted)
        return report(stats, reference, wanted, seed_list[0])

    results = _fail_on_user_errors(run)
    sampler = dict(solver=settings.solver, **settings.given(), nfe_per_batch=sum(nfe) / max(len(nfe), 1))
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
