"""One optimizer step over the global batch: the loss's draws, gradient accumulation in rounds of --batch-gpu,
the learning rate and the optimizer's update.

Everything random in a step is a function of (seed, step): each sample's noise level, kernel noise and
augmentation come from per-sample counter-based streams keyed by its global position
(`torch_utils.rng.sample_streams`), so every row is the same on 1 rank, on N ranks and with any --batch-gpu, and
each rank draws its own rows only. Dropout draws from a generator seeded by (seed, step, rank): it differs with
the rank count (documented) and repeats itself on resume.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from torch_utils import precision, rng
from torch_utils.rng import mixed_seed
from training.train.data import model_inputs
from training.train.stats import TickStats

ADAM_BETA1, ADAM_EPS = 0.9, 1e-8
# Purposes of the streams and generators of a step, in `mixed_seed(seed, step, ...)`.
DRAWS, DROPOUT, AUGMENT, REFERENCE_AUGMENT = 0, 1, 2, 6


def learning_rate(c: dict, nimg: int) -> float:
    """Linear ramp-up over --lr_rampup Mimg, then constant (EDM) or, with --lr_decay t_ref > 0, EDM2's
    inverse-square-root decay lr / sqrt(max(t / t_ref, 1)) after t = nimg / --batch steps."""
    lr = c["lr"]
    if c.get("lr_decay"):
        lr /= math.sqrt(max(nimg / (c["lr_decay"] * c["batch"]), 1.0))
    return lr * min(nimg / max(c["lr_rampup"] * 1000 * 1000, 1e-8), 1.0)


def optimizer(c: dict, net: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Adam with the recipe's beta2 (fused on CUDA)."""
    fused = device.type == "cuda" or None
    return torch.optim.Adam(net.parameters(), lr=c["lr"], betas=(ADAM_BETA1, c["beta2"]), eps=ADAM_EPS, fused=fused)


class TrainStep:
    """A training run's step: `step_fn(step, nimg, batches, reference)` accumulates the loss of global batch `step`
    over this rank's rounds and updates the network; statistics go to `stats` on the device (no host sync)."""

    def __init__(self, c: dict, net: torch.nn.Module, ddp: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn,
                 augment_pipe, dataset, stats: TickStats, rank: int, world: int, device: torch.device):
        self.c, self.net, self.ddp, self.optimizer, self.loss_fn = c, net, ddp, opt, loss_fn
        self.augment_pipe, self.stats, self.rank, self.world, self.device = augment_pipe, stats, rank, world, device
        self.image_shape, self.label_dim = list(dataset.image_shape), dataset.label_dim
        self.batch_rank = c["batch"] // world
        self.rounds = self.batch_rank // c["batch_gpu"]
        self.dropout = torch.Generator(device)

    def reference_augment(self, step: int):
        """The augmentation of the step's reference batch: drawn from (seed, step), the same on every rank."""
        if self.augment_pipe is None:
            return None
        g = torch.Generator(self.device).manual_seed(mixed_seed(self.c["seed"], step, REFERENCE_AUGMENT))
        return lambda y: self.augment_pipe(y, generator=g)

    def __call__(self, step: int, nimg: int, batches, reference: torch.Tensor | None) -> None:
        c, dev, gpu = self.c, self.device, self.c["batch_gpu"]
        first = self.rank * self.batch_rank
        streams = rng.sample_streams((c["seed"], step, DRAWS), range(first, first + self.batch_rank), dev)
        draws = self.loss_fn.draw([self.batch_rank, *self.image_shape], dev, streams)  # (sigma, noise[, probes])
        if c["channels_last"]:
            draws = tuple(d.contiguous(memory_format=torch.channels_last) if d.ndim == 4 else d for d in draws)
        sigma = draws[0]
        self.dropout.manual_seed(mixed_seed(c["seed"], step, self.rank, DROPOUT))
        self.optimizer.zero_grad(set_to_none=True)
        for r in range(self.rounds):
            images, labels = model_inputs(*next(batches), dev, self.label_dim, c["channels_last"])
            rows = slice(r * gpu, (r + 1) * gpu)
            augment = None
            if self.augment_pipe is not None:
                g_aug = rng.sample_streams((c["seed"], step, AUGMENT), range(first + rows.start, first + rows.stop), dev)
                augment = functools.partial(self.augment_pipe, generator=g_aug)
            sync = r == self.rounds - 1 or self.world == 1
            with (self.ddp.no_sync() if not sync else contextlib.nullcontext()), precision.autocast(c["precision"], dev), \
                    rng.network_draws(self.dropout):
                loss = self.loss_fn(self.ddp, images, labels, augment_pipe=augment, draws=tuple(d[rows] for d in draws),
                                    reference=reference)
            self.stats.add_loss(loss.detach(), sigma[rows])
            loss.sum().mul(c["ls"] / self.batch_rank).backward()
        self._update(nimg)

    def _update(self, nimg: int) -> None:
        """The optimizer step at the learning rate of `nimg` images seen, non-finite gradients counted and zeroed."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.c, nimg)
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros([], device=self.device)
        self.stats.add_step(norm)
        # Non-finite gradients are counted above (stats.jsonl: nonfinite_grad_steps) and zeroed here. EDM zeroes
        # NaN but maps +-inf to +-1e5, which Adam turns into a full-size step along the overflow; zero is no step.
        for grad in grads:
            torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
        self.optimizer.step()
