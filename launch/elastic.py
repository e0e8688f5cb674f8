"""torchrun that ends a preempted job cleanly: what launch/torchrun.sh runs unless TORCHRUN says otherwise.

    python launch/elastic.py [torchrun options] train.py [train.py options]

A SIGTERM to the whole job (SLURM's preemption, `scancel --signal=TERM`) reaches torchrun's agent and every
worker. torchrun's agent answers with an error exit even when every worker saved its state and exited 0, so the
job looks failed. Here torchrun's agent runs in a thread, where torch installs no signal handlers; this process
passes SIGTERM, SIGINT, SIGHUP and SIGUSR1 on to the workers and waits for them, and its exit status is the
agent's: 0 when every worker ended cleanly. A third signal kills the workers (a hung one would keep the job).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback

import psutil
from torch.distributed import run

FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1") if hasattr(signal, name))
KILL_AFTER = 3  # signals: the third one kills the workers


def _workers() -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process().children(recursive=False)
    return []


def main(argv: list[str]) -> int:
    """Run torchrun's agent on `argv` in a thread; pass signals on to its workers; the agent's exit status."""
    outcome = {"code": 1}

    def agent() -> None:
        try:
            run.main(argv)
            outcome["code"] = 0
        except SystemExit as error:  # argparse (--help, a bad option)
            outcome["code"] = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        except BaseException:  # noqa: BLE001 (a failed job: printed as torchrun prints it)
            traceback.print_exc()

    received: list[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        kill = len(received) >= KILL_AFTER
        for worker in _workers():
            with contextlib.suppress(psutil.Error):
                if kill:
                    worker.kill()
                else:
                    worker.send_signal(signum)
        print(f"launch/elastic.py: {'killed the' if kill else f'passed signal {signum} to the'} workers", file=sys.stderr,
              flush=True)

    for number in FORWARDED:
        signal.signal(number, forward)
    thread = threading.Thread(target=agent, name="torchrun-agent", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
