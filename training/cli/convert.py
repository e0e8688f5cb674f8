"""pfgmpp-convert: any supported checkpoint (ours, EDM's or the PFGM++ reference's .pkl / .pt, path or URL) to a
safe snapshot that loads without executing code.

    pfgmpp-convert edm-cifar10-32x32-uncond-vp.pkl cifar10-vp.pt
"""

from __future__ import annotations

import click

from training.checkpoint import load_network, save_network
from training.cli import user_errors


@click.command()
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--entry", type=click.Choice(["ema", "net"]), default=None, help="Network of a training state [default: ema if present].")
def main(source: str, dest: str, entry: str | None) -> None:
    """Convert SOURCE (a snapshot, EDM or PFGM++ .pkl/.pt, path or URL) to a safe snapshot DEST."""
    with user_errors():
        net = load_network(source, entry=entry)
        save_network(dest, net, provenance=net.provenance)
    click.echo(f"wrote {dest}: {type(net).__name__}({type(net.model).__name__}), D={net.D}, "
               f"{sum(p.numel() for p in net.parameters()):,} parameters")


if __name__ == "__main__":
    main()
