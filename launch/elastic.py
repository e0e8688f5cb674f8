"""torchrun that ends a preempted job cleanly: what launch/torchrun.sh runs unless TORCHRUN says otherwise.

    python launch/elastic.py [torchrun options] train.py [train.py options]

A SIGTERM to the whole job (SLURM's preemption, `scancel --signal=TERM`) reaches torchrun's agent and every
worker. torchrun's agent answers with an error exit even when every worker saved its state and exited 0, so the
job looks failed. Here torchrun's agent runs in a thread, where torch installs no signal handlers; this process
passes SIGTERM, SIGINT, SIGHUP and SIGUSR1 on to the workers and waits for them, and its exit status is the
agent's: 0 when every worker ended cleanly. A third signal kills the workers (a hung one would keep the job).
When workers fail (a user error such as a missing --data, or a crash), each has printed its own error: this
process adds one line naming the first failure and exits with its status, instead of torchrun's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import traceback

import psutil
from torch.distributed import run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1") if hasattr(signal, name))
KILL_AFTER = 3  # signals: the third one kills the workers


def _workers() -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process().children(recursive=False)
    return []


def failure_summary(error: ChildFailedError) -> tuple[str, int]:
    """(one line naming the first failed worker and how it ended, this process's exit status) for a failed job."""
    rank, failure = error.get_first_failure()
    code = int(failure.exitcode)
    how = f"exit status {code}" if code > 0 else f"killed by {failure.signal_name()}"
    others = len(error.failures) - 1
    line = (f"launch/elastic.py: {error.name.rsplit('/', 1)[-1]} failed: rank {rank} (local rank {failure.local_rank}, "
            f"pid {failure.pid}) ended with {how}{f' and {others} other worker(s) failed' if others else ''}; "
            "its error is printed above")
    return line, code if code > 0 else 128 - code


class _ThreadWarning(logging.Filter):
    """Drops torch's warning that it installs no signal handlers in a thread: this process handles them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "signal handlers" not in record.getMessage()


def main(argv: list[str]) -> int:
    """Run torchrun's agent on `argv` in a thread; pass signals on to its workers; the agent's exit status."""
    outcome = {"code": 1}

    def agent() -> None:
        try:
            run.main(argv)
            outcome["code"] = 0
        except SystemExit as error:  # argparse (--help, a bad option)
            outcome["code"] = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        except ChildFailedError as error:
            line, outcome["code"] = failure_summary(error)
            print(line, file=sys.stderr, flush=True)
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
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_ThreadWarning())
    thread = threading.Thread(target=agent, name="torchrun-agent", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    return outcome["code"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
