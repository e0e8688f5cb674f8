"""Generate images from a trained network: one PNG per seed, or a grid, on one or many GPUs.

    torchrun --standalone --nproc_per_node=8 generate.py --outdir=fid-tmp --seeds=0-49999 --subdirs \\
        --network=training-runs/00000-cifar10/network-snapshot-200000.pt
    python generate.py --network=edm-cifar10-32x32-cond-vp.pkl --seeds=0-63 --class=3 --grid=grid.png

Latents (training/latents.py, docs/likelihood.md): --encode maps images to the prior at sigma_max through the
ODE and checks that decoding returns them; --interpolate walks between two seeds or two encoded latents;
--temperature scales the prior radius.

    python generate.py --network=net.pt --encode=datasets/faces.zip --outdir=latents --grid=roundtrip.png
    python generate.py --network=net.pt --interpolate=3,latents/000007.npy --frames=10 --grid=walk.png
    python generate.py --network=net.pt --seeds=0-7 --temperature=0.8,1,1.2 --grid=temperature.png

The network is a snapshot of ours or an EDM / PFGM++ checkpoint (.pkl/.pt, path or URL), read
without running code from it. D and the prior come from the checkpoint. Image k with seed s depends
on s alone, whatever --batch and the number of ranks.

The PFGM++ reference's way (training/generation/reference.py): without --network, every training state of the run
directory --outdir whose kimg lies in [--ckpt, --end_ckpt] is sampled into --outdir/ckpt_NNNNNN/, as its README does:

    torchrun --standalone --nproc_per_node=8 generate.py --seeds=0-49999 --outdir=./training-runs/exp_name \
        --pfgmpp=1 --aug_dim=128 [--use_pickle=1] [--save_images]
"""

from __future__ import annotations

import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import torch

from dnnlib import util
from torch_utils import distributed
from torch_utils.precision import configure as configure_precision
from training import generation
from training.cli import user_errors
from training.cli.sampler import SeedList, sampler_options, settings_from_options
from training.generation import images, reference
from training.pfgmpp import format_D
from training.samplers.guidance import Guided


def image_path(outdir: Path, seed: int, subdirs: bool) -> Path:
    """EDM's layout: outdir/000000.png, or outdir/001000/001234.png with --subdirs."""
    return outdir / (f"{seed - seed % 1000:06d}" if subdirs else "") / f"{seed:06d}.png"


def check_outputs(outdir: Path | None, grid: str | None, paths, overwrite: bool) -> None:
    """Before any sampling: --outdir can be written, and no file of the user's (the PNGs or latents to be written,
    the --grid) is replaced without --overwrite; ValueError saying what to do."""
    if outdir is not None:
        folder = outdir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # created when the first image is written: an error before leaves no empty folder
        try:
            if not folder.is_dir():
                raise NotADirectoryError(f"{folder} is not a folder")
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
                pass
        except OSError as error:
            raise ValueError(f"cannot write to --outdir {outdir}: {error.strerror or error}; choose another folder") from None
        existing = [] if overwrite else [p for p in paths if p.exists()]
        if existing:
            raise ValueError(f"--outdir={outdir} already holds {len(existing)} of the files to write ({existing[0].name}, "
                             "...); pass --overwrite to replace them, or choose another folder")
    if grid is not None:
        util.check_output(grid, "--grid", overwrite)


def load(network: str, device: torch.device, opts: dict, class_idx: int | None):
    """The network, checked against the options that must agree with it; errors as click errors."""
    with user_errors():
        return generation.load_guided(network, device, opts.get("aug_dim"), opts.get("pfgmpp"), class_idx, opts.get("gnet"),
                                       opts.get("guidance", 1.0), opts.get("quantize_bits"))


