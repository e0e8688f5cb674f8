"""Build a training dataset (uncompressed ZIP or folder of PNGs + dataset.json) from common sources.

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py --source=downloads/ffhq/images1024x1024 --dest=datasets/ffhq-64x64.zip --resolution=64x64
    python dataset_tool.py --source=.../ILSVRC/Data/CLS-LOC/train --dest=datasets/imagenet-64x64.zip \\
        --resolution=64x64 --transform=center-crop --labels-from-folders
    python dataset_tool.py --source=embedded:shapes --dest=datasets/shapes-32x32.zip

See docs/datasets.md for every source, the format and what each error means.
"""

from __future__ import annotations

from typing import Any

import click

from training.cli import exit_on_signals, user_errors
from training.datasets import CHANNELS, TRANSFORMS, convert_dataset, open_source, parse_resolution, validate_options


class _Resolution(click.ParamType):
    """--resolution=WxH."""

    name = "WxH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_resolution(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def build_options(**cli: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split the CLI's values: open_source() kwargs, output options (checked first), the rest of convert_dataset()'s."""
    open_kwargs = dict(labels_from_folders=cli.pop("labels_from_folders"))
    run_kwargs = dict(skip_bad=cli.pop("skip_bad"), progress=True)
    return open_kwargs, cli, run_kwargs


_SOURCE_HELP = "Image folder, ZIP, cifar-10-python.tar.gz, train-images-idx3-ubyte(.gz), LSUN LMDB, embedded:shapes"


@click.command(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=110))
@click.option("--source", required=True, metavar="PATH", help=_SOURCE_HELP)
@click.option("--dest", required=True, metavar="PATH", help="Output: a .zip file, or a folder")
@click.option("--max-images", "max_images", type=click.IntRange(min=1), metavar="INT", help="Write at most this many")
@click.option("--resolution", type=_Resolution(), help="Resize to WxH (Lanczos), e.g. 64x64")
@click.option(
    "--transform",
    type=click.Choice(TRANSFORMS),
    help="Crop before resizing, or pad (needs --resolution)",
)
@click.option(
    "--channels",
    type=click.Choice(CHANNELS),
    default="keep",
    show_default=True,
    help="Keep grayscale/RGB as stored (all must agree), or convert every image",
)
@click.option(
    "--labels-from-folders",
    "labels_from_folders",
    is_flag=True,
    help="Label images by top-level subfolder (sorted names -> 0, 1, ...)",
)
@click.option("--skip-bad", "skip_bad", is_flag=True, help="Skip unreadable images (counted) instead of stopping")
@click.option("--overwrite", is_flag=True, help="Replace --dest if it exists")
def main(source: str, dest: str, **cli: Any) -> None:
    """Convert --source into a dataset for train.py and fid.py (EDM's format).

    The kind of --source is recognised from its content. Images are streamed, so memory stays small
    for any number of them; the output appears at --dest only when it is complete, and what an
    interrupted run left beside --dest is cleared.
    """
    open_kwargs, output_kwargs, run_kwargs = build_options(**cli)
    with exit_on_signals(), user_errors():  # SIGTERM/SIGHUP: the writer removes its temporary, then exit 128+N
        validate_options(dest, **output_kwargs)  # fail fast, before listing a large source
        opened = open_source(source, **open_kwargs)
        summary = convert_dataset(opened, dest, **output_kwargs, **run_kwargs)
    click.echo(summary.describe())


if __name__ == "__main__":
    main()
