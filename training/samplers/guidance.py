"""Guidance (EDM2's generate_images.py; Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
Itself"): every solver samples with the denoiser D_w = D_g + w (D - D_g).

D is the network and D_g the guiding one: an unconditional model for classifier-free guidance, a smaller or
less-trained model of the same task for autoguidance, or the same network with its labels zeroed when it was
trained with label dropout (EDM-style zero label = unconditional). w = 1 is D itself (no wrapper, no extra
evaluation); w = 0 is D_g alone. A guided denoiser costs two network evaluations per call, which
`training.samplers.sample` counts. Any D: the guide must share D, resolution and channels with the network.
"""

from __future__ import annotations

import math

import torch

from training.pfgmpp import format_D


class Guided:
    """The denoiser D_g + w (D - D_g), with the network's own attributes (noise range, prior, D) for the solvers."""

    evaluations_per_call = 2

    def __init__(self, net, guide, weight: float):
        if not math.isfinite(float(weight)):
            raise ValueError(f"the guidance weight must be a finite number, got {weight}")
        self.net, self.guide, self.weight = net, guide, float(weight)

    def __getattr__(self, name: str):
        if name in ("net", "guide", "weight"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.net, name)

    def __repr__(self) -> str:
        guide = "its own unconditional output" if self.guide is self.net else type(self.guide).__name__
        return f"{type(self.net).__name__} guided by {guide} (w={self.weight:g})"

    def __call__(self, x: torch.Tensor, sigma, class_labels=None, **kwargs) -> torch.Tensor:
        denoised = self.net(x, sigma, class_labels, **kwargs)
        if self.guide is self.net:  # classifier-free guidance by one network: its output without labels
            labels = None if class_labels is None else torch.zeros_like(class_labels)
        else:
            labels = class_labels if self.guide.label_dim else None
        guided = self.guide(x, sigma, labels, **kwargs).to(denoised.dtype)
        return guided.lerp(denoised, self.weight)


def guided(net, guide, weight: float):
    """The network guided by `guide` (None: the network itself without labels) with weight w; w = 1: `net` itself.

    ValueError when the guide does not fit: another D, resolution or channel count, or self-guidance of a
    network that was not trained with label dropout.
    """
    if float(weight) == 1.0:
        return net
    if guide is None:
        if not net.label_dim or not getattr(net.model, "label_dropout", 0.0) > 0:
            raise ValueError("--guidance without --gnet guides a network with its own unconditional output, which needs "
                             "a conditional network trained with label dropout (train.py --cond=1 --label_dropout=0.1); "
                             "give the guiding network with --gnet")
        return Guided(net, net, weight)
    mismatch = [f"{name} {a} vs {b}" for name, a, b in (
        ("D", format_D(net.D), format_D(guide.D)), ("resolution", net.img_resolution, guide.img_resolution),
        ("channels", net.img_channels, guide.img_channels)) if a != b]
    if mismatch:
        raise ValueError(f"the guiding network does not fit the network ({', '.join(mismatch)}): guide with a network of "
                         "the same D, resolution and channels")
    if guide.label_dim and guide.label_dim != net.label_dim:
        raise ValueError(f"the guiding network has {guide.label_dim} classes and the network {net.label_dim}: a "
                         "conditional guide needs the same classes (or use an unconditional one)")
    return Guided(net, guide, weight)