_REFERENCE_FLAGS = [  # the PFGM++ reference's generate.py: a run directory's checkpoints (docstring)
    click.option("--ckpt", help="Without --network: the first checkpoint of --outdir to sample (kimg)", metavar="KIMG", type=click.IntRange(min=0)),
    click.option("--end_ckpt", help="Without --network: the last checkpoint of --outdir to sample (kimg)", metavar="KIMG", type=click.IntRange(min=0)),
    click.option("--use_pickle", help="Without --network: sample the run's training-state-*.pkl files", metavar="BOOL", type=bool, default=False, show_default=True),
    click.option("--edm", help="Without --network: every checkpoint of --outdir, whatever --ckpt/--end_ckpt", metavar="BOOL", type=bool, default=False, show_default=True),
    click.option("--save_images", help="Without --network: only a grid of the first batch per checkpoint, --outdir/ode_images_KIMG.png", is_flag=True),
    click.option("--resume", help="The PFGM++ reference's unused flag (refused: see the message)", metavar="INT", hidden=True),
]


def reference_flags(command):
    """The PFGM++ reference's generate.py options, for a run directory's checkpoints."""
    for option in reversed(_REFERENCE_FLAGS):
        command = option(command)
    return command


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--network", help="Network snapshot or EDM/PFGM++ checkpoint [default: the training states of --outdir, as the PFGM++ reference]", metavar="PATH|URL", type=str)
@click.option("--outdir", help="Where to save one PNG per seed", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--seeds", help="Random seeds (e.g. 1,2,5-10)", metavar="LIST", type=SeedList(), default="0-63", show_default=True)
@click.option("--subdirs", help="Create a subdirectory for every 1000 seeds", is_flag=True)
@click.option("--class", "class_idx", help="Class label [default: random]", metavar="INT", type=click.IntRange(min=0))
@click.option("--batch", "batch_size", help="Maximum batch size per rank", metavar="INT", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--grid", help="Also write all images as one PNG grid", metavar="PNG", type=click.Path(dir_okay=False))
@click.option("--encode", help="Encode these images to latents in --outdir, and check the decode", metavar="ZIP|DIR", type=str)
@click.option("--latent_format", help="File format of --encode's latents", type=click.Choice(["npy", "pt"]), default="npy", show_default=True)
@click.option("--interpolate", help="Interpolate between two seeds or latent files into --grid", metavar="A,B", type=str)
@click.option("--frames", help="Images along --interpolate", metavar="INT", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--temperature", help="Prior radius scales, one --grid row each", metavar="LIST", callback=lambda ctx, p, v: _floats(v))
@click.option("--overwrite", help="Replace images, latents or a --grid that exist already", is_flag=True)
@reference_flags
@sampler_options
def main(network, outdir, seeds, subdirs, class_idx, batch_size, grid, encode, latent_format, interpolate, frames,
         temperature, overwrite, ckpt, end_ckpt, use_pickle, edm, save_images, resume, **opts):
    """Generate images with seeded, batch-independent sampling."""
    if resume is not None:
        raise click.UsageError("--resume is a flag of the PFGM++ reference's generate.py that it never uses; choose "
                               "the checkpoints of --outdir with --ckpt/--end_ckpt (kimg), or one file with --network")
    run_mode = dict(ckpt=ckpt, end_ckpt=end_ckpt, use_pickle=use_pickle, edm=edm, save_images=save_images)
    if network is None:
        single = [name for name, value in (("--grid", grid), ("--encode", encode), ("--interpolate", interpolate),
                                           ("--temperature", temperature)) if value]
        if single:
            raise click.UsageError(f"{', '.join(single)} need(s) --network; without it generate.py samples the "
                                   "checkpoints of --outdir, as the PFGM++ reference does")
        return _run_directory(outdir, seeds, class_idx, batch_size, overwrite, opts, **run_mode)
    given = [f"--{k}" for k, v in run_mode.items() if v not in (None, False)]
    if given:
        raise click.UsageError(f"{', '.join(given)} select(s) checkpoints of the run directory --outdir (the PFGM++ "
                               "reference's way); with --network, give the one file to sample instead")
    modes = [name for name, value in (("--encode", encode), ("--interpolate", interpolate), ("--temperature", temperature)) if value]
    if len(modes) > 1:
        raise click.UsageError(f"{' and '.join(modes)} cannot be combined: run them one at a time")
    if (interpolate or temperature) and grid is None:
        raise click.UsageError(f"{modes[0]} writes one PNG grid: give --grid")
    if encode and outdir is None:
        raise click.UsageError("--encode writes one latent per image: give --outdir")
    if outdir is None and grid is None:
        raise click.UsageError("give --outdir (one PNG per seed) and/or --grid (one PNG)")
    settings = settings_from_options(opts)
    with user_errors():
        device = distributed.init()
    outdir = None if outdir is None else Path(outdir)
    paths = [] if outdir is None or modes else (image_path(outdir, seed, subdirs) for seed in seeds)
    with user_errors():  # rank 0 looks; every rank stops with its message
        distributed.main_only(lambda: check_outputs(outdir, grid, paths, overwrite))
    net = load(network, device, opts, class_idx)
    with user_errors():
        settings.check(net)  # the solver's plan for this network, before any image
    work = modes[0] if modes and not temperature else f"{len(seeds)} images"
    name = repr(net) if isinstance(net, Guided) else type(net).__name__
    distributed.print0(f"{name}, D={format_D(net.D)}: "
                       f"{work} on {distributed.get_world_size()} rank(s)")
    if modes:
        with user_errors(), configure_precision(opts["precision"], device, generation.SAMPLING_PRECISIONS):
            _latent_mode(net, device, settings, class_idx, seeds, batch_size, grid, outdir, encode, latent_format,
                         interpolate, frames, temperature, overwrite)
        distributed.print0("done")
        distributed.shutdown()
        return
    with user_errors():
        tiles = _generate(net, seeds, batch_size, device, settings, class_idx, opts["precision"], outdir, subdirs, grid)
    if grid is not None:
        tiles = distributed.assemble(tiles, range(len(tiles)), len(tiles))
        if distributed.is_main():
            images.save_png(grid, images.grid(tiles.cpu().numpy()))
    distributed.print0("done")
    distributed.shutdown()


def _run_directory(outdir, seeds, class_idx, batch_size, overwrite, opts, ckpt, end_ckpt, use_pickle, edm,
                   save_images) -> None:
    """The PFGM++ reference's generate.py: every checkpoint of the run directory --outdir (module docstring)."""
    if outdir is None:
        raise click.UsageError("give --network (a snapshot or checkpoint), or --outdir=RUN_DIR to sample every "
                               "training state of that run as the PFGM++ reference does")
    settings = settings_from_options(opts)
    with user_errors():
        device = distributed.init()
    first, last = ckpt or 0, reference.LAST_KIMG if end_ckpt is None else end_ckpt
    states = reference.checkpoints(outdir, use_pickle, first, last, every=edm)
    if not states:
        kind = "training-state-*.pkl" if use_pickle else "training-state-*.pt"
        raise click.ClickException(f"--outdir={outdir} holds no {kind} with kimg in [{first}, {last}]: give --network, "
                                   "or the run directory and --ckpt/--end_ckpt of its checkpoints")
    for kimg, path in states:
        net = load(str(path), device, opts, class_idx)
        with user_errors():
            settings.check(net)
        if save_images:
            target = Path(outdir) / f"ode_images_{kimg}.png"
            with user_errors():
                distributed.main_only(lambda target=target: util.check_output(target, "--save_images", overwrite))
                tiles = _generate(net, seeds[:batch_size], batch_size, device, settings, class_idx, opts["precision"],
                                  None, False, target)
            tiles = distributed.assemble(tiles, range(len(tiles)), len(tiles))
            if distributed.is_main():
                images.save_png(target, images.grid(tiles.cpu().numpy()))
            distributed.print0(f"{path.name}: a grid of {len(tiles)} images in {target}")
            continue
        folder = reference.image_folder(outdir, kimg, seeds)
        if folder.exists() and not overwrite:
            distributed.print0(f"{path.name}: {folder} exists, skipped (--overwrite to sample it again)")
            continue
        distributed.print0(f"{path.name}: {len(seeds)} images into {folder}")
        with user_errors():
            distributed.main_only(lambda folder=folder: check_outputs(folder, None, [], True))
            _generate(net, seeds, batch_size, device, settings, class_idx, opts["precision"], folder, True, None)
    distributed.print0("done")
    distributed.shutdown()


def _floats(text: str | None) -> list[float] | None:
    """'0.8,1,1.2' -> [0.8, 1.0, 1.2], each finite and > 0."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise click.BadParameter(f"temperatures must be finite numbers > 0, got {text!r}")
    return values


def _latent_mode(net, device, settings, class_idx, seeds, batch_size, grid, outdir, encode, latent_format,
                 interpolate, frames, temperature, overwrite) -> None:
    """--encode, --interpolate or --temperature (training/latents.py); grids are written by rank 0."""
    from training.datasets import ImageFolderDataset
    from training.generation import latents

    if encode:
        dataset = ImageFolderDataset(encode, use_labels=bool(net.label_dim))
        generation.check_image_shape(net, dataset.image_shape, encode)
        latent_paths = (outdir / f"{i:06d}.{latent_format}" for i in range(len(dataset)))
        distributed.main_only(lambda: check_outputs(outdir, None, latent_paths, overwrite))
        result = latents.encode_dataset(net, dataset, batch_size, device, outdir, latent_format,
                                        settings.options.get("sigma_min"), settings.options.get("sigma_max"),
                                        progress=True, keep=64 if grid else 0)
        distributed.print0(f"encoded {result['num_images']} images into {outdir}; decoded back: "
                           f"{result['exact_images']} exact in 8 bits, largest error {result['max_error_levels']:.2e} levels")
        if grid and distributed.is_main() and result["pairs"] is not None:
            inputs, decoded = result["pairs"]
            images.save_png(grid, images.grid(torch.cat([inputs, decoded]).cpu().numpy(), cols=len(inputs)))
        return
    if not distributed.is_main():
        return
    if interpolate:
        ends = interpolate.split(",")
        if len(ends) != 2:
            raise ValueError(f"--interpolate takes two seeds or latent files A,B; got {interpolate!r}")
        (a, label), (b, _) = (latents.endpoint(net, e, device, settings, class_idx) for e in ends)
        images.save_png(grid, latents.interpolation_grid(net, a, b, frames, device, settings, label))
    else:
        images.save_png(grid, latents.temperature_grid(net, seeds, temperature, device, settings, class_idx))


def _save(path: Path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    images.save_png(path, images.picture(image))


def _generate(net, seeds, batch_size, device, settings, class_idx, precision, outdir, subdirs, grid) -> torch.Tensor | None:
    """Sample this rank's share, writing PNGs; return the grid's tiles known to this rank (zeros elsewhere).

    PNGs are encoded and written by a few threads while the device samples the next batch.
    """
    shape = [net.img_resolution, net.img_resolution, net.img_channels]
    tiles = torch.zeros([len(seeds), *shape], dtype=torch.uint8, device=device) if grid is not None else None
    nfe = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = []
        for batch in generation.generate(net, seeds, batch_size, device, settings, class_idx, precision, progress=True):
            nfe.append(batch.nfe)
            if tiles is not None:
                tiles[batch.indices] = batch.images
            if outdir is not None:
                for future in pending:  # at most one batch in flight; surfaces write errors early
                    future.result()
                pending = [pool.submit(_save, image_path(outdir, seed, subdirs), image)
                           for seed, image in zip(batch.seeds, batch.images.cpu().numpy())]
        for future in pending:
            future.result()
    if nfe:
        distributed.print0(f"{settings.solver}: {sum(nfe) / len(nfe):g} network evaluations per batch (rank 0)")
    return tiles


if __name__ == "__main__":
    main()
