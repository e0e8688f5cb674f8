"""Training throughput: img/s and model FLOP utilisation of full training steps (benchmark, not a test).

Runs the training loop's own step (`training.train.step.TrainStep`: loss, PFGM++ noise, backward, Adam) on random
uint8 data of the preset's published resolution, so data loading from disk is not measured.

    python bench/bench_training.py --arch=ddpmpp --batch=512 --precision=bf16          # on a GPU
    python bench/bench_training.py --arch=ddpmpp --batch=4 --steps=3 --cbase=32         # a CPU smoke run

MFU = model FLOPs of forward + backward (counted once by torch.utils.flop_counter) per second, divided
by the device's dense peak for the precision (--peak_tflops, or a built-in value for H100 / H200).
"""

from __future__ import annotations

import time

import click
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from training import networks
from training.train import config as config_lib
from training.train import data, setup
from training.train.stats import TickStats
from training.train.step import TrainStep, optimizer

# Dense peak TFLOP/s by (device name fragment, precision); SXM parts, from NVIDIA's data sheets.
PEAKS = {("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0, ("H100", "tf32"): 494.0, ("H100", "fp32"): 67.0,
         ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0, ("H200", "tf32"): 494.0, ("H200", "fp32"): 67.0}


class RandomImages:
    """A dataset of random uint8 images (no labels), with the loader's interface."""

    def __init__(self, resolution: int, channels: int = 3, size: int = 4096):
        rng = np.random.default_rng(0)
        self.data = rng.integers(0, 256, size=[size, channels, resolution, resolution], dtype=np.uint8)
        self.resolution, self.num_channels, self.label_dim = resolution, channels, 0
        self.image_shape = [channels, resolution, resolution]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i], np.zeros([0], dtype=np.float32)


def _flops_per_image(train_step: TrainStep, batches, batch_gpu: int) -> float:
    with FlopCounterMode(display=False) as counter:
        train_step(0, 0, batches, None)
    return counter.get_total_flops() / (train_step.rounds * batch_gpu)


@click.command()
@click.option("--arch", type=click.Choice(["ddpmpp", "ncsnpp", "adm"]), default="ddpmpp", show_default=True)
@click.option("--resolution", type=int, default=None, help="[default: the preset's published one: 32, adm 64]")
@click.option("--batch", type=int, default=512, show_default=True)
@click.option("--batch_gpu", type=int, default=None)
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default="bf16", show_default=True)
@click.option("--aug_dim", type=float, default=128.0, show_default=True)
@click.option("--cbase", type=int, default=None, help="Override the preset's width (smoke runs)")
@click.option("--compile", "compile_", is_flag=True)
@click.option("--channels_last", is_flag=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--peak_tflops", type=float, default=None)
def main(arch, resolution, batch, batch_gpu, precision, aug_dim, cbase, compile_, channels_last, steps, warmup, peak_tflops):
    """Time full training steps and print img/s, TFLOP/s and MFU."""
    resolution = resolution or networks.preset(arch).resolution
    c = config_lib.training_config(data="random", arch=arch, pfgmpp=True, aug_dim=aug_dim, batch=batch,
                                   batch_gpu=batch_gpu, cbase=cbase, precision=precision, compile=compile_,
                                   channels_last=channels_last, augment=0, dropout=0.13, workers=0, lr_rampup=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup.set_precision(c, device)
    dataset = RandomImages(resolution)
    net = setup.build_denoiser(c, dataset, device)
    train_step = TrainStep(c, net, setup.distributed_model(net, c, device), optimizer(c, net, device),
                           config_lib.build_loss(c), None, dataset, TickStats(device), 0, 1, device)
    batches = data.training_batches(dataset, c, 0, device)
    flops = _flops_per_image(train_step, batches, c.batch_gpu)
    for i in range(warmup):
        train_step(i, i * batch, batches, None)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for i in range(warmup, warmup + steps):
        train_step(i, i * batch, batches, None)
    sync()
    seconds = time.perf_counter() - start
    img_s = steps * batch / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops or next((v for (k, p), v in PEAKS.items() if k in name and p == precision), None)
    params = sum(p.numel() for p in net.parameters())
    print(f"device:     {name}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"config:     {arch} {resolution}x{resolution}, {params / 1e6:.2f} M parameters, D={aug_dim:g}, batch {batch} "
          f"(per round {c.batch_gpu}), {precision}{', compiled' if compile_ else ''}{', channels_last' if channels_last else ''}")
    print(f"model FLOPs: {flops / 1e9:.1f} GFLOP per image (forward + backward)")
    print(f"throughput: {img_s:.1f} img/s, {steps} steps in {seconds:.2f} s, {img_s * flops / 1e12:.2f} TFLOP/s")
    print(f"MFU:        {100 * img_s * flops / 1e12 / peak:.1f}% of {peak:g} TFLOP/s" if peak else "MFU:        (no peak known: pass --peak_tflops)")


if __name__ == "__main__":
    main()
