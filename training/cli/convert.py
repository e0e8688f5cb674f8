"""pfgmpp-convert: any supported checkpoint (ours, EDM's or the PFGM++ reference's .pkl / .pt, a training state,
path or URL) to a safe snapshot that loads without executing code: this program's .pt, or .safetensors.

    pfgmpp-convert edm-cifar10-32x32-uncond-vp.pkl cifar10-vp.pt
    pfgmpp-convert network-snapshot-200000.pt network.safetensors    # configuration in the metadata
"""

from __future__ import annotations

import click

from dnnlib.util import check_output
from training.checkpoint import load_network, save_network
from training.cli import exit_on_signals, user_errors


@click.command(context_settings=dict(help_option_names=["-h", "--help"]))
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--entry", type=click.Choice(["ema", "net"]), default=None, help="Network of a training state [default: ema if present].")
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists")
def main(source: str, dest: str, entry: str | None, overwrite: bool) -> None:
    """Convert SOURCE (a snapshot or training state, EDM or PFGM++ .pkl/.pt, path or URL) to a safe snapshot DEST
    (.safetensors: the safetensors format; otherwise this program's .pt)."""
    with user_errors(), exit_on_signals():
        check_output(dest, "DEST", overwrite)
        net = load_network(source, entry=entry)
        save_network(dest, net, provenance=net.provenance)
    click.echo(f"wrote {dest}: {type(net).__name__}({type(net.model).__name__}), D={net.D}, "
               f"{sum(p.numel() for p in net.parameters()):,} parameters")


if __name__ == "__main__":
    main()
