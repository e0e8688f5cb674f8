"""The training loop: DDP, gradient accumulation, EMA, ticks, snapshots and exact resume.

Everything random in a step is a function of (seed, step), so a run does not depend on how it is split:
the global batch's data indices, and each sample's noise level, kernel noise and augmentation (drawn from
per-sample counter-based streams keyed by its global position, `torch_utils.rng.sample_streams`), are the
same on 1 rank, on N ranks, or with --batch-gpu accumulation; each rank draws its own rows only, so its cost
does not grow with the number of ranks. Dropout draws per rank from (seed, step, rank), so it differs with
the rank count (documented). Resuming from a training state at step s repeats the uninterrupted run bitwise
on the same hardware.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import re
import signal
import time
import warnings
from pathlib import Path

import psutil
import torch

from dnnlib import util
from dnnlib.util import EasyDict, atomic_write
from torch_utils import distributed, precision, rng
from torch_utils.rng import mixed_seed
from training import checkpoint, evaluation, generation, images, networks, phema, preconditioners, samplers
from training.stats import TickStats

STATE_FORMAT, STATE_VERSION = checkpoint.STATE_FORMAT, checkpoint.STATE_VERSION
METRICS_BATCH = 64  # images per rank and batch of --metrics: fid.py gen's default
STATE_PATTERN = re.compile(r"^training-state-(\d+)\.pt$")


class GlobalBatchSampler:
    """This rank's index lists, round by round: global batch `step` holds positions step*B ... step*B+B-1
    of an endless sequence of seeded epoch permutations; rank k takes rows [k*B/W, (k+1)*B/W), in rounds
    of `batch_gpu`. Starting at `start_step` resumes the data order exactly."""

    def __init__(self, size: int, batch_size: int, batch_gpu: int, rank: int, world: int, seed: int, start_step: int = 0):
        self.size, self.batch_size, self.batch_gpu = size, batch_size, batch_gpu
        self.offset = rank * (batch_size // world)
        self.rounds = batch_size // world // batch_gpu
        self.seed, self.start_step = seed, start_step
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch = position // self.size
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(mixed_seed(self.seed, epoch, 3))
            self._epoch, self._perm = epoch, torch.randperm(self.size, generator=g).tolist()
        return self._perm[position % self.size]

    def __iter__(self):
        step = self.start_step
        while True:
            for r in range(self.rounds):
                first = step * self.batch_size + self.offset + r * self.batch_gpu
                yield [self._index(p) for p in range(first, first + self.batch_gpu)]
            step += 1


class StopFlag:
    """Set by SIGTERM / SIGINT / SIGUSR1 (preemption); the loop writes a state and exits cleanly."""

    SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def find_resume_state(run_dir: Path) -> Path | None:
    """The newest training state in `run_dir` that loads; unreadable ones are skipped with a warning."""
    found = sorted((int(m.group(1)), p) for p in Path(run_dir).glob("training-state-*.pt") if (m := STATE_PATTERN.match(p.name)))
    for _, path in reversed(found):
        try:
            read_state(path)
            return path
        except Exception as error:  # noqa: BLE001 (any damage: truncation, wrong format)
            warnings.warn(f"skipping {path.name}: it does not load ({error})", stacklevel=2)
    return None


def rewind_stats(run_dir: Path, step: int) -> int:
    """Drop the lines after `step` from stats.jsonl and the metric-*.jsonl files (written before a crash, redone
    after resuming); return the number of ticks kept, where the tick count continues."""
    ticks = 0
    for path in [Path(run_dir) / "stats.jsonl", *sorted(Path(run_dir).glob("metric-*.jsonl"))]:
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                if json.loads(line)["step"] <= step:
                    kept.append(line)
        with atomic_write(path, "w") as f:
            f.write("".join(f"{line}\n" for line in kept))
        ticks = len(kept) if path.name == "stats.jsonl" else ticks
    return ticks


def read_state(path) -> dict:
    """Load a training state with weights_only=True and check its format; a ValueError that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no training state at {path}; give a training-state-NNNNNN.pt of this program, or --resume=auto")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (truncated, random bytes, a pickle that asks for code: nothing ran)
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} is not a readable training state ({reason}); if it was cut short, resume from an "
                         "earlier training-state-*.pt or with --resume=auto; to start from the weights of an EDM / "
                         "PFGM++ checkpoint use --transfer") from None
    if isinstance(state, dict) and state.get("format") == checkpoint.FORMAT:
        raise ValueError(f"{path} is a network snapshot, not a training state (it holds no optimizer state): "
                         f"start a new run from its weights with --transfer={path}")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a training state of this program; give a training-state-NNNNNN.pt it wrote, "
                         "or start a new run from a network's weights with --transfer")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')}; this program reads {STATE_VERSION}")
    return state


