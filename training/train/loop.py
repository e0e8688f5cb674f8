"""The training loop, read top to bottom: set up, resume, then loop: report, snapshot, stop, step, EMA.

The loop knows no formulation: the loss (training/losses) draws its random parts, computes the per-element loss
and says whether it needs a reference batch; the preconditioner and the network come from the configuration
(`setup.build_denoiser`). Everything random in a step is a function of (seed, step), so a run does not depend on
how it is split over ranks or rounds of --batch-gpu (training/train/step.py), and a run resumed from a training
state at step s repeats the uninterrupted run bitwise on the same hardware.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from dnnlib import util
from torch_utils import distributed
from training import checkpoint
from training.checkpoint.formats import kimg_label
from training.train import data, setup, snapshot
from training.train.config import metrics_sampler
from training.train.ema import Averages
from training.train.report import Reporter
from training.train.stats import Diverged, TickStats, divergence
from training.train.step import TrainStep, optimizer
from training.train.stop import StopFlag, StopVote


def training_loop(c: dict, run_dir: str | os.PathLike, dataset, loss_fn, augment_pipe=None,
                  resume: str | os.PathLike | None = None) -> dict:
    """Train until --duration or a stop signal; returns the last tick's statistics."""
    # Set up.
    log = logging.getLogger("pfgmpp.train")
    run_dir = Path(run_dir)
    device = distributed.init()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    if distributed.is_main():
        for leftover in setup.stale_outputs(run_dir):
            util.remove(leftover)
            log.info(f"removed {leftover.name}, left by a writer that was killed")
    setup.set_precision(c, device)
    net = setup.build_denoiser(c, dataset, device)
    if c.get("transfer"):
        setup.transfer_weights(c["transfer"], net)
    averages = Averages(net, c["ema"], c["ema_std"], c["batch"])
    opt = optimizer(c, net, device)
    ddp = setup.distributed_model(net, c, device)
    step, nimg, tick = 0, 0, 0
    written = None  # the images seen when the run last wrote outputs: they name the next ones (`kimg_label`)

    # Resume.
    if resume is not None:
        state = checkpoint.read_state(resume)
        net.load_state_dict(state["net"])
        averages.load(state["ema"], state.get("phema"), str(resume))
        opt.load_state_dict(state["optimizer"])
        step, nimg = int(state["step"]), int(state["nimg"])
        written = nimg  # the state is one of that tick's outputs
        tick = distributed.broadcast_object(setup.rewind_stats(run_dir, step) if distributed.is_main() else None)
        if distributed.is_main():
            log.info(f"resumed from {resume} at kimg {nimg / 1000:.3f} (step {step})")

    if c["metrics"]:  # a sampler plan the network refuses would otherwise end the run at its first snapshot
        metrics_sampler(c).check(net)
    metrics_setup = snapshot.open_metrics(c, device) if c["metrics"] else None
    batches = data.training_batches(dataset, c, step, device)
    references = data.reference_batches(dataset, c, step, device) if loss_fn.needs_reference else None
    stats = TickStats(device)
    train_step = TrainStep(c, net, ddp, opt, loss_fn, augment_pipe, dataset, stats, rank, world, device)
    reporter = Reporter(c, run_dir, stats, loss_fn, device, log)
    total_nimg = int(c["duration"] * 1000 * 1000)
    tick_start, last = (nimg, time.time()), {}
    flag = StopFlag()
    vote = StopVote(flag, device)
    # A collective that fails because a rank died or hangs becomes an error naming that rank (after StopFlag has
    # given SIGTERM back, so torchrun can stop this process while it reports).
    with distributed.diagnose_failures(lambda: f"at step {step}", lambda: flag.signal is None), flag, \
            contextlib.closing(reporter):
        while True:
            done = nimg >= total_nimg
            stop = not done and vote(step)
            tick_end = nimg >= tick_start[0] + c["tick"] * 1000
            if done or stop or (tick_end and nimg > tick_start[0]):
                # Report (every rank reduces the statistics; rank 0 writes them).
                if nimg > tick_start[0]:
                    last = reporter.tick(tick, step, nimg, tick_start)
                    tick += 1
                    seen = divergence(last)  # every rank holds the same reduced statistics: they stop together
                    if seen is not None:
                        raise Diverged(_diverged_message(run_dir, seen, last))

                # Snapshot: the averages and a sample grid, a training state every --dump ticks, the metrics.
                snap = done or bool(c["snap"] and tick % c["snap"] == 0)
                dump = done or stop or bool(c["dump"] and tick % c["dump"] == 0)
                label = kimg_label(nimg, written)  # this tick's outputs' name: never one an earlier output has
                if distributed.is_main():
                    if snap:
                        snapshot.save_snapshots(c, run_dir, averages, dataset, step, nimg, label, device)
                    if dump:
                        path = _save_state(c, run_dir, net, averages, opt, step, nimg, label)
                        if stop:
                            log.info(f"received signal {flag.signal}: wrote {path.name}; resume with --resume=auto")
                written = nimg if snap or dump else written
                distributed.barrier()
                if snap and metrics_setup is not None:
                    snapshot.evaluate_metrics(c, run_dir, averages, metrics_setup, step, nimg, label, device, log)

                # Stop.
                if done or stop:
                    break
                tick_start = (nimg, time.time())

            # Step: the loss of global batch `step` over this rank's rounds, then the optimizer.
            reference = None
            if references is not None:
                reference = data.reference_batch(references, loss_fn, train_step.reference_augment(step), device)
            train_step(step, nimg, batches, reference)
            nimg += c["batch"]
            step += 1

            # EMA.
            averages.update(net, nimg)
    return last


def _save_state(c: dict, run_dir: Path, net, averages: Averages, opt, step: int, nimg: int, label: str) -> Path:
    """Rank 0: write training-state-LABEL.pt; the previous states stay intact on failure."""
    path = run_dir / checkpoint.state_name(label)
    try:
        checkpoint.write_state(path, net=net, ema=averages.reader, optimizer=opt, step=step, nimg=nimg, config=c,
                               phema=averages.phema_state())
    except OSError as error:
        raise OSError(f"could not write {path} ({error}); earlier states in {run_dir} are intact") from None
    return path


def _diverged_message(run_dir: Path, seen: str, stats: dict) -> str:
    """What a diverged run says: what was seen, that nothing of the tick was written, and where to go on from."""
    head = f"training diverged at kimg {stats['kimg']:.3f} (step {stats['step']}): {seen}."
    if not distributed.is_main():
        return f"{head} Rank 0 says which training state to start again from"
    state = checkpoint.find_resume_state(run_dir)
    change = "a lower --lr, a longer --lr_rampup or --precision=fp32"
    where = (f"the last training state is {state.name}: start a new run from its weights with --transfer={state} and "
             f"{change}" if state is not None else f"no training state was written before it: start again with {change}")
    return f"{head} Nothing of this tick was written (its statistics are in stats.jsonl); {where}"
