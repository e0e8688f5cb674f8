"""TEST-ONLY: train.py with one fault injected, for the fault-injection tests in tests/test_launch.py.

Run it wherever train.py would run (`python tests/fault_injection.py ARGS`, or as torchrun's script);
without PFGMPP_FAULT it is train.py. The library holds no hooks: the faults are monkeypatches made here.

    PFGMPP_FAULT=KIND:N[:RANK]    (RANK defaults to 0; only in the first attempt of a torchrun job)

    die-at-step        SIGKILL this worker just before step N
    hang-at-step       this worker hangs just before step N (sleeps forever, its sockets open)
    sigterm-job-at-step  before step N, SIGTERM the whole job: the torchrun agent and every worker
    kill-in-state-write  the N-th training state is written halfway, then this worker is SIGKILLed
    erofs-in-state-write the N-th state write fails as on a read-only filesystem (errno EROFS)
    chmod-in-state-write the run directory is made read-only (mode 555) just before the N-th state write

Every worker prints `EXIT rank R attempt A code C` when train.py returns or raises SystemExit.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402
from training import checkpoint  # noqa: E402
from training.train.step import TrainStep  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _say(message: str) -> None:
    print(f"FAULT rank {RANK}: {message}", flush=True)


def _signal_job(signum: int) -> None:
    """`signum` to torchrun (this worker's parent) and to every worker it started, this one last."""
    agent = psutil.Process(os.getppid())
    targets = [agent, *(p for p in agent.children() if p.pid != os.getpid())]
    for process in targets:
        process.send_signal(signum)
    os.kill(os.getpid(), signum)


def _at_step(kind: str, n: int) -> None:
    original = TrainStep.__call__

    def train_step(self, step, *args, **kwargs):
        if step == n:
            _say(f"{kind} at step {n}")
            if kind == "die-at-step":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "hang-at-step":  # stuck in user code, its sockets open; SIGTERM ends it as usual
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                while True:
                    time.sleep(1)
            else:
                _signal_job(signal.SIGTERM)
        return original(self, step, *args, **kwargs)

    TrainStep.__call__ = train_step


def _in_state_write(kind: str, n: int) -> None:
    original, count = checkpoint.write_state, [0]
    real_save = torch.save

    def half_then_die(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        _say(f"killed while writing {f.name}")
        os.kill(os.getpid(), signal.SIGKILL)

    def write_state(path, *args, **kwargs):
        count[0] += 1
        if count[0] != n:
            return original(path, *args, **kwargs)
        _say(f"{kind} in state write {n} ({Path(path).name})")
        if kind == "erofs-in-state-write":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(Path(path).parent))
        if kind == "chmod-in-state-write":
            Path(path).parent.chmod(0o555)
            return original(path, *args, **kwargs)
        torch.save = half_then_die
        try:
            return original(path, *args, **kwargs)
        finally:
            torch.save = real_save

    checkpoint.write_state = write_state  # the loop calls checkpoint.write_state


def install(spec: str) -> None:
    """Arm the fault described by PFGMPP_FAULT on the rank it names, in the first attempt only."""
    kind, n, *rank = spec.split(":")
    if ATTEMPT != 0 or RANK != int(rank[0] if rank else 0):
        return
    if kind.endswith("-at-step"):
        _at_step(kind, int(n))
    elif kind.endswith("-in-state-write"):
        _in_state_write(kind, int(n))
    else:
        raise SystemExit(f"PFGMPP_FAULT={spec}: unknown fault {kind!r}")


if __name__ == "__main__":
    if os.environ.get("PFGMPP_FAULT"):
        install(os.environ["PFGMPP_FAULT"])
    code = 1  # an exception other than SystemExit
    try:
        train.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        raise
    finally:
        print(f"EXIT rank {RANK} attempt {ATTEMPT} code {code}", flush=True)
