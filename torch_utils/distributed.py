"""The one module that talks to torch.distributed.

Every helper works without initialisation (a plain `python script.py` is world size 1), so library
code never has to ask whether it runs under torchrun.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import socket
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 600.0  # torch's default for NCCL; a state write or a sample grid on rank 0 must fit in it
_group = {"store": None, "timeout_s": DEFAULT_TIMEOUT_S}  # the rendezvous store and timeout of this process's group


def launched_by_torchrun() -> bool:
    """True when the environment carries torchrun's rendezvous variables."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def restart_count() -> int:
    """How many times torchrun restarted this job's workers (TORCHELASTIC_RESTART_COUNT); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group described by torchrun's environment; return this rank's device.

    NCCL when CUDA is available, gloo otherwise (CPU runs and tests). Without torchrun's variables
    this is a single-process run and nothing is initialised. Calling it twice is harmless. Every
    collective that waits longer than `timeout_s` for another rank fails (see `failure`).
    """
    if not timeout_s > 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s}")
    if torch.cuda.is_available():
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"local rank {local_rank} has no GPU of its own: {count} visible on {socket.gethostname()}; "
                             "start at most one process per GPU (--nproc_per_node / NPROC_PER_NODE), and do not "
                             "limit CUDA_VISIBLE_DEVICES per process")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if dist.is_available() and not dist.is_initialized() and launched_by_torchrun():
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's agent keeps its store across elastic restarts: without a prefix per attempt, a
            # restarted group reads the previous attempt's peer addresses (gloo: "connectFullMesh failed").
            store = dist.PrefixStore(f"attempt-{restart_count()}", store)
        bound = {"device_id": device} if backend == "nccl" and _takes_device_id() else {}  # NCCL set up at once
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout, **bound)
        ours = dist.PrefixStore("pfgmpp", store)
        ours.set(f"where/{rank}", _where(rank))
        _group.update(store=ours, timeout_s=timeout_s)
        if device.type == "cuda":
            _check_own_gpu(ours, device)
    return device


def _takes_device_id() -> bool:
    return "device_id" in inspect.signature(dist.init_process_group).parameters


def shared_devices(devices: dict[int, str]) -> list[list[int]]:
    """The groups of local ranks that name the same device in `devices` {local rank: device id}."""
    by_device: dict[str, list[int]] = {}
    for local_rank, device in sorted(devices.items()):
        by_device.setdefault(device, []).append(local_rank)
    return [ranks for ranks in by_device.values() if len(ranks) > 1]


def _check_own_gpu(store, device: torch.device) -> None:
    """ValueError when ranks of this node share a GPU (NCCL would fail later with a cryptic message)."""
    node, local_rank = os.environ.get("GROUP_RANK", "0"), int(os.environ.get("LOCAL_RANK", "0"))
    properties = torch.cuda.get_device_properties(device)
    identity = str(getattr(properties, "uuid", f"{properties.name} #{device.index}"))
    store.set(f"gpu/{node}/{local_rank}", identity)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    devices = {i: store.get(f"gpu/{node}/{i}").decode() for i in range(local_world)}
    shared = shared_devices(devices)
    if shared:
        groups = "; ".join(f"local ranks {', '.join(map(str, g))} on {devices[g[0]]}" for g in shared)
        raise ValueError(f"ranks share a GPU on {socket.gethostname()} ({groups}): give each process its own GPU "
                         "(NPROC_PER_NODE at most the number of GPUs, CUDA_VISIBLE_DEVICES the same for all)")


def _where(rank: int) -> str:
    local = os.environ.get("LOCAL_RANK", "0")
    return f"rank {rank} (host {socket.gethostname()}, local rank {local}, pid {os.getpid()})"


