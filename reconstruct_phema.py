"""Post-hoc EMA: reconstruct power-function EMA profiles from a run's snapshots (EDM2, section 3.2).

    python reconstruct_phema.py --indir=training-runs/00000-cifar10 --outdir=phema --outstd=0.150
    python reconstruct_phema.py --indir=RUN --outdir=phema --outstd=0.010,0.015,...,0.250 --batch=8

Reads the run's network-snapshot-NNNNNN-S.SSS.pt files (the tracked profiles, written by a run that tracks
power-function EMA), or EDM2's network-snapshot-NNNNNNN-S.SSS.pkl files (through the allow-listed unpickler: nothing
in them runs), solves for the combination of those up to --outkimg that best gives each wanted sigma_rel there, at
each snapshot's exact training time where it records one (ours do; EDM2's names tell kimg), and writes
OUTPREFIX-NNNNNN-S.SSS.pt in the safe snapshot format. The math is in training/phema.py;
docs/phema.md has the choice of snapshots and the measured accuracy.
"""

from __future__ import annotations

from pathlib import Path

import click

from dnnlib import util
from training import checkpoint, phema
from training.cli import exit_on_signals, user_errors


def sigma_rel_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[float] | None:
    """--outstd: comma-separated sigma_rel values, '...' for an evenly spaced run (as EDM2)."""
    if value is None:
        return None
    try:
        return phema.expand_sigma_rel_list(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


def outputs(outdir: Path, prefix: str, kimg: int, sigma_rels: list[float], inputs: list[Path], skip: bool,
            overwrite: bool) -> dict[float, Path]:
    """sigma_rel -> output file, after --skip; each checked writable (an existing one only with --overwrite)."""
    paths = {s: outdir / phema.snapshot_name(kimg, s, prefix) for s in sigma_rels}
    if len(set(paths.values())) < len(paths):
        raise ValueError("--outstd has values equal to three decimals; output names hold three, give distinct ones")
    if skip:
        for s, path in list(paths.items()):
            if path.exists():
                click.echo(f"skipping {path}: it exists")
                del paths[s]
    clash = sorted({p.resolve() for p in paths.values()} & {p.resolve() for p in inputs})
    if clash:
        raise ValueError(f"{clash[0]} is an input snapshot; choose another --outprefix or --outdir")
    outdir.mkdir(parents=True, exist_ok=True)
    for path in paths.values():
        util.check_output(path, "--outdir", overwrite)
    return paths


def report(plan: phema.Reconstruction) -> None:
    """Which snapshots the reconstruction combines, and how well each wanted profile is fitted."""
    times: dict[int, list[str]] = {}
    for s in plan.snapshots:
        times.setdefault(s.kimg, []).append(f"{s.sigma_rel:.3f}")
    click.echo(f"Combining {len(plan.snapshots)} snapshots at {len(times)} times up to kimg {plan.kimg} "
               f"({plan.t * 1000:.0f} images):")
    for kimg, profiles in times.items():
        click.echo(f"    kimg {kimg:06d}: sigma_rel {', '.join(profiles)}")
    for s, residual in zip(plan.sigma_rel, plan.residual):
        click.echo(f"sigma_rel {s:.3f} at kimg {plan.kimg}: relative residual of the profile fit {residual:.2e}")
        if residual > phema.FIT_WARNING:
            click.echo(f"warning: sigma_rel {s:.3f} is fitted poorly (relative residual {residual:.2f} > "
                       f"{phema.FIT_WARNING}): too few snapshots for this profile; save them more often "
                       "(docs/phema.md)", err=True)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--indir", help="Run directory holding the network-snapshot-NNNNNN-S.SSS.pt files (or EDM2's .pkl)", metavar="DIR",
              type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--outdir", help="Where to write the reconstructed snapshots", metavar="DIR",
              type=click.Path(file_okay=False), required=True)
@click.option("--outstd", help="sigma_rel values to reconstruct, e.g. 0.1,0.15 or 0.010,0.015,...,0.250",
              metavar="LIST", callback=sigma_rel_list, required=True)
@click.option("--outkimg", help="Training time to reconstruct at (a snapshot's)  [default: the latest]",
              metavar="KIMG", type=click.IntRange(min=0))
@click.option("--outprefix", help="Output file name prefix", metavar="STR", type=str, default="phema", show_default=True)
@click.option("--skip", help="Skip outputs that already exist", is_flag=True)
@click.option("--batch", help="Outputs reconstructed per pass over the snapshots (held in memory)", metavar="INT",
              type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--overwrite", help="Replace outputs that already exist", is_flag=True)
def main(indir: str, outdir: str, outstd: list[float], outkimg: int | None, outprefix: str, skip: bool, batch: int,
         overwrite: bool) -> None:
    """Reconstruct power-function EMA profiles of a training run after the fact (EDM2's post-hoc EMA)."""
    if skip and overwrite:
        raise click.UsageError("--skip keeps existing outputs and --overwrite replaces them; give one of them")
    with exit_on_signals(), user_errors():
        snapshots = phema.find_snapshots(indir)
        kimg, _ = phema.output_time(snapshots, outkimg)
        paths = outputs(Path(outdir), outprefix, kimg, outstd, [s.path for s in snapshots], skip, overwrite)
        if not paths:
            click.echo("Nothing to do: every output exists.")
            return
        plan = phema.plan_reconstruction(snapshots, list(paths), kimg)
        report(plan)
        for j, net in phema.reconstruct(plan, batch):
            path = paths[plan.sigma_rel[j]]
            checkpoint.save_network(path, net, plan.provenance(j))
            click.echo(f"Wrote {path}")


if __name__ == "__main__":
    main()
