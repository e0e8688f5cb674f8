"""FID (and KID, Inception Score) of images, of a network's samples, and reference statistics.

    torchrun --standalone --nproc_per_node=1 fid.py calc --images=fid-tmp \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
    python fid.py ref --data=datasets/my-dataset.zip --dest=fid-refs/my-dataset.npz
    torchrun --standalone --nproc_per_node=8 fid.py gen --network=network-snapshot.pt \\
        --ref=fid-refs/cifar10-32x32.npz --num_images=50000 --seeds=50000-99999
    torchrun --standalone --nproc_per_node=8 fid.py sweep --networks=training-runs/00000-cifar10 \\
        --seeds=0-49999,50000-99999,100000-149999 --ref=fid-refs/cifar10-32x32.npz --out=sweep.json --plot=sweep.png
    torchrun --standalone --nproc_per_node=8 fid.py robustness --networks=D128.pt,D2048.pt,Dinf.pt \
        --ref=fid-refs/cifar10-32x32.npz --alphas=0,0.1,0.2 --steps_axis=6,9,18 --bits_axis=8,6 --out=robustness.json

Under torchrun write `--num_images`: torchrun's own parser takes `--num` for its `--numa-binding`.

`calc --images=RUN_DIR` on a run directory that the PFGM++ reference's way of generate.py filled (ckpt_NNNNNN
folders: training/generation/reference.py) scores each checkpoint's folder, as the reference's fid.py does; its
--ckpt/--end_ckpt (kimg) and --gen_seed (1, 2, 3: seeds 0-49999, 50000-99999, 100000-149999) choose them:

    torchrun --standalone --nproc_per_node=8 fid.py calc --images=training-runs/exp_name \
        --ref=fid-refs/cifar10-32x32.npz --num 50000 --ckpt 80000 --end_ckpt 81000 --gen_seed 1

`gen` samples in memory and never writes PNGs; its images are quantised to uint8 exactly as
generate.py saves them, so `gen` equals generate.py followed by `calc`. `sweep` runs `gen`'s evaluation for every
network and seed range, keeps each result in --out at once (a rerun does only what is missing), and marks the
best value and the best mean over the ranges (training/sweep.py). `robustness` evaluates networks against injected
noise, steps and weight bits, resumable in the same way (training/robustness.py, docs/robustness.md). Reference files are npz
with mu and sigma, interchangeable with EDM's. The detector is Inception-v3 as EDM uses it,
downloaded once into the cache; `--detector=PATH` or $PFGMPP_DETECTOR for offline machines.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dnnlib import util
from torch_utils import distributed
from training import evaluation, generation, metrics, robustness, sweep
from training.cli import exit_on_signals, user_errors
from training.cli.sampler import SeedList, sampler_options, settings_from_options
from training.generation import reference as run_layout

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


def warn_few_images(wanted: list[str], num: int, det) -> None:
    """Rank 0, stderr: a metric of too few images to mean what it means says so (`metrics.few_images_warnings`)."""
    if distributed.is_main():
        for message in metrics.few_images_warnings(wanted, num, det.feature_dim):
            click.echo(message, err=True)


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
    fid.py sweep --networks=RUN_DIR|GLOB|PATH --seeds=0-49999,50000-99999 --ref=NPZ|URL --out=JSON
    """


_REFERENCE = [
    click.option("--ref", "ref", help="Reference statistics (npz path or URL), or a dataset folder/ZIP", metavar="NPZ|URL|DIR"),
    click.option("--metrics", "wanted", help="Metrics to compute, comma-separated: " + ", ".join(f"{n} ({m.description})" for n, m in metrics.METRICS.items()), metavar="LIST", callback=metric_list, default="fid", show_default=True),
]
_OUT = click.option("--out", help="Also write the results as JSON (a new file unless --overwrite)", metavar="JSON", type=click.Path(dir_okay=False))
_OVERWRITE_OUT = click.option("--overwrite", "overwrite_out", help="Replace --out if it exists", is_flag=True)
_CLASS = click.option("--class", "class_idx", help="Class label [default: random]", metavar="INT", type=click.IntRange(min=0))


def reference_options(command):
    """--ref and --metrics, shared by calc, gen and sweep."""
    for option in reversed(_REFERENCE):
        command = option(command)
    return command


