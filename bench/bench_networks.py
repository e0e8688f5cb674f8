"""Benchmark: throughput of the DDPM++, NCSN++, ADM and EDM2-XS networks (training.networks), and of DDPM++ at
64x64 (EDM's FFHQ configuration) beside EDM2-XS at 64x64.

For each preset at its published configuration (DDPM++ / NCSN++ CIFAR-10 32x32 with 9 augmentation
labels, ADM and EDM2-XS ImageNet 64x64 with 1000 classes) this prints forward (no_grad, eval) and forward+backward
(train mode, loss = mean square) images per second, and the achieved FLOP/s from the FLOPs counted
once with torch.utils.flop_counter (multiply-add = 2; attention included) in float32.

Variants are '+'-joined tokens: a precision (fp32; bf16 = bfloat16 autocast; fp16 = EDM's fp16 mode,
float16 input and weights cast per layer, CUDA only), optionally `cl` (channels_last) and `compile`
(torch.compile).

Run:
    .venv/bin/python bench/bench_networks.py                                  # cuda if available, else cpu
    .venv/bin/python bench/bench_networks.py --device=cpu --batch=2 --repeats=3 --variants=fp32,bf16
    .venv/bin/python bench/bench_networks.py --device=cuda --batch=128 --variants=fp32,bf16+cl,bf16+cl+compile

Reference costs (docs REFERENCE_FACTS.md): forward 42.4 G (DDPM++), 42.8 G (NCSN++), 219 G (ADM 64^2)
per image; forward+backward about 3x. This prints figures only; it is not a test and asserts nothing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click
import torch
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.bench_perturbation import device_name, resolve_device, time_cases  # noqa: E402
from torch_utils import rng  # noqa: E402
from training.networks import build_network  # noqa: E402

# name: (arch, build keyword arguments, forward GFLOP per image from REFERENCE_FACTS.md, None where it has none)
PRESETS = {
    "ddpmpp": ("ddpmpp", dict(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9), 42.4),
    "ncsnpp": ("ncsnpp", dict(img_resolution=32, in_channels=3, out_channels=3, augment_dim=9), 42.8),
    "adm": ("adm", dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000), 219.0),
    "edm2-xs": ("edm2-xs", dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000), None),
    # DDPM++ at 64x64 as EDM trains FFHQ / AFHQv2 (--cres=1,2,2,2): the like-for-like neighbour of EDM2-XS.
    "ddpmpp-64": ("ddpmpp", dict(img_resolution=64, in_channels=3, out_channels=3, augment_dim=9, channel_mult=[1, 2, 2, 2]), None),
}
# On CPUs without native bfloat16 (oneDNN needs AVX512-BF16 or AMX) bf16 convolutions fall back to a
# reference kernel ~50x slower than float32, so the CPU default leaves bf16 out: ask for it with --variants.
DEFAULT_VARIANTS = {"cpu": "fp32,fp32+cl", "cuda": "fp32,bf16,bf16+cl,bf16+cl+compile,fp16+cl"}
PRECISIONS = ("fp32", "bf16", "fp16")

# FlopCounterMode knows the CUDA attention kernels but not the CPU one that SDPA dispatches to.
_CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v)
    ),
}


def parse_variant(variant: str) -> tuple[str, bool, bool]:
    """(precision, channels_last, compile) from a variant such as 'bf16+cl+compile'."""
    tokens = variant.split("+")
    precision = tokens[0]
    if precision not in PRECISIONS or any(t not in ("cl", "compile") for t in tokens[1:]):
        raise click.BadParameter(
            f"{variant!r}: use a precision ({', '.join(PRECISIONS)}) optionally followed by +cl and/or +compile",
            param_hint="--variants",
        )
    return precision, "cl" in tokens, "compile" in tokens


def make_inputs(net: torch.nn.Module, batch: int, device: torch.device, channels_last: bool, fp16: bool):
    """Random images, noise labels, one-hot class labels and zero augmentation labels."""
    g = torch.Generator(device).manual_seed(0)
    res, c = net.img_resolution, net.in_channels
    x = torch.randn([batch, c, res, res], generator=g, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    if fp16:
        x = x.to(torch.float16)
    noise = torch.randn([batch], generator=g, device=device)
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch, device=device) % net.label_dim, net.label_dim).float()
    augment_dim = net.init_kwargs.get("augment_dim", 0)
    augment = torch.zeros([batch, augment_dim], device=device) if augment_dim else None
    return x, noise, labels, augment


def count_flops(net: torch.nn.Module, args: tuple) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of one call in float32."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        with torch.no_grad():
            net(*args)
    forward = counter.get_total_flops()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter:
        net(*args).float().square().mean().backward()
    net.zero_grad(set_to_none=True)
    return float(forward), float(counter.get_total_flops())


def make_steps(net: torch.nn.Module, fn: Callable, args: tuple, device: torch.device, precision: str):
    """(forward, forward + backward) closures for one variant."""
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    )

    def forward():
        net.eval()
        with torch.no_grad(), autocast():
            fn(*args)

    def forward_backward():
        net.train()
        with autocast():
            loss = fn(*args).float().square().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)

    return forward, forward_backward


def measure_preset(name: str, device: torch.device, batch: int, variants: list[str], warmup: int, repeats: int,
                   **overrides) -> dict:
    """Build one preset (`overrides` change its keywords, e.g. a smaller resolution), count its FLOPs and time every
    variant: {"resolution", "params", "gflop_forward", "gflop_step", "reference", "variants": {variant: figures}}."""
    arch, kwargs, reference = PRESETS[name]
    kwargs = {**kwargs, **overrides}
    with rng.network_draws(torch.Generator().manual_seed(0)):  # seeded weights, without reseeding torch
        net = build_network(arch, **kwargs).to(device)
    fwd_flops, step_flops = count_flops(net, make_inputs(net, batch, device, False, False))
    found = dict(resolution=kwargs["img_resolution"], params=sum(p.numel() for p in net.parameters()),
                 gflop_forward=fwd_flops / batch / 1e9, gflop_step=step_flops / batch / 1e9, reference=reference, variants={})
    for variant in variants:
        precision, channels_last, compiled = parse_variant(variant)
        if precision == "fp16" and device.type != "cuda":
            found["variants"][variant] = dict(status="skipped: EDM's fp16 mode runs on CUDA only")
            continue
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        args = make_inputs(net, batch, device, channels_last, precision == "fp16")
        fn = torch.compile(net) if compiled else net
        try:
            steps = make_steps(net, fn, args, device, precision)
            ms_fwd, ms_step = (time_cases([step], device, warmup, repeats, 1)[0] for step in steps)
        except Exception as error:  # e.g. no C++ compiler for torch.compile: report and go on
            found["variants"][variant] = dict(status=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
            continue
        found["variants"][variant] = dict(status="ok", forward_img_per_sec=batch / ms_fwd * 1e3,
                                          step_img_per_sec=batch / ms_step * 1e3, forward_tflops=fwd_flops / ms_fwd / 1e9,
                                          step_tflops=step_flops / ms_step / 1e9)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return found


def bench_preset(name: str, device: torch.device, batch: int, variants: list[str], warmup: int, repeats: int) -> None:
    """`measure_preset`, printed: a header line and one row per variant."""
    m = measure_preset(name, device, batch, variants, warmup, repeats)
    reference = format(m["reference"], "g") if m["reference"] else "n/a"
    print(f"{name}: {m['resolution']}x{m['resolution']}, {m['params'] / 1e6:.2f} M parameters, "
          f"{m['gflop_forward']:.1f} GFLOP/img forward (reference {reference}), "
          f"{m['gflop_step']:.1f} GFLOP/img forward+backward")  # fmt: skip
    for variant, v in m["variants"].items():
        if v["status"] != "ok":
            print(f"  {variant:<20} {v['status']}")
            continue
        print(f"  {variant:<20} forward {v['forward_img_per_sec']:>9.1f} img/s {v['forward_tflops']:>8.3f} TFLOP/s   "
              f"fwd+bwd {v['step_img_per_sec']:>9.1f} img/s {v['step_tflops']:>8.3f} TFLOP/s")  # fmt: skip


@click.command()
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N, or auto")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Images per call  [default: 2 cpu, 64 cuda]")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed calls  [default: 2 cpu, 20 cuda]")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed calls first")
@click.option("--variants", default=None, help="Comma-separated, e.g. fp32,bf16,bf16+cl+compile  [default: per device]")
@click.option("--presets", default=",".join(PRESETS), show_default=True, help="Comma-separated subset of presets")
def main(device: str, batch: int | None, repeats: int | None, warmup: int, variants: str | None, presets: str) -> None:
    """Time the network presets and print img/s and achieved FLOP/s per variant."""
    resolved = resolve_device(device)
    cuda = resolved.type == "cuda"
    batch = batch or (64 if cuda else 2)
    repeats = repeats or (20 if cuda else 2)
    chosen = [v.strip() for v in (variants or DEFAULT_VARIANTS[resolved.type]).split(",") if v.strip()]
    for variant in chosen:
        parse_variant(variant)
    names = [p.strip() for p in presets.split(",") if p.strip()]
    unknown = [p for p in names if p not in PRESETS]
    if unknown:
        raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(PRESETS)}", param_hint="--presets")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 rows use TF32
    print(f"device:  {resolved} ({device_name(resolved)})")
    print(f"torch:   {torch.__version__}, threads: {torch.get_num_threads()}")
    if hasattr(os, "getloadavg"):
        print(f"load:    {os.getloadavg()[0]:.2f} (1-minute average) on {os.cpu_count()} logical CPUs")
    print(f"timing:  batch {batch}, median of {repeats} timed calls after {warmup} warm-up call(s)")
    print("FLOP/s:  FLOPs counted once in float32 (multiply-add = 2) / median time")
    if not cuda and any(v.startswith("bf16") for v in chosen) and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("note:    this CPU has no native bfloat16 convolution (slow reference kernels): bf16 rows say little")
    print()
    for name in names:
        bench_preset(name, resolved, batch, chosen, warmup, repeats)


if __name__ == "__main__":
    main()
