"""What a training run writes at a snapshot: every tracked average as a network snapshot, a grid of samples, and
with --metrics each average's scores (the code of `fid.py gen`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from torch_utils import distributed
from training import checkpoint, evaluation, samplers
from training.generation import SAMPLING_PRECISIONS, images, quantize
from training.train.config import metrics_sampler
from training.train.ema import Averages

GRID_STEPS = 18  # Heun steps of the sample grids (EDM's default)
METRICS_BATCH = 64  # images per rank and batch of --metrics: fid.py gen's default


def provenance(c: dict, run_dir: Path, step: int, nimg: int) -> dict:
    """Where a snapshot comes from, for its readers (reconstruct_phema.py, fid.py sweep)."""
    return {"run_dir": str(run_dir), "kimg": nimg / 1000, "step": step, "dataset": c["data"],
            "training_options": "training_options.json"}


def save_snapshots(c: dict, run_dir: Path, averages: Averages, dataset, step: int, nimg: int, label: str,
                   device) -> None:
    """Rank 0: every tracked average in the safe format, and a grid of --grid samples from `averages.reader`, named by
    the tick's `checkpoint.formats.kimg_label`."""
    origin = provenance(c, run_dir, step, nimg)
    for name, sigma_rel, module in averages.snapshots(label):
        checkpoint.save_network(run_dir / name, module, {**origin, "ema": averages.provenance(sigma_rel)})
    if c["grid"] > 0:
        images.save_png(run_dir / f"samples-{label}.png", sample_grid(averages.reader, c["grid"], dataset.label_dim, device))


def sample_grid(net, count: int, label_dim: int, device):
    """A grid of `count` samples of seeds 0..count-1 (Heun, GRID_STEPS steps), classes in turn when conditional,
    enlarged so that small images show at 64 pixels or more (16x16 digits four times: `images.view_scale`)."""
    generators = [torch.Generator(device).manual_seed(s) for s in range(count)]
    labels = None
    if label_dim:
        labels = torch.eye(label_dim, device=device)[torch.arange(count) % label_dim]
    settings = samplers.SamplerSettings("heun", dict(num_steps=GRID_STEPS))
    x = settings.sample(net, settings.prior_latents(net, generators), labels)
    return images.grid(images.to_uint8(x).cpu().numpy(), scale=images.view_scale(net.img_resolution))


def open_metrics(c: dict, device):
    """Every rank, before training: (detector, reference statistics) of --metrics (`evaluation.open_setup`)."""
    return evaluation.open_setup(c["metrics"], c["metrics_ref"], c.get("detector"), device, METRICS_BATCH,
                                 min(c["workers"], distributed.default_workers(3)), progress=distributed.is_main())


def evaluate_metrics(c: dict, run_dir: Path, averages: Averages, setup, step: int, nimg: int, label: str, device,
                     log: logging.Logger) -> None:
    """Every rank, while training waits: --metrics of each tracked average, exactly as `fid.py gen` with its defaults
    scores the snapshot (seeds 0..metrics_num-1), with --metrics_solver/--metrics_steps/--metrics_alpha/--metrics_bits
    as `fid.py gen` with --solver/--steps/--perturb_alpha/--quantize_bits; rank 0 appends a line per network and metric
    to metric-<name>.jsonl."""
    detector, reference = setup
    precision = c["precision"] if c["precision"] in SAMPLING_PRECISIONS else "tf32"
    settings = metrics_sampler(c)
    for name, sigma_rel, module in averages.snapshots(label):
        module = quantize.quantize(module, c.get("metrics_bits"))
        score = evaluation.score(module, range(c["metrics_num"]), c["metrics"], reference, detector, device,
                                 settings, METRICS_BATCH, precision=precision)
        if not distributed.is_main():
            continue
        for metric, results in score.by_metric.items():
            record = dict(kimg=nimg / 1000, step=step, snapshot=name, sigma_rel=sigma_rel,
                          ema_halflife_kimg=c["ema"] * 1000 if sigma_rel is None else None,
                          value=next(iter(results.values())), results=results, images=score.num,
                          seconds=score.seconds, nfe_per_batch=score.nfe_per_batch,
                          sampler={"solver": settings.solver, **settings.options, "quantize_bits": c.get("metrics_bits")})
            with open(run_dir / f"metric-{metric}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            log.info(f"{name}: {metric} {record['value']:.4g} ({score.num} images, {score.seconds:.0f} s)")