def eval_options(command):
    """--ref, --metrics, --out and --overwrite, shared by calc and gen."""
    return reference_options(_OUT(_OVERWRITE_OUT(command)))


def _check_ref(ref, wanted) -> None:
    try:
        evaluation.check_reference(wanted, ref)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


@main.command()
@click.option("--images", "image_path", help="Images to evaluate", metavar="DIR|ZIP", type=str, required=True)
@click.option("--num", "--num_images", "num_expected", help="Number of images to use (--num_images under torchrun)", metavar="INT", type=click.IntRange(min=2), default=50000, show_default=True)
@click.option("--seed", help="Which images to use when there are more than --num", metavar="INT", type=int, default=0, show_default=True)
@click.option("--workers", help="Image-reading processes per rank", metavar="INT", type=click.IntRange(min=0), default=lambda: distributed.default_workers(3), show_default="3, fewer where a rank has fewer cores")
@click.option("--ckpt", help="Run directory: the first checkpoint's folder to score (kimg; the PFGM++ reference's)", metavar="KIMG", type=click.IntRange(min=0))
@click.option("--end_ckpt", help="Run directory: the last checkpoint's folder to score (kimg)", metavar="KIMG", type=click.IntRange(min=0))
@click.option("--gen_seed", help="Run directory: the seed range of the folders: 1 (0-49999), 2 (50000-99999), 3 (100000-149999)", metavar="1|2|3", type=click.IntRange(min=1, max=3))
@eval_options
@common_options
def calc(image_path, num_expected, seed, workers, ckpt, end_ckpt, gen_seed, ref, wanted, out, overwrite_out, batch_size,
         detector_source):
    """Evaluate a folder or ZIP of images (e.g. from generate.py), or each checkpoint's folder of a run directory."""
    _check_ref(ref, wanted)
    by_checkpoint = run_layout.has_image_folders(image_path)
    if not by_checkpoint and (ckpt, end_ckpt, gen_seed) != (None, None, None):
        raise click.UsageError(f"--ckpt/--end_ckpt/--gen_seed choose checkpoint folders (ckpt_NNNNNN) of a run directory, "
                               f"and --images={image_path} holds none: generate into one with generate.py --outdir=RUN "
                               "and no --network, or leave these options out")
    with user_errors():
        device = distributed.init()

    with exit_on_signals(), user_errors():
        check_output(out, "--out", overwrite_out)
        det = metrics.detector.load_shared(detector_source, device)
        needs = metrics.reference_needs(wanted)
        reference = None if ref is None else metrics.open_reference(ref, needs, det, device, batch_size, workers, progress=True)

        def score(path: str) -> dict:
            dataset = metrics.image_dataset(path, num_expected, seed)
            warn_few_images(wanted, len(dataset), det)
            batches = metrics.dataset_batches(dataset, batch_size, workers, progress=True)
            return metrics.evaluate(wanted, metrics.statistics(batches, det, len(dataset), device, wanted), reference, seed)

        record = dict(images=image_path, num=num_expected, ref=ref, detector=detector_source)
        if not by_checkpoint:
            finish(score(image_path), record, out)
        else:
            folders = run_layout.image_folders(image_path, gen_seed or 1, ckpt or 0,
                                               run_layout.LAST_KIMG if end_ckpt is None else end_ckpt)
            if not folders:
                raise ValueError(f"--images={image_path}: no checkpoint folder of --gen_seed={gen_seed or 1} with kimg "
                                 "in the --ckpt/--end_ckpt range")
            found = []
            for kimg, folder in folders:
                results = score(str(folder))
                distributed.print0(f"{folder.name} (kimg {kimg}): " + ", ".join(f"{k} {v:g}" for k, v in results.items()))
                found.append(dict(kimg=kimg, images=str(folder), results=results))
            if out is not None and distributed.is_main():
                with util.atomic_write(out, "w") as f:
                    json.dump({"checkpoints": found, **record, "gen_seed": gen_seed or 1}, f, indent=2)
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
        dataset = metrics.image_dataset(dataset_path)
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
@_CLASS
@eval_options
@common_options
@sampler_options
def gen(network, num, seeds, class_idx, ref, wanted, out, overwrite_out, batch_size, detector_source, **opts):
    """Sample a network in memory and evaluate the samples (no PNGs written)."""
    _check_ref(ref, wanted)
    seed_list = _seed_list(seeds, num)
    settings = settings_from_options(opts)
    with user_errors():
        device = distributed.init()

    with exit_on_signals(), user_errors():
        check_output(out, "--out", overwrite_out)
        net = generation.load_guided(network, device, opts.get("aug_dim"), opts.get("pfgmpp"), class_idx, opts.get("gnet"),
                                      opts.get("guidance", 1.0), opts.get("quantize_bits"))
        settings.check(net)  # before the detector and reference are loaded
        reference, det = _reference_and_detector(ref, wanted, detector_source, device, batch_size)
        warn_few_images(wanted, len(seed_list), det)
        result = evaluation.score(net, seed_list, wanted, reference, det, device, settings, batch_size, class_idx,
                                  opts["precision"], progress=True)
        sampler = dict(solver=settings.solver, **settings.options, nfe_per_batch=result.nfe_per_batch,
                       guidance=opts["guidance"], gnet=opts.get("gnet"), quantize_bits=opts.get("quantize_bits"))
        finish(result.results, dict(network=network, num=len(seed_list), seeds=evaluation.seed_ranges_text(seed_list),
                                    ref=ref, detector=detector_source, sampler=sampler), out)
    distributed.shutdown()