def is_initialized() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank; 0 without a process group."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks; 1 without a process group."""
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Rank within this node (torchrun's LOCAL_RANK); 0 without torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the rank that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_initialized():
        dist.barrier()


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place and return it; the identity without a process group."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ----------------------------------------------------------------------------------------------
# A failed or timed-out collective: which ranks are gone, and what to check.

_BACKEND_WORDS = ("gloo", "nccl", "processgroup", "c10d")  # gloo raises plain RuntimeErrors that name it


class DistributedFailure(RuntimeError):
    """A collective failed or timed out because another rank died or hangs; the message names it."""


def is_communication_error(error: BaseException) -> bool:
    """True for errors that a collective raises when a peer rank dies, hangs, or the network fails."""
    if not is_initialized() or not isinstance(error, RuntimeError):
        return False
    return isinstance(error, dist.DistError) or any(w in str(error).lower() for w in _BACKEND_WORDS)


def unresponsive_ranks(wait_s: float) -> list[int] | None:
    """The ranks that do not answer a roll call in the rendezvous store within `wait_s` seconds.

    Called by every rank that saw a collective fail: the healthy ones answer, the dead or hung ones do
    not. None when the store itself does not answer (the node or agent that hosts it failed).
    """
    store, rank = _group["store"], get_rank()
    if store is None:
        raise ValueError("no roll call without a process group made by torch_utils.distributed.init()")
    try:
        store.set_timeout(datetime.timedelta(seconds=max(wait_s, 1.0)))
        store.set(f"roll-call/{rank}", "here")
        missing, deadline = [r for r in range(get_world_size()) if r != rank], time.monotonic() + wait_s
        while True:
            missing = [r for r in missing if not store.check([f"roll-call/{r}"])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.2)
    except RuntimeError:  # DistStoreError / DistNetworkError: the store's host is gone
        return None


def _describe(ranks: list[int]) -> str:
    store, found = _group["store"], []
    for r in ranks:
        try:
            found.append(store.get(f"where/{r}").decode() if store.check([f"where/{r}"]) else f"rank {r}")
        except RuntimeError:
            found.append(f"rank {r}")
    return ", ".join(found)


def failure(error: BaseException, context: str, roll_call_s: float = 60.0) -> DistributedFailure:
    """A DistributedFailure for a failed collective: the ranks that are gone and what to check.

    Holds a roll call of at most min(roll_call_s, timeout) seconds first, so every healthy rank
    should call it (it is what the training loop does on a communication error).
    """
    wait_s = min(roll_call_s, _group["timeout_s"]) if _group["store"] is not None else 0.0
    missing = unresponsive_ranks(wait_s) if wait_s > 0 else []
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    head = f"{_where(get_rank())}: a collective operation failed {context}: {first_line}"
    if wait_s <= 0:
        cause = ("No roll call (this process is being stopped, or its group was not made by distributed.init): "
                 "torchrun's report names the rank that failed first.")
    elif missing is None:
        cause = (f"The rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} does not answer "
                 "either: the process or node that hosts it (torchrun on the first node, or rank 0) failed; check it first.")
    elif missing:
        cause = (f"{_describe(missing)} did not answer a roll call within {wait_s:g} s: "
                 f"{'it died or hangs' if len(missing) == 1 else 'they died or hang'}. Check the first failure torchrun reports "
                 "and that rank's own log; whether its process is alive (py-spy dump --pid PID shows where it "
                 "waits); out-of-memory kills (dmesg, the job's memory limit); its data loader and filesystem.")
    else:
        cause = ("Every rank answered a roll call, so no process died: check the network between the nodes "
                 "(NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, firewalls, NCCL_DEBUG=INFO) and whether all ranks "
                 "run the same code and options.")
    advice = (f"A healthy but slow step (a state write on a slow filesystem, a large sample grid) needs a larger "
              f"process-group timeout (train.py --dist_timeout, now {_group['timeout_s']:g} s). See docs/scaling.md.")
    return DistributedFailure(f"{head}\n{cause}\n{advice}")


@contextlib.contextmanager
def diagnose_failures(context: Callable[[], str], roll_call: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """Turn a failed collective inside the block into a DistributedFailure naming the gone ranks.

    `context()` says where it happened (e.g. "at step 12"). `roll_call()` False skips the roll call
    (this process is being stopped: torchrun stops every rank when one fails and reports that one).
    Other errors pass through unchanged.
    """
    try:
        yield
    except RuntimeError as error:
        if not is_communication_error(error):
            raise
        raise failure(error, context(), roll_call_s=60.0 if roll_call() else 0.0) from error


def shutdown() -> None:
    """Leave the process group, if any."""
    if is_initialized():
        dist.destroy_process_group()
    _group.update(store=None, timeout_s=DEFAULT_TIMEOUT_S)


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (a picklable value such as a path); identity without a group."""
    if not is_initialized():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def assemble(rows: torch.Tensor, positions, count: int) -> torch.Tensor:
    """The [count, ...] tensor whose row positions[i] is this rank's rows[i], filled in by every rank.

    Each position must be owned by exactly one rank. The rows are summed into zeros, which is exact,
    in float64 (integers up to 2^53); the result is returned in rows' dtype on every rank.
    """
    out = torch.zeros([int(count), *rows.shape[1:]], dtype=torch.float64, device=rows.device)
    out[torch.as_tensor(list(positions), dtype=torch.long, device=rows.device)] = rows.to(torch.float64)
    return all_reduce_sum(out).to(rows.dtype)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (the same shape on all ranks) concatenated along dim 0 in rank order.

    The identity without a process group. Not differentiable: for data such as a reference batch.
    """
    if not is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def _on_main(fn: Callable[[], object], share: bool) -> tuple[object, str | None]:
    """fn's result on rank 0 (on every rank with `share`) and rank 0's failure message, on every rank.

    Rank 0 raises its own failure; the others get its message to raise, so nobody waits for a collective.
    """
    failure, result = None, None
    if is_main():
        try:
            result = fn()
        except Exception as error:
            failure = error
    message, shared = broadcast_object((None if failure is None else str(failure), result if share else None))
    if failure is not None:
        raise failure
    return (shared if share else result), message


def main_first(fn: Callable[[], object]):
    """Run fn on rank 0, then on the other ranks (e.g. a download into the shared cache happens once).

    An exception on rank 0 is raised there and reaches the others as a ValueError with its message,
    instead of leaving them waiting.
    """
    if not is_initialized():
        return fn()
    result, message = _on_main(fn, share=False)
    if message is not None:
        raise ValueError(f"rank 0 failed: {message}")
    return result if is_main() else fn()


def rank_batches(count: int, batch_size: int, rank: int | None = None, world: int | None = None) -> list[range]:
    """Positions 0..count-1 in batches of `batch_size`; this rank's batches, taken round robin (no collective)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    starts = range(0, count, batch_size)
    return [range(s, min(s + batch_size, count)) for s in starts][rank::world]


def main_only(fn: Callable[[], object]):
    """Run fn on rank 0 alone and return its result on every rank (it must be picklable).

    An exception on rank 0 is raised there; the other ranks raise a ValueError with its message, so every
    rank stops with the same reason.
    """
    if not is_initialized():
        return fn()
    result, message = _on_main(fn, share=True)
    if message is not None:
        raise ValueError(message)
    return result


def cpus_per_rank() -> int:
    """CPU cores this process may use, shared with the other ranks on its node (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1), 1)


def default_workers(wanted: int) -> int:
    """`wanted` data-loading processes, fewer where this rank has fewer cores (one core stays with the rank)."""
    return max(min(int(wanted), cpus_per_rank() - 1), 0)
