"""pfgmpp-plot: a training run's statistics and metrics as one PNG (training/train/plot.py).

    pfgmpp-plot training-runs/00000-cifar10-uncond-song-edm-D128-gpus8-batch512-tf32
    pfgmpp-plot RUN_DIR --out=run.png --overwrite
"""

from __future__ import annotations

from pathlib import Path

import click

from dnnlib import util
from training.cli import user_errors


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", help="The PNG to write [default: RUN_DIR/stats.png]", metavar="PNG", type=click.Path(dir_okay=False))
@click.option("--overwrite", help="Replace --out if it exists", is_flag=True)
def main(run_dir: str, out: str | None, overwrite: bool) -> None:
    """Plot a run's stats.jsonl (loss overall and per sigma bucket, learning rate, gradient norm, img/s) and its
    metric-*.jsonl against kimg."""
    from training.train.plot import plot_run

    out = out or str(Path(run_dir) / "stats.png")
    with user_errors():
        util.check_output(out, "--out", overwrite)
        click.echo(f"wrote {plot_run(run_dir, out)}")


if __name__ == "__main__":
    main()