def _reference_and_detector(ref: str | None, wanted: list[str], detector_source: str | None, device, batch_size: int):
    """(reference statistics or None, detector) for evaluating samples (gen, sweep)."""
    det = metrics.detector.load_shared(detector_source, device)
    needs = metrics.reference_needs(wanted)
    workers = distributed.default_workers(3)
    reference = None if ref is None else metrics.open_reference(ref, needs, det, device, batch_size, workers, progress=True)
    return reference, det


def _seed_list(seeds: list[int] | None, num: int | None) -> list[int]:
    """The seeds to sample: --seeds, or 0..num-1; their count must equal --num when both are given."""
    if seeds is None:
        return list(range(50000 if num is None else num))
    if num is not None and len(seeds) != num:
        raise click.UsageError(f"--seeds lists {len(seeds)} seeds but --num={num}; give one or make them agree")
    if len(seeds) < 2:
        raise click.BadParameter("need at least 2 seeds", param_hint="--seeds")
    return seeds


def network_list(ctx, param, value: tuple[str, ...]) -> list[sweep.Snapshot]:
    """--networks (repeatable, comma-separated): run directories, globs, files, URLs -> the networks, by kimg and sigma_rel."""
    try:
        return sweep.find_networks(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def seed_range_list(ctx, param, value: tuple[str, ...]) -> list[range] | None:
    """--seeds of sweep (repeatable, comma-separated): ranges FIRST-LAST, each evaluated on its own."""
    try:
        return sweep.parse_seed_ranges(value) if value else None
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


@main.command("sweep")
@click.option("--networks", help="Networks: run directories (their snapshots), globs, files or URLs; comma-separated or repeated", metavar="SPEC", multiple=True, required=True, callback=network_list)
@click.option("--seeds", "ranges", help="Seed ranges FIRST-LAST, comma-separated or repeated, each evaluated on its own  [default: 0 to num-1]", metavar="RANGES", multiple=True, callback=seed_range_list)
@click.option("--num", "--num_images", "num", help="Images per seed range [default: 50000; --num_images under torchrun]", metavar="INT", type=click.IntRange(min=2))
@_CLASS
@reference_options
@click.option("--out", help="Results JSON: evaluations already in it (same settings) are not redone; updated after each", metavar="JSON", type=click.Path(dir_okay=False), required=True)
@click.option("--plot", help="Also draw the first metric against sigma_rel and kimg (needs matplotlib)", metavar="PNG", type=click.Path(dir_okay=False))
@common_options
@sampler_options
def sweep_command(networks, ranges, num, class_idx, ref, wanted, out, plot, batch_size, detector_source, **opts):
    """Evaluate networks over seed ranges; resumable; prints a table and marks the best."""
    _check_ref(ref, wanted)
    ranges = _sweep_ranges(ranges, num)
    settings = settings_from_options(opts)
    with user_errors():
        if plot is not None:
            sweep.check_plotting()
        device = distributed.init()

    with exit_on_signals(), user_errors():
        check_output(out, "--out", overwrite=True)
        check_output(plot, "--plot", overwrite=True)
        key = sweep.settings(ref, detector_source, settings, opts["guidance"], opts.get("gnet"), opts["precision"], class_idx,
                             opts.get("quantize_bits"))
        records = distributed.main_only(lambda: sweep.Records.load(out))  # every rank plans; rank 0 alone writes
        pending = sweep.pending(records, networks, ranges, key, wanted)
        _say_pending(records, pending, len(networks), len(ranges), key)
        if pending:
            reference, det = _reference_and_detector(ref, wanted, detector_source, device, batch_size)
        for i, todo in pending:
            net = generation.load_guided(networks[i].path, device, opts.get("aug_dim"), opts.get("pfgmpp"), class_idx,
                                          opts.get("gnet"), opts["guidance"], opts.get("quantize_bits"))
            for j in todo:
                result = evaluation.score(net, ranges[j], wanted, reference, det, device, settings, batch_size, class_idx,
                                          opts["precision"], progress=True)
                distributed.main_only(lambda: _keep(records, sweep.record(networks[i], ranges[j], wanted, key, result)))
        distributed.main_only(lambda: _report(records, networks, ranges, key, wanted, plot))
    distributed.shutdown()


def _sweep_ranges(ranges: list[range] | None, num: int | None) -> list[range]:
    """The seed ranges: --seeds, or 0..num-1; each must hold --num seeds when both are given."""
    if ranges is None:
        return [range(50000 if num is None else num)]
    wrong = [r for r in ranges if num is not None and len(r) != num]
    if wrong:
        raise click.UsageError(f"--seeds range {evaluation.seed_ranges_text(wrong[0])} holds {len(wrong[0])} seeds but --num={num}; "
                               "give one or make them agree")
    return ranges


def _say_pending(records, pending, networks: int, ranges: int, key: dict) -> None:
    """Rank 0: how many evaluations are done already and how many remain."""
    if not distributed.is_main():
        return
    count, total = sum(len(todo) for _, todo in pending), networks * ranges
    click.echo(f"{networks} networks x {ranges} seed ranges = {total} evaluations: {total - count} found in "
               f"{records.path}, {count} to do")
    if records.others(key):
        click.echo(f"({records.others(key)} records in {records.path} have other settings: kept, not used)")


def _keep(records, record: dict) -> None:
    """Rank 0: write an evaluation's record at once and say it."""
    records.add(record)
    values = ", ".join(f"{k} {v:g}" for k, v in record["results"].items())
    click.echo(f"{sweep.snapshot_of(record['network']).name} seeds {record['seeds']}: {values} ({record['seconds']:.1f} s)")


def _report(records, networks, ranges, key, wanted, plot) -> None:
    """Rank 0: a table per metric with the best marked; the best into the file; the plot."""
    best = {"settings": key, "seeds": [evaluation.seed_ranges_text(r) for r in ranges], "metrics": {}}
    for name in wanted:
        rows = sweep.table_rows(records, networks, ranges, key, wanted, name)
        top = sweep.best(rows, name)
        click.echo("\n" + sweep.format_table(name, rows, ranges, top))
        best["metrics"][name] = sweep.best_record(name, rows, ranges, top)
        if plot is not None and name == wanted[0]:
            sweep.plot(plot, name, rows, top)
    records.save(best=best)
    click.echo(f"\nwrote {records.path}" + ("" if plot is None else f" and {plot}"))


def number_list(kind):
    """A click callback: a comma-separated list of `kind` (int or float), empty for none."""

    def parse(ctx, param, value: str | None):
        if not value:
            return []
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from None

    return parse


@main.command("robustness")
@click.option("--networks", help="Networks to compare (e.g. one per D): files, globs, run directories or URLs; comma-separated or repeated", metavar="SPEC", multiple=True, required=True, callback=network_list)
@click.option("--num", "--num_images", "num", help="Images per cell [default: 50000; --num_images under torchrun]", metavar="INT", type=click.IntRange(min=2))
@click.option("--seeds", help="Seeds of every cell's images [default: 0 to num-1]", metavar="LIST", type=SeedList())
@_CLASS
@reference_options
@click.option("--alphas", help="Injected noise alpha per step (x += alpha sigma_i N(0, I)), e.g. 0,0.05,0.1,0.2", metavar="LIST", callback=number_list(float))
@click.option("--steps_axis", "steps_axis", help="Step counts (--steps values), e.g. 6,9,13,18", metavar="LIST", callback=number_list(int))
@click.option("--bits_axis", "bits_axis", help="Weight bit widths, e.g. 9,8,7,6,5", metavar="LIST", callback=number_list(int))
@click.option("--out", help="Results JSON: cells already in it (same network contents and settings) are not redone; updated after each", metavar="JSON", type=click.Path(dir_okay=False), required=True)
@click.option("--table", help="Also write the Markdown table (one row per network) [default: --out with .md]", metavar="MD", type=click.Path(dir_okay=False))
@click.option("--plot", help="Also draw the metric against each axis, a line per network (needs matplotlib)", metavar="PNG", type=click.Path(dir_okay=False))
@common_options
@sampler_options
def robustness_command(networks, num, seeds, class_idx, ref, wanted, alphas, steps_axis, bits_axis, out, table, plot,
                       batch_size, detector_source, **opts):
    """The PFGM++ paper's robustness study: each metric against injected noise, steps and weight bits, per network;
    resumable; writes the JSON, a Markdown table and the plot."""
    _check_ref(ref, wanted)
    seed_list = _seed_list(seeds, num)
    settings = settings_from_options(opts)
    with user_errors():
        study = robustness.Study(alphas, steps_axis, bits_axis)
        cells = study.cells(settings, opts.get("quantize_bits"))
        if plot is not None:
            sweep.check_plotting()
        device = distributed.init()

    with exit_on_signals(), user_errors():
        table = table or str(Path(out).with_suffix(".md"))
        for path in (out, table, plot):
            check_output(path, "--out/--table/--plot", overwrite=True)
        base = sweep.settings(ref, detector_source, settings, opts["guidance"], opts.get("gnet"), opts["precision"], class_idx)
        base = {k: v for k, v in base.items() if k != "sampler"} | {"seeds": evaluation.seed_ranges_text(seed_list)}
        records = distributed.main_only(lambda: robustness.Records.load(out))  # every rank plans; rank 0 alone writes
        reference = det = None
        for network in networks:
            identity = util.content_identity(network.path)
            todo = [c for c in cells if records.find(identity, c, robustness.cell_key(c, base), wanted) is None]
            distributed.print0(f"{network.name}: {len(cells) - len(todo)} of {len(cells)} cells in {out}, {len(todo)} to do")
            for cell in todo:
                if det is None:
                    reference, det = _reference_and_detector(ref, wanted, detector_source, device, batch_size)
                net = generation.load_guided(network.path, device, opts.get("aug_dim"), opts.get("pfgmpp"), class_idx,
                                              opts.get("gnet"), opts["guidance"], cell.quantize_bits)
                result = evaluation.score(net, seed_list, wanted, reference, det, device, cell.sampler, batch_size,
                                          class_idx, opts["precision"], progress=False)
                new = robustness.record(network.path, identity, net.D, cell, robustness.cell_key(cell, base), wanted,
                                        result.results, result.nfe_per_batch, result.seconds)
                distributed.main_only(lambda new=new: records.add(new))
                values = ", ".join(f"{k} {v:g}" for k, v in result.results.items())
                distributed.print0(f"  {cell.axis} = {cell.value:g}: {values} (NFE {result.nfe_per_batch:g}, {result.seconds:.1f} s)")
        distributed.main_only(lambda: _robustness_report(records, networks, cells, base, wanted, table, plot))
    distributed.shutdown()


def _robustness_report(records, networks, cells, base, wanted, table, plot) -> None:
    """Rank 0: the table per metric (printed and written) and the plot of the first metric."""
    identities = {util.content_identity(n.path) for n in networks}
    keys = [json.dumps(robustness.cell_key(c, base), sort_keys=True) for c in cells]
    mine = [r for r in records.records if r["identity"] in identities and json.dumps(r["settings"], sort_keys=True) in keys]
    text = "\n".join(robustness.markdown_table(name, robustness.curves(mine, name)) for name in wanted)
    click.echo("\n" + text)
    robustness.write_text(table, text)
    if plot is not None:
        robustness.plot(plot, wanted[0], robustness.curves(mine, wanted[0]))
    click.echo(f"wrote {records.path}, {table}" + ("" if plot is None else f" and {plot}"))


if __name__ == "__main__":
    main()
