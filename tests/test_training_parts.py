"""Pieces of the training loop: data order, EMA and learning-rate schedules, tick statistics."""

import itertools
import math

import pytest
import torch

from tests.helpers import make_dataset
from torch_utils import distributed
from torch_utils.rng import mixed_seed
from training.datasets import ImageFolderDataset
from training.train import config, data, setup
from training.train import stats as stats_lib
from training.train.data import GlobalBatchSampler
from training.train.ema import RAMPUP_RATIO, Averages, ema_beta
from training.train.step import TrainStep, learning_rate, optimizer


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
    assert RAMPUP_RATIO == 0.05
    assert ema_beta(500, 512, 10**9) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(500, 512, 1_000_000) == pytest.approx(0.5 ** (512 / 50_000))
    # The half-life in images holds for any batch size: beta^(n / batch) = 0.5 after n = half-life images.
    for batch in (64, 512, 4096):
        assert ema_beta(500, batch, 10**9) ** (500_000 / batch) == pytest.approx(0.5)
    c = dict(lr=1e-3, lr_decay=0, batch=512, lr_rampup=10)  # lr_rampup in Mimg: 10_000 kimg
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


class _Run:
    """A training run's pieces as `training.train.loop.training_loop` sets them up (network, averages, optimizer,
    step), stepped as the loop steps: reference batch, `TrainStep`, images seen, step, EMA."""

    def __init__(self, c, dataset, device: torch.device, loss_fn, augment_pipe=None):
        self.c, self.dataset, self.device, self.loss_fn, self.augment_pipe = c, dataset, device, loss_fn, augment_pipe
        self.net = setup.build_denoiser(c, dataset, device)
        self.averages = Averages(self.net, c.ema, c.ema_std, c.batch)
        self.optimizer = optimizer(c, self.net, device)
        self.ddp = setup.distributed_model(self.net, c, device)
        self.stats = stats_lib.TickStats(device)
        self.train_step = TrainStep(c, self.net, self.ddp, self.optimizer, loss_fn, augment_pipe, dataset, self.stats,
                                    distributed.get_rank(), distributed.get_world_size(), device)
        self.step, self.nimg = 0, 0

    @property
    def ema(self) -> torch.nn.Module:
        return self.averages.reader

    def batches(self):
        """This rank's training rounds from the current step on."""
        return data.training_batches(self.dataset, self.c, self.step, self.device)

    def references(self):
        """This rank's share of the reference batches (--rbatch) from the current step on."""
        return data.reference_batches(self.dataset, self.c, self.step, self.device)

    def advance(self, batches, references=None) -> None:
        """One step of the loop: the reference batch, the optimizer step, then the EMA of the images seen."""
        reference = None
        if references is not None:
            reference = data.reference_batch(references, self.loss_fn, self.train_step.reference_augment(self.step),
                                             self.device)
        self.train_step(self.step, self.nimg, batches, reference)
        self.nimg += self.c.batch
        self.step += 1
        self.averages.update(self.net, self.nimg)


def _trainer(tmp_path, device: str = "cpu", **options) -> _Run:
    """The training pieces of a tiny DDPM++ on 16 8x8 images, on `device` (the CPU unless told)."""
    dataset_path = make_dataset(tmp_path / "d.zip", count=16, labels=False)
    options = dict(dict(cbase=8, cres="1", nblock=1, attn="", batch=8, workers=0, precision="fp32"), **options)
    c = config.training_config(data=str(dataset_path), arch="ddpmpp", **options)
    dataset = ImageFolderDataset(**config.dataset_kwargs(c))
    c = config.complete(c, dataset)
    return _Run(c, dataset, torch.device(device), config.build_loss(c), config.augment_pipe(c))


def test_the_first_step_copies_the_network_into_the_ema_as_edm(tmp_path):
    """EDM computes the EMA decay from the images seen before a step: 0 at the first, so the EMA becomes the net."""
    trainer = _trainer(tmp_path, augment=0, dropout=0)
    trainer.advance(trainer.batches())
    for (name, p_ema), p_net in zip(trainer.ema.named_parameters(), trainer.net.parameters()):
        assert torch.equal(p_ema, p_net), name
    trainer.advance(trainer.batches())
    assert any(not torch.equal(a, b) for a, b in zip(trainer.ema.parameters(), trainer.net.parameters()))


def test_the_stable_target_field_averages_over_an_augmented_reference_batch(tmp_path):
    """With --stf and augmentation, the reference images are augmented like the training images (PFGM++'s code),
    from (seed, step), so the same on every rank."""
    trainer = _trainer(tmp_path, augment=0.5, stf=True, rbatch=16, dropout=0)
    seen = []
    original = trainer.loss_fn.target
    trainer.loss_fn.target = lambda y, perturbed, sigma, reference: seen.append(reference) or original(y, perturbed, sigma, reference)
    references = trainer.references()
    (indices,) = itertools.islice(iter(GlobalBatchSampler(16, 16, 16, 0, 1, seed=mixed_seed(trainer.c.seed, 4))), 1)
    raw = torch.stack([torch.as_tensor(trainer.dataset[i][0]) for i in indices])  # the reference order: (seed, 4)
    trainer.advance(trainer.batches(), references)
    raw = raw.to(torch.float32) / 127.5 - 1
    g = torch.Generator().manual_seed(mixed_seed(trainer.c.seed, 0, 6))
    expected, _ = trainer.augment_pipe(raw, generator=g)
    assert len(seen) == 1 and torch.equal(seen[0], expected) and not torch.equal(seen[0], raw)
    (tmp_path / "plain").mkdir()
    plain = _trainer(tmp_path / "plain", augment=0.5, dropout=0)
    assert torch.equal(plain.loss_fn.reference_batch(raw, lambda y: (y + 1, None)), raw)  # no STF: not asked, unchanged


def test_channels_last_reaches_the_network(tmp_path):
    """With --channels_last the images, the augmented images and the drawn noise all stay channels_last, so the
    network never gets a tensor that needs a layout conversion."""
    trainer = _trainer(tmp_path, augment=0.3, dropout=0, channels_last=True)
    seen = []
    trainer.net.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    trainer.advance(trainer.batches())
    assert seen and all(seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_training_step_makes_no_host_sync(tmp_path):
    """Steps after the warm-up run without a host-device synchronisation (tick boundaries excepted)."""
    trainer = _trainer(tmp_path, device="cuda", precision="tf32", pfgmpp=True, aug_dim=128, augment=0.3)
    batches = trainer.batches()
    for _ in range(2):
        trainer.advance(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.advance(batches)
    finally:
        torch.cuda.set_sync_debug_mode("default")