def stale_outputs(run_dir: Path) -> list[Path]:
    """Temporary files a killed writer of this run left behind (`dnnlib.util.temporary_path` names).

    Only this run writes into its directory, so at its start every temporary of a run output is stale, also
    those written before temporaries carried their writer's process id.
    """
    names = ("training-state-", "network-snapshot-", "samples-", "stats.jsonl", "metric-", "training_options.json", "log.txt")
    return [p for p in Path(run_dir).glob(".tmp-*") if p.name[len(".tmp-"):].startswith(names)]


def write_state(path: Path, net, ema, optimizer, step: int, cur_nimg: int, config: dict, tracked: dict | None = None) -> None:
    """Write a training state atomically (weights, EMA, optimizer, position; `tracked`: the power-function EMAs'
    `state_dict()`). `ema` is the network a reader of the state gets: the classic EMA, else a tracked profile."""
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": json.dumps(config),
        "network": json.dumps(checkpoint.network_config(ema)),  # the EMA network, readable like a snapshot
        "step": step,
        "cur_nimg": cur_nimg,
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    if tracked is not None:
        state["phema"] = {"sigma_rel": tracked["sigma_rel"],
                          "ema": [{k: v.detach().cpu() for k, v in sd.items()} for sd in tracked["ema"]]}
    with atomic_write(path) as f:
        torch.save(state, f)


def set_precision(c: EasyDict, device: torch.device) -> None:
    """TF32 unless --precision=fp32; cuDNN autotuning on CUDA unless --bench=0."""
    precision.set_tf32(c.precision != "fp32")
    torch.backends.cudnn.benchmark = device.type == "cuda" and c.get("cudnn_benchmark", True)


def build_network(c: EasyDict, dataset, device) -> torch.nn.Module:
    """The preconditioned network (train mode) a configuration describes, for the dataset's shape."""
    precond = preconditioners.get(c.precond)
    model = networks.build_network(c.network_class, dataset.resolution, dataset.num_channels,
                                   precond.out_channels(dataset.num_channels), label_dim=dataset.label_dim,
                                   **c.network_kwargs)
    net = precond(model, img_resolution=dataset.resolution, img_channels=dataset.num_channels,
                  label_dim=dataset.label_dim, **c.precond_kwargs)
    net.train().requires_grad_(True).to(device)
    if c.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def transfer_weights(source: str, *modules: torch.nn.Module) -> None:
    """Load the weights of a snapshot or checkpoint (ours, EDM's, PFGM++'s) into `modules` of the same architecture."""
    weights = checkpoint.read_checkpoint(source)[1]
    for module in modules:
        checkpoint.load_weights(module, weights, f"--transfer={source}")


def check_transfer(c: EasyDict, dataset) -> None:
    """ValueError, before any run directory exists, unless --transfer's weights fit the network of `c`."""
    transfer_weights(c.transfer, build_network(c, dataset, torch.device("cpu")))


def ema_beta(c: EasyDict, cur_nimg: int) -> float:
    """EDM's EMA decay per step: half-life ema_halflife_kimg, ramped up as ema_rampup_ratio * images seen."""
    ema_nimg = c.ema_halflife_kimg * 1000
    if c.ema_rampup_ratio is not None:
        ema_nimg = min(ema_nimg, cur_nimg * c.ema_rampup_ratio)
    return 0.5 ** (c.batch_size / max(ema_nimg, 1e-8))


def learning_rate(c: EasyDict, cur_nimg: int) -> float:
    """Linear ramp-up over lr_rampup_kimg, then constant (EDM) or, with lr_ref_batches t_ref > 0, EDM2's
    inverse-square-root decay lr / sqrt(max(t / t_ref, 1)) after t = cur_nimg / batch_size steps."""
    lr = c.lr
    if c.get("lr_ref_batches"):
        lr /= math.sqrt(max(cur_nimg / (c.lr_ref_batches * c.batch_size), 1.0))
    return lr * min(cur_nimg / max(c.lr_rampup_kimg * 1000, 1e-8), 1.0)


