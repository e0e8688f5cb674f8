"""A toy network, as a user would add one: one file (this) plus one registry line (`NETWORKS["ToyNet"] = ToyNet`).

Two 3x3 convolutions around a SiLU, conditioned on the noise label (and on augmentation labels, since EDM's
recipe augments) by a per-channel shift; its preset `toy-s` names it for train.py --arch. It is made of torch's
own layers: training builds it under `torch_utils.rng.network_draws` with a generator seeded from --seed, so its
initial weights (and dropout masks) are a function of the seed all the same.
"""

from __future__ import annotations

import torch
from torch import nn

from dnnlib.util import records_init_kwargs
from training.networks.base import Network, Preset


@records_init_kwargs
class ToyNet(Network, nn.Module):
    """F_theta(x, noise_labels, class_labels=None, augment_labels=None) of two convolutions."""

    presets = {"toy-s": Preset(dict(model_channels=8), resolution=8)}
    short_name = "toy"

    @classmethod
    def check(cls, config: dict) -> None:
        """Toy networks stay small."""
        if config["model_channels"] > 64:
            raise ValueError(f"ToyNet takes model_channels <= 64, got {config['model_channels']}")

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 16, dropout: float = 0.0, label_dropout: float = 0.0):
        super().__init__()
        self.dropout = float(dropout)
        self.conv0 = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.conv1 = nn.Conv2d(model_channels, out_channels, 3, padding=1)
        self.noise = nn.Parameter(torch.randn(model_channels) * 0.1)
        self.augment = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.label = nn.Linear(label_dim, model_channels, bias=False) if label_dim else None

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        shift = noise_labels.reshape(-1, 1) * self.noise
        if self.augment is not None and augment_labels is not None:
            shift = shift + self.augment(augment_labels)
        if self.label is not None and class_labels is not None:
            shift = shift + self.label(class_labels)
        h = torch.nn.functional.silu(self.conv0(x) + shift[:, :, None, None].to(x.dtype))
        return self.conv1(torch.nn.functional.dropout(h, self.dropout, self.training))
