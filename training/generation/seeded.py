"""Seeded image generation from a trained network: what generate.py, `fid.py gen` and the metrics share.

Image k with seed s depends on s alone: its prior draw, its class label (when not fixed) and any
sampler noise come from a generator seeded with s on the sampling device, so the images are the
same whatever the batch size, the number of ranks or the order of the seeds. Ranks take whole
batches round robin; nothing here waits for other ranks. The sampler is any registered solver
(`training.samplers`), chosen by a `SamplerSettings`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import tqdm

from dnnlib import util
from torch_utils import distributed, rng
from torch_utils.precision import configure as configure_precision
from training import checkpoint, samplers
from training.generation import images, quantize
from training.pfgmpp import format_D
from training.samplers import SamplerSettings
from training.samplers.guidance import guided

SAMPLING_PRECISIONS = ("fp32", "tf32", "bf16")  # of the network during sampling (fp16 is a training mode)


@dataclass(frozen=True)
class Batch:
    """One batch of this rank's share: global positions, seeds, uint8 images [B, H, W, C] on the device, and
    the network evaluations the sampler made for it."""

    indices: list[int]
    seeds: list[int]
    images: torch.Tensor
    nfe: int = 0


def check_network_options(net, aug_dim: float | None = None, pfgmpp: bool | None = None, class_idx: int | None = None) -> None:
    """Reject options that contradict the network: a different D, --pfgmpp=0 on a PFGM++ net, a bad class."""
    D = float(net.D)
    if aug_dim is not None and float(aug_dim) != D:
        raise ValueError(
            f"the network was trained with D={format_D(D)} but --aug_dim={format_D(float(aug_dim))} was given; "
            "D and the prior come from the checkpoint: drop --aug_dim"
        )
    if pfgmpp is not None and bool(pfgmpp) != math.isfinite(D):
        raise ValueError(
            f"--pfgmpp={int(bool(pfgmpp))} contradicts the network (D={format_D(D)}); "
            "the checkpoint decides: drop --pfgmpp"
        )
    if class_idx is not None:
        if not net.label_dim:
            raise ValueError("--class was given but the network is unconditional; drop --class")
        if not 0 <= class_idx < net.label_dim:
            raise ValueError(f"--class={class_idx} is out of range: the network has classes 0-{net.label_dim - 1}")


def check_finite_weights(net, where: str) -> None:
    """ValueError when a parameter or buffer holds NaN or inf: such a network samples black images (or, with rk45,
    never ends) rather than failing. One check when the network is loaded (a single host sync)."""
    try:
        checkpoint.check_finite({**dict(net.named_parameters()), **dict(net.named_buffers())}, where)
    except ValueError as error:
        raise ValueError(f"{error}; it cannot sample. Was its training diverging? Use an earlier snapshot") from None


def check_image_shape(net, image_shape, where: str) -> None:
    """ValueError unless images of `image_shape` [C, H, W] (from `where`) are what the network takes."""
    expected = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    if list(image_shape) != expected:
        c, h, w = image_shape
        raise ValueError(f"the network takes {expected[2]}x{expected[1]} images with {expected[0]} channel(s) but {where} "
                         f"holds {w}x{h} with {c}; use data of the network's shape (dataset_tool.py --resolution, --channels)")


def load_guided(network: str, device, aug_dim: float | None = None, pfgmpp: bool | None = None,
                class_idx: int | None = None, gnet: str | None = None, guidance: float = 1.0,
                quantize_bits: int | None = None):
    """The network sampling uses: read from any supported file or URL (`checkpoint.load_network`), checked against
    the options that must agree with it, its weights (and the guide's) quantised to `quantize_bits` when given
    (`quantize.quantize`), and guided by `gnet` (or by itself, without labels) with weight `guidance`
    (`training.samplers.guidance`).

    Rank 0 reads (and for a URL downloads) it first; the other ranks then read the cached file.
    """
    net = distributed.main_first(lambda: checkpoint.load_network(network, device=device))
    check_finite_weights(net, network)
    check_network_options(net, aug_dim, pfgmpp, class_idx)
    net = quantize.quantize(net, quantize_bits)
    if float(guidance) == 1.0:
        return net  # D itself: the guide would cost an evaluation per call and change nothing
    guide = None if gnet is None else distributed.main_first(lambda: checkpoint.load_network(gnet, device=device))
    if guide is not None:
        check_finite_weights(guide, gnet)
    return guided(net, None if guide is None else quantize.quantize(guide, quantize_bits), guidance)


MAX_SEEDS = 100_000_000  # per call: a list of them is kept in memory, and so many images take days


def parse_seeds(text: str) -> list[int]:
    """'0-63,100' -> [0, ..., 63, 100]: distinct non-negative seeds below 2^63, at most MAX_SEEDS."""
    seeds = util.parse_int_list(text, max_count=MAX_SEEDS)
    if not seeds:
        raise ValueError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise ValueError("a seed is listed twice; each seed names one image")
    if max(seeds) >= 2**63:
        raise ValueError("seeds must be below 2^63")
    return seeds


def class_labels(net, generators: Sequence[torch.Generator], class_idx: int | None, device) -> torch.Tensor | None:
    """One-hot labels [B, label_dim]: class_idx for all, or one drawn uniformly from each seed's generator."""
    if not net.label_dim:
        return None
    if class_idx is None:
        u = rng.rand([len(generators)], generators, device=device, dtype=torch.float64)
        index = (u * net.label_dim).long().clamp_max(net.label_dim - 1)
    else:
        index = torch.full([len(generators)], int(class_idx), device=device)
    return torch.eye(net.label_dim, device=device)[index]


def sample_seeds(net, seeds: Sequence[int], device, settings: SamplerSettings,
                 class_idx: int | None = None) -> tuple[torch.Tensor, int]:
    """(float images [B, C, H, W] in about [-1, 1], network evaluations) for `seeds`, one generator per seed.

    Each seed's generator draws, in order: its prior latent, its class label (unless fixed), its sampler noise.
    """
    generators = rng.seeded_generators(seeds, device)
    latents = settings.prior_latents(net, generators, device=device)
    labels = class_labels(net, generators, class_idx, device)
    info = samplers.SampleInfo()
    x = settings.sample(net, latents, labels, generator=generators, info=info)
    return x, info.nfe


def generate(
    net,
    seeds: Sequence[int],
    batch_size: int,
    device,
    settings: SamplerSettings | None = None,
    class_idx: int | None = None,
    precision: str = "tf32",
    progress: bool = False,
) -> Iterator[Batch]:
    """This rank's share of `seeds`, batch by batch, quantised to uint8 exactly as the PNGs store them."""
    settings = settings or SamplerSettings()
    seeds = [int(s) for s in seeds]
    device = torch.device(device)
    batches = distributed.rank_batches(len(seeds), batch_size)
    context = configure_precision(precision, device, SAMPLING_PRECISIONS)
    bar = _progress(len(batches), progress and distributed.is_main())
    for positions in batches:
        batch_seeds = [seeds[i] for i in positions]
        with context:
            x, nfe = sample_seeds(net, batch_seeds, device, settings, class_idx)
        yield Batch(list(positions), batch_seeds, images.to_uint8(x), nfe)
        bar.update(1)
    bar.close()


def _progress(total: int, enabled: bool):
    """A tqdm bar over batches on rank 0, or a silent stand-in."""
    return tqdm.tqdm(total=total, unit="batch", disable=not enabled, dynamic_ncols=True)