class Trainer:
    """One training run: state, one optimizer step, ticks, snapshots."""

    def __init__(self, c: EasyDict, run_dir: Path, dataset, device: torch.device, loss_fn, augment_pipe=None):
        self.c, self.run_dir, self.dataset, self.device = c, Path(run_dir), dataset, device
        self.loss_fn, self.augment_pipe = loss_fn, augment_pipe
        self.rank, self.world = distributed.get_rank(), distributed.get_world_size()
        self.batch_rank = c.batch_size // self.world
        self.rounds = self.batch_rank // c.batch_gpu
        torch.manual_seed(mixed_seed(c.seed, 5))  # initial weights: a function of the seed, equal on all ranks
        self.net = build_network(c, dataset, device)
        if c.get("transfer"):
            transfer_weights(c.transfer, self.net)
        # The classic EMA (EDM: --ema half-life) unless only power-function EMAs are tracked (EDM2: --ema_std).
        self.classic = None
        if c.ema_halflife_kimg > 0 or not c.get("ema_std"):
            self.classic = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.phema = phema.PowerFunctionEMA(self.net, c.ema_std) if c.get("ema_std") else None
        fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=c.lr, betas=tuple(c.betas), eps=c.eps, fused=fused or None)
        self.ddp = self.net
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=[device] if fused else None)
        self.model = torch.compile(self.ddp) if c.compile else self.ddp
        self.step, self.cur_nimg = 0, 0
        self.stats = TickStats(device)
        # should_stop's vote on CUDA: pinned host buffers out and back, and the event of the last copy back.
        self._votes = [torch.zeros(1, pin_memory=True), torch.zeros(1, pin_memory=True), None] if fused else None

    def resume(self, path: Path) -> None:
        """Load weights, EMA, optimizer and position from a training state."""
        state = read_state(path)
        self.net.load_state_dict(state["net"])
        if self.classic is not None:
            self.classic.load_state_dict(state["ema"])
        if self.phema is not None:
            if "phema" not in state:
                raise ValueError(f"{path} holds no power-function EMA; resume it without --ema_std, or start a new run "
                                 f"from its weights with --transfer={path}")
            self.phema.load_state_dict(state["phema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.cur_nimg = int(state["step"]), int(state["cur_nimg"])

    def batches(self, batch_size: int | None = None, seed: int | None = None):
        """Endless iterator of this rank's (images, labels) rounds from the current step on.

        With `batch_size` and `seed`: this rank's share of a reference batch, the same for any number of
        ranks once gathered by `_reference` (the STF and PFGM reference batch)."""
        if batch_size is None:
            sampler = GlobalBatchSampler(len(self.dataset), self.c.batch_size, self.c.batch_gpu, self.rank, self.world,
                                         self.c.seed, start_step=self.step)
        else:
            share = batch_size // self.world
            sampler = GlobalBatchSampler(len(self.dataset), batch_size, share, self.rank, self.world, seed, start_step=self.step)
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.c.workers,
                                             pin_memory=self.device.type == "cuda", persistent_workers=self.c.workers > 0,
                                             prefetch_factor=2 if self.c.workers > 0 else None)
        return iter(loader)

    def _reference(self, references):
        """The step's reference batch, gathered from every rank, as the loss takes it (augmented, for STF).

        Its augmentation draws from (seed, step), so it is the same on every rank and for any rank count.
        """
        if references is None:
            return None
        images, _ = next(references)
        images = distributed.all_gather(images.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1)
        augment = None
        if self.augment_pipe is not None:
            g = torch.Generator(self.device).manual_seed(mixed_seed(self.c.seed, self.step, 6))
            augment = lambda y: self.augment_pipe(y, generator=g)  # noqa: E731
        return self.loss_fn.reference_batch(images, augment)

    def train_step(self, batches, references=None) -> None:
        """One optimizer step over the global batch, accumulated in rounds of batch_gpu per rank.

        The loss's random draws (sigma, the kernel noise, probes) and the augmentation come from per-sample
        streams keyed by (seed, step, global position): each rank draws its own rows only, and every row is the
        same for any number of ranks and any --batch-gpu.
        """
        c, dev = self.c, self.device
        torch.manual_seed(mixed_seed(c.seed, self.step, self.rank, 1))  # dropout: per (step, rank), resumable
        first = self.rank * self.batch_rank
        streams = rng.sample_streams((c.seed, self.step, 0), range(first, first + self.batch_rank), dev)
        draws = self.loss_fn.draw([self.batch_rank, *self.dataset.image_shape], dev, streams)  # (sigma, noise[, probes])
        if c.channels_last:
            draws = tuple(d.contiguous(memory_format=torch.channels_last) if d.ndim == 4 else d for d in draws)
        sigma = draws[0]
        reference = self._reference(references)
        self.optimizer.zero_grad(set_to_none=True)
        for r in range(self.rounds):
            images, labels = next(batches)
            images = images.to(dev, non_blocking=True).to(torch.float32) / 127.5 - 1
            labels = labels.to(dev, non_blocking=True) if self.dataset.label_dim else None
            if c.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            rows = slice(r * c.batch_gpu, (r + 1) * c.batch_gpu)
            augment = None
            if self.augment_pipe is not None:
                g_aug = rng.sample_streams((c.seed, self.step, 2), range(first + rows.start, first + rows.stop), dev)
                augment = functools.partial(self.augment_pipe, generator=g_aug)
            sync = r == self.rounds - 1 or self.world == 1
            with (self.ddp.no_sync() if not sync else contextlib.nullcontext()), precision.autocast(c.precision, dev):
                loss = self.loss_fn(self.model, images, labels, augment_pipe=augment, draws=tuple(d[rows] for d in draws),
                                    reference=reference)
            self.stats.add_loss(loss.detach().flatten(1).mean(dim=1), sigma[rows])
            loss.sum().mul(c.loss_scaling / self.batch_rank).backward()
        self._optimizer_step()

    def _optimizer_step(self) -> None:
        c = self.c
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(c, self.cur_nimg)
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros([], device=self.device)
        self.stats.add_step(norm)
        # Non-finite gradients are counted above (stats.jsonl: nonfinite_grad_steps) and zeroed here. EDM zeroes
        # NaN but maps +-inf to +-1e5, which Adam turns into a full-size step along the overflow; zero is no step.
        for grad in grads:
            torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.optimizer.step()
        beta = ema_beta(c, self.cur_nimg)  # as EDM: from the images seen before this step (0 at the first: a copy)
        self.cur_nimg += c.batch_size
        self.step += 1
        if self.classic is not None:
            with torch.no_grad():
                torch._foreach_lerp_(list(self.classic.parameters()), [p.detach() for p in self.net.parameters()], 1 - beta)
                for b_ema, b_net in zip(self.classic.buffers(), self.net.buffers()):
                    b_ema.copy_(b_net)
        if self.phema is not None:  # EDM2: after the step, from the images seen including it
            self.phema.update(self.net, self.cur_nimg, c.batch_size)

    @property
    def ema(self) -> torch.nn.Module:
        """The network of the sample grids and of a training state's readers: the classic EMA, else the tracked
        power-function EMA of the largest sigma_rel."""
        return self.classic if self.classic is not None else self.phema.items()[-1][1]

    def averages(self) -> list[tuple[str, float | None, torch.nn.Module]]:
        """(snapshot file name, sigma_rel or None for the classic EMA, network) of every tracked average."""
        kimg = self.cur_nimg // 1000
        found = [] if self.classic is None else [(f"network-snapshot-{kimg:06d}.pt", None, self.classic)]
        if self.phema is not None:
            found += [(phema.snapshot_name(kimg, s), s, module) for s, module in self.phema.items()]
        return found

    # ------------------------------------------------------------------------------------------
    # Ticks, snapshots, states.

    def snapshot(self) -> None:
        """Rank 0: every tracked EMA network in the safe format, and a grid of samples from `ema`."""
        kimg = self.cur_nimg // 1000
        provenance = {"run_dir": str(self.run_dir), "kimg": self.cur_nimg / 1000, "step": self.step,
                      "dataset": self.c.dataset_kwargs.get("path"), "training_options": "training_options.json"}
        for name, sigma_rel, module in self.averages():
            ema = {"halflife_kimg": self.c.ema_halflife_kimg} if sigma_rel is None else {"sigma_rel": sigma_rel}
            checkpoint.save_network(self.run_dir / name, module, {**provenance, "ema": ema})
        if self.c.grid_count > 0:
            generators = [torch.Generator(self.device).manual_seed(s) for s in range(self.c.grid_count)]
            labels = None
            if self.dataset.label_dim:
                labels = torch.eye(self.dataset.label_dim, device=self.device)[torch.arange(self.c.grid_count) % self.dataset.label_dim]
            settings = samplers.SamplerSettings("heun", dict(num_steps=self.c.grid_steps))
            x = settings.sample(self.ema, settings.prior_latents(self.ema, generators), labels)
            images.save_png(self.run_dir / f"samples-{kimg:06d}.png", images.grid(images.to_uint8(x).cpu().numpy()))

    def open_metrics(self) -> None:
        """Every rank, before training: the detector and reference statistics of --metrics (`evaluation`)."""
        self.detector, self.reference = evaluation.open_setup(
            self.c.metrics, self.c.metrics_ref, self.c.get("detector"), self.device, METRICS_BATCH,
            min(self.c.workers, distributed.default_workers(3)), progress=distributed.is_main())

    def evaluate_metrics(self, log: logging.Logger) -> None:
        """Every rank, while training waits: --metrics of each tracked EMA network, exactly as `fid.py gen` with its
        defaults scores the snapshot (seeds 0..metrics_num-1); rank 0 appends a line per network and metric to
        metric-<name>.jsonl."""
        precision = self.c.precision if self.c.precision in generation.PRECISIONS else "tf32"
        for name, sigma_rel, module in self.averages():
            score = evaluation.score(module, range(self.c.metrics_num), self.c.metrics, self.reference, self.detector,
                                     self.device, samplers.SamplerSettings(), METRICS_BATCH, precision=precision)
            if not distributed.is_main():
                continue
            for metric, results in score.by_metric.items():
                record = dict(kimg=self.cur_nimg / 1000, step=self.step, snapshot=name, sigma_rel=sigma_rel,
                              ema_halflife_kimg=self.c.ema_halflife_kimg if sigma_rel is None else None,
                              value=next(iter(results.values())), results=results, images=score.num,
                              seconds=score.seconds, nfe_per_batch=score.nfe_per_batch)
                with open(self.run_dir / f"metric-{metric}.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info(f"{name}: {metric} {record['value']:.4g} ({score.num} images, {score.seconds:.0f} s)")

    def save_state(self) -> Path:
        """Rank 0: write training-state-NNNNNN.pt; the previous states stay intact on failure."""
        path = self.run_dir / f"training-state-{self.cur_nimg // 1000:06d}.pt"
        try:
            write_state(path, self.net, self.ema, self.optimizer, self.step, self.cur_nimg, self.c,
                        None if self.phema is None else self.phema.state_dict())
        except OSError as error:
            raise OSError(f"could not write {path} ({error}); earlier states in {self.run_dir} are intact") from None
        return path

    def report_tick(self, tick: int, tick_start: tuple[int, float], log: logging.Logger) -> dict:
        """Reduce the tick's statistics over ranks; rank 0 prints a line and appends stats.jsonl."""
        stats = self.stats.reduce()
        nimg, t = self.cur_nimg - tick_start[0], time.time() - tick_start[1]
        peak_gpu = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        stats.update(tick=tick, kimg=self.cur_nimg / 1000, step=self.step, lr=learning_rate(self.c, self.cur_nimg),
                     sec_per_tick=t, sec_per_kimg=t / max(nimg / 1000, 1e-9),
                     img_per_sec=nimg / max(t, 1e-9), peak_gpu_gib=peak_gpu,
                     cpu_rss_gib=psutil.Process().memory_info().rss / 2**30, timestamp=time.time())
        if self.classic is not None:
            stats["ema_beta"] = ema_beta(self.c, self.cur_nimg - self.c.batch_size)
        extra = self.loss_fn.tick_stats(self.device, stats["steps"])  # what the loss reports besides its value
        stats.update(extra)
        if distributed.is_main():
            log.info(f"tick {tick:<5d} kimg {stats['kimg']:<9.3f} loss {stats['loss']:<8.4f} sec/kimg {stats['sec_per_kimg']:<8.2f} "
                     f"img/s {stats['img_per_sec']:<8.1f} gradnorm {stats['grad_norm']:<8.3f} nonfinite {stats['nonfinite_grad_steps']} "
                     f"gpumem {peak_gpu:<5.2f} cpumem {stats['cpu_rss_gib']:.2f}"
                     + "".join(f" {key} {value:.4g}" for key, value in extra.items()))
            with open(self.run_dir / "stats.jsonl", "a") as f:
                f.write(json.dumps(stats) + "\n")
            self._tensorboard(stats)
        return stats

    def _tensorboard(self, stats: dict) -> None:
        """TensorBoard events beside stats.jsonl, when the tensorboard package is installed."""
        if not hasattr(self, "_writer"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._writer = None
            else:
                self._writer = SummaryWriter(str(self.run_dir))
        if self._writer is None:
            return
        for key, value in stats.items():
            if isinstance(value, (int, float)) and key not in ("tick", "timestamp"):
                self._writer.add_scalar(f"train/{key}", value, global_step=int(stats["kimg"] * 1000))
        for name, value in stats["loss_by_sigma"].items():
            if value is not None:
                self._writer.add_scalar(f"loss_by_sigma/{name}", value, global_step=int(stats["kimg"] * 1000))
        self._writer.flush()

    def should_stop(self, flag: StopFlag) -> bool:
        """All ranks agree whether a stop signal arrived: one small all-reduce every stop_check_steps.

        On CUDA the vote is asynchronous and read at the next check, when it has long arrived in pinned host
        memory: no host-device synchronisation, and a stop comes one check interval later.
        """
        if self.world == 1:
            return flag.signal is not None
        if self.step % self.c.stop_check_steps:
            return False
        vote = 1.0 if flag.signal is not None else 0.0
        if self.device.type != "cuda":
            return bool(distributed.all_reduce_sum(torch.tensor([vote], device=self.device)).item() > 0)
        out, back, event = self._votes
        decided = False
        if event is not None:
            event.synchronize()  # the previous vote's copy, finished steps ago: waits for nothing else
            decided = bool(back[0] > 0)
        out[0] = vote
        total = distributed.all_reduce_sum(out.to(self.device, non_blocking=True))
        back.copy_(total, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._votes[2] = event
        return decided


def training_loop(c: EasyDict, run_dir: str | os.PathLike, dataset, loss_fn, augment_pipe=None,
                  resume: str | os.PathLike | None = None) -> dict:
    """Train until c.total_kimg or a stop signal; returns the last tick's statistics."""
    log = logging.getLogger("pfgmpp.train")
    device = distributed.init()
    if distributed.is_main():
        for leftover in stale_outputs(Path(run_dir)):
            util.remove(leftover)
            log.info(f"removed {leftover.name}, left by a writer that was killed")
    set_precision(c, device)
    trainer = Trainer(c, Path(run_dir), dataset, device, loss_fn, augment_pipe)
    tick = 0
    if resume is not None:
        trainer.resume(Path(resume))
        tick = distributed.broadcast_object(rewind_stats(Path(run_dir), trainer.step) if distributed.is_main() else None)
        if distributed.is_main():
            log.info(f"resumed from {resume} at kimg {trainer.cur_nimg / 1000:.3f} (step {trainer.step})")
    if c.get("metrics"):
        trainer.open_metrics()
    batches = trainer.batches()
    references = trainer.batches(c.rbatch, mixed_seed(c.seed, 4)) if loss_fn.needs_reference else None
    total_nimg, stats = int(c.total_kimg * 1000), {}
    tick_start = (trainer.cur_nimg, time.time())
    # A collective that fails because a rank died or hangs becomes an error naming that rank (after
    # StopFlag has given SIGTERM back, so torchrun can stop this process while it reports).
    flag = StopFlag()
    with distributed.diagnose_failures(lambda: f"at step {trainer.step}", lambda: flag.signal is None), flag:
        while True:
            done = trainer.cur_nimg >= total_nimg
            stop = not done and trainer.should_stop(flag)
            tick_end = trainer.cur_nimg >= tick_start[0] + c.kimg_per_tick * 1000
            if done or stop or (tick_end and trainer.cur_nimg > tick_start[0]):
                if trainer.cur_nimg > tick_start[0]:
                    stats = trainer.report_tick(tick, tick_start, log)
                    tick += 1
                snapshot = done or bool(c.snapshot_ticks and tick % c.snapshot_ticks == 0)
                if distributed.is_main():
                    if snapshot:
                        trainer.snapshot()
                    if done or stop or (c.state_dump_ticks and tick % c.state_dump_ticks == 0):
                        path = trainer.save_state()
                        if stop:
                            log.info(f"received signal {flag.signal}: wrote {path.name}; resume with --resume=auto")
                distributed.barrier()
                if snapshot and c.get("metrics"):
                    trainer.evaluate_metrics(log)
                if done or stop:
                    break
                tick_start = (trainer.cur_nimg, time.time())
            trainer.train_step(batches, references)
    return stats
