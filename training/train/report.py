"""What a training run reports at each tick: the statistics reduced over ranks, a line of log.txt and of
stats.jsonl, and TensorBoard events beside them when the tensorboard package is installed.

A line of stats.jsonl holds this program's keys (`loss`, `loss_by_sigma`, `kimg`, `lr`, `grad_norm`, ...) and,
beside them, EDM's: `Loss/loss`, `Progress/tick`, `Progress/kimg`, `Timing/total_sec`, `Timing/sec_per_tick`,
`Timing/sec_per_kimg`, `Timing/maintenance_sec`, `Timing/total_hours`, `Timing/total_days`, `Resources/cpu_mem_gb`,
`Resources/peak_gpu_mem_gb`, `Resources/peak_gpu_mem_reserved_gb`, each `{"num", "mean", "std"}` as EDM's
statistics collector writes them (`Loss/loss` over the loss's elements of the tick, the others one value each),
and `timestamp`. It is strict JSON: a value that is not finite is written as null.

With --wandb=PROJECT rank 0 also logs every tick's numbers to Weights & Biases (`train/...`, `loss_by_sigma/...`,
by images seen), in a run whose id follows from the run directory, so a resumed run continues it; its files
go under RUN_DIR/wandb (WANDB_MODE=offline keeps them there, for `wandb sync`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import psutil
import torch

from torch_utils import distributed
from training.train.ema import ema_beta
from training.train.stats import TickStats
from training.train.step import learning_rate


class Reporter:
    """Rank 0 writes; every rank takes part in the reduction of the statistics."""

    def __init__(self, c: dict, run_dir: Path, stats: TickStats, loss_fn, device: torch.device, log: logging.Logger):
        self.c, self.run_dir, self.stats, self.loss_fn, self.device, self.log = c, run_dir, stats, loss_fn, device, log
        self._writer = None if distributed.is_main() else False  # False: no TensorBoard here (none, or not rank 0)
        self._start = time.time()  # EDM's Timing/total_sec counts from the start of this process's loop
        self._last_end: float | None = None  # when the previous tick was reported (its maintenance followed)
        self._wandb = None
        if c.get("wandb") and distributed.is_main():
            self._wandb = open_wandb(c, run_dir)

    def tick(self, tick: int, step: int, nimg: int, start: tuple[int, float]) -> dict:
        """Reduce the tick's statistics over ranks (every rank calls this); rank 0 prints a line and appends stats.jsonl.

        `start` is (images seen, time) when the tick began.
        """
        c = self.c
        stats = self.stats.reduce()
        now = time.time()
        images, seconds = nimg - start[0], now - start[1]
        maintenance = start[1] - self._last_end if self._last_end is not None else 0.0
        self._last_end = now
        cuda = self.device.type == "cuda"
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**30 if cuda else 0.0
        reserved_gpu = torch.cuda.max_memory_reserved(self.device) / 2**30 if cuda else 0.0
        elements = stats.pop("loss_elements")
        stats.update(tick=tick, kimg=nimg / 1000, step=step, lr=learning_rate(c, nimg), sec_per_tick=seconds,
                     sec_per_kimg=seconds / max(images / 1000, 1e-9), img_per_sec=images / max(seconds, 1e-9),
                     peak_gpu_gib=peak_gpu, cpu_rss_gib=psutil.Process().memory_info().rss / 2**30, timestamp=now)
        if c["ema"] > 0 or not c["ema_std"]:  # the classic EMA's decay at the last step
            stats["ema_beta"] = ema_beta(c["ema"] * 1000, c["batch"], nimg - c["batch"])
        extra = self.loss_fn.tick_stats(self.device, stats["steps"])  # what the loss reports besides its value
        stats.update(extra)
        total = now - self._start
        edm = {"Progress/tick": tick, "Progress/kimg": nimg / 1000, "Timing/total_sec": total,
               "Timing/sec_per_tick": seconds, "Timing/sec_per_kimg": stats["sec_per_kimg"],
               "Timing/maintenance_sec": maintenance, "Resources/cpu_mem_gb": stats["cpu_rss_gib"],
               "Resources/peak_gpu_mem_gb": peak_gpu, "Resources/peak_gpu_mem_reserved_gb": reserved_gpu,
               "Timing/total_hours": total / 3600, "Timing/total_days": total / 86400}
        stats.update({"Loss/loss": elements,
                      **{key: {"num": 1, "mean": float(value), "std": 0.0} for key, value in edm.items()}})
        if distributed.is_main():
            self.log.info(f"tick {tick:<5d} kimg {stats['kimg']:<9.3f} loss {stats['loss']:<8.4f} "
                          f"sec/kimg {stats['sec_per_kimg']:<8.2f} img/s {stats['img_per_sec']:<8.1f} "
                          f"gradnorm {stats['grad_norm']:<8.3f} nonfinite {stats['nonfinite_grad_steps']} "
                          f"gpumem {peak_gpu:<5.2f} cpumem {stats['cpu_rss_gib']:.2f}"
                          + "".join(f" {key} {value:.4g}" for key, value in extra.items()))
            with open(self.run_dir / "stats.jsonl", "a") as f:
                f.write(json.dumps(strict(stats), allow_nan=False) + "\n")
            self._tensorboard(stats)
            if self._wandb is not None:
                self._wandb.log(scalars(stats), step=nimg)
        return stats

    def close(self) -> None:
        """Finish the W&B run (its last data written), if there is one."""
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def _tensorboard(self, stats: dict) -> None:
        """TensorBoard events beside stats.jsonl, when the tensorboard package is installed."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = False
            else:
                self._writer = SummaryWriter(str(self.run_dir))
        if self._writer is False:
            return
        step = int(stats["kimg"] * 1000)
        for key, value in scalars(stats).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()


def strict(value):
    """`value` with every float that is not finite replaced by None (JSON's null), for strict JSON readers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def scalars(stats: dict) -> dict[str, float]:
    """A tick's numbers for TensorBoard and W&B: `train/<key>` and `loss_by_sigma/<bucket>` (those that are set)."""
    found = {f"train/{k}": float(v) for k, v in stats.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("tick", "timestamp") and "/" not in k}
    found.update({f"loss_by_sigma/{k}": float(v) for k, v in stats["loss_by_sigma"].items() if v is not None})
    return {k: v for k, v in found.items() if math.isfinite(v)}


def open_wandb(c: dict, run_dir: Path):
    """The W&B run of a run directory (resumed when it exists): project --wandb, the configuration as its config."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb (or pip install 'pfgmpp[wandb]')") from None
    run_id = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]  # the same for a resumed run
    return wandb.init(project=c["wandb"], dir=str(run_dir), id=run_id, name=Path(run_dir).name, resume="allow",
                      config=json.loads(json.dumps(strict(dict(c)), default=str)))
