"""What a training run reports at each tick: the statistics reduced over ranks, a line of log.txt and of
stats.jsonl, and TensorBoard events beside them when the tensorboard package is installed."""

from __future__ import annotations

import json
import logging
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

    def tick(self, tick: int, step: int, nimg: int, start: tuple[int, float]) -> dict:
        """Reduce the tick's statistics over ranks (every rank calls this); rank 0 prints a line and appends stats.jsonl.

        `start` is (images seen, time) when the tick began.
        """
        c = self.c
        stats = self.stats.reduce()
        images, seconds = nimg - start[0], time.time() - start[1]
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        stats.update(tick=tick, kimg=nimg / 1000, step=step, lr=learning_rate(c, nimg), sec_per_tick=seconds,
                     sec_per_kimg=seconds / max(images / 1000, 1e-9), img_per_sec=images / max(seconds, 1e-9),
                     peak_gpu_gib=peak_gpu, cpu_rss_gib=psutil.Process().memory_info().rss / 2**30, timestamp=time.time())
        if c["ema"] > 0 or not c["ema_std"]:  # the classic EMA's decay at the last step
            stats["ema_beta"] = ema_beta(c["ema"] * 1000, c["batch"], nimg - c["batch"])
        extra = self.loss_fn.tick_stats(self.device, stats["steps"])  # what the loss reports besides its value
        stats.update(extra)
        if distributed.is_main():
            self.log.info(f"tick {tick:<5d} kimg {stats['kimg']:<9.3f} loss {stats['loss']:<8.4f} "
                          f"sec/kimg {stats['sec_per_kimg']:<8.2f} img/s {stats['img_per_sec']:<8.1f} "
                          f"gradnorm {stats['grad_norm']:<8.3f} nonfinite {stats['nonfinite_grad_steps']} "
                          f"gpumem {peak_gpu:<5.2f} cpumem {stats['cpu_rss_gib']:.2f}"
                          + "".join(f" {key} {value:.4g}" for key, value in extra.items()))
            with open(self.run_dir / "stats.jsonl", "a") as f:
                f.write(json.dumps(stats) + "\n")
            self._tensorboard(stats)
        return stats

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
        for key, value in stats.items():
            if isinstance(value, (int, float)) and key not in ("tick", "timestamp"):
                self._writer.add_scalar(f"train/{key}", value, global_step=step)
        for name, value in stats["loss_by_sigma"].items():
            if value is not None:
                self._writer.add_scalar(f"loss_by_sigma/{name}", value, global_step=step)
        self._writer.flush()
