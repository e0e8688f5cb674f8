"""The data of a training run: which images each rank reads at each step, and the reference batch.

Global batch `step` holds positions step*B ... step*B+B-1 of an endless sequence of seeded epoch permutations,
so the data order is a function of (seed, step) alone: the same on 1 rank, on N ranks, with --batch-gpu
accumulation, and after a resume at `step`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from torch_utils import distributed
from torch_utils.rng import mixed_seed

REFERENCE_SEED = 4  # the purpose of the reference batch's data order in `mixed_seed`


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


def _load(dataset, sampler: GlobalBatchSampler, workers: int, device: torch.device) -> Iterator:
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         prefetch_factor=2 if workers > 0 else None)
    return iter(loader)


def training_batches(dataset, c: dict, step: int, device: torch.device) -> Iterator:
    """Endless iterator of this rank's (uint8 images, labels) rounds of --batch-gpu, from global batch `step` on."""
    sampler = GlobalBatchSampler(len(dataset), c["batch"], c["batch_gpu"], distributed.get_rank(),
                                 distributed.get_world_size(), c["seed"], start_step=step)
    return _load(dataset, sampler, c["workers"], device)


def reference_batches(dataset, c: dict, step: int, device: torch.device) -> Iterator:
    """Endless iterator of this rank's share of each step's reference batch (--rbatch images, its own data order)."""
    world = distributed.get_world_size()
    share = c["rbatch"] // world
    sampler = GlobalBatchSampler(len(dataset), c["rbatch"], share, distributed.get_rank(), world,
                                 mixed_seed(c["seed"], REFERENCE_SEED), start_step=step)
    return _load(dataset, sampler, c["workers"], device)


def model_inputs(images: torch.Tensor, labels: torch.Tensor, device: torch.device, label_dim: int,
                 channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [B, C, H, W] as float32 in [-1, 1] on the device (as EDM: x / 127.5 - 1), labels or None."""
    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True) if label_dim else None


def reference_batch(references: Iterator, loss_fn, augment: Callable | None, device: torch.device) -> torch.Tensor:
    """The step's reference batch, gathered from every rank, as the loss takes it (`loss_fn.reference_batch`):
    `augment(images)` is the augmentation the loss applies to it, drawn the same on every rank (STF)."""
    images, _ = next(references)
    images = distributed.all_gather(images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1)
    return loss_fn.reference_batch(images, augment)
