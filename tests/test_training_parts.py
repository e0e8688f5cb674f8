"""Pieces of the training loop: data order, EMA and learning-rate schedules, tick statistics."""

import itertools
import math

import pytest
import torch

from dnnlib.util import EasyDict
from training import stats as stats_lib
from torch_utils.rng import mixed_seed
from training.training_loop import GlobalBatchSampler, ema_beta, learning_rate


def _take(sampler, rounds):
    return list(itertools.islice(iter(sampler), rounds))


@pytest.mark.parametrize("world, batch_gpu", [(1, 12), (2, 6), (3, 2), (4, 1)])
def test_ranks_and_rounds_partition_the_global_batch(world, batch_gpu):
    """Every split of a global batch of 12 over ranks and rounds reads exactly the same indices."""
    single = _take(GlobalBatchSampler(30, 12, 12, 0, 1, seed=7), 5)
    rounds = 12 // world // batch_gpu
    per_rank = [_take(GlobalBatchSampler(30, 12, batch_gpu, r, world, seed=7), 5 * rounds) for r in range(world)]
    for step in range(5):
        gathered = [i for r in range(world) for chunk in per_rank[r][step * rounds : (step + 1) * rounds] for i in chunk]
        assert gathered == single[step]


def test_epochs_are_permutations_and_resume_continues_the_order():
    sampler = GlobalBatchSampler(10, 5, 5, 0, 1, seed=1)
    batches = _take(sampler, 6)
    for epoch in range(3):
        assert sorted(batches[2 * epoch] + batches[2 * epoch + 1]) == list(range(10))
    assert batches[:2] != batches[2:4]  # a new permutation each epoch
    assert _take(GlobalBatchSampler(10, 5, 5, 0, 1, seed=1, start_step=3), 3) == batches[3:]


def test_mixed_seeds_differ():
    seeds = {mixed_seed(s, t, r) for s in range(3) for t in range(3) for r in range(3)}
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)


def test_ema_and_learning_rate_schedules():
    """EDM: beta = 0.5^(batch / min(halflife, ratio * nimg)); lr ramps linearly to its value."""
    c = EasyDict(batch_size=512, ema_halflife_kimg=500, ema_rampup_ratio=0.05, lr=1e-3, lr_rampup_kimg=10000)
    assert ema_beta(c, 10**9) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(c, 1_000_000) == pytest.approx(0.5 ** (512 / 50_000))
    # The half-life in images holds for any batch size: beta^(n / batch) = 0.5 after n = half-life images.
    for batch in (64, 512, 4096):
        c.batch_size = batch
        assert ema_beta(c, 10**9) ** (500_000 / batch) == pytest.approx(0.5)
    assert learning_rate(c, 5_000_000) == pytest.approx(5e-4) and learning_rate(c, 20_000_000) == 1e-3


def test_tick_stats_means_by_sigma_bucket():
    s = stats_lib.TickStats("cpu")
    s.add_loss(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0.001, 0.002, 50.0]))
    s.add_step(torch.tensor(2.0))
    s.add_step(torch.tensor(math.inf))
    out = s.reduce()
    assert out["loss"] == pytest.approx(14 / 3) and out["grad_norm"] == 2.0
    assert out["nonfinite_grad_steps"] == 1 and out["steps"] == 2
    assert out["loss_by_sigma"]["sigma<0.01"] == 2.0 and out["loss_by_sigma"]["sigma>=20"] == 10.0
    assert out["loss_by_sigma"]["1-5"] is None
    assert s.reduce()["steps"] == 0  # reset after each tick
