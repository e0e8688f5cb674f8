"""ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis") as parameterised in EDM.

Constructor keywords, defaults and state_dict keys follow EDM, so its `_init_kwargs` and checkpoints
carry over. The ADM block uses adaptive group normalisation (scale and shift from the embedding),
multi-head attention with 64 channels per head, and zero-initialised output layers of each residual
branch; class labels are embedded after the timestep MLP (Dhariwal & Nichol 2021, Sec. 3 and App. A).

Preset (train.py --arch): adm at its ImageNet-64 widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dnnlib.util import records_init_kwargs
from training.networks.base import Network, Preset
from training.networks.layers import Conv2d, GroupNorm, Linear, PositionalEmbedding, UNetBlock, label_input


@records_init_kwargs
class DhariwalUNet(Network, nn.Module):
    """The ADM U-Net: F_theta(x, noise_labels, class_labels, augment_labels)."""

    presets = {"adm": Preset(dict(model_channels=192, channel_mult=[1, 2, 3, 4]), resolution=64)}
    short_name = "adm"
    HEAD_CHANNELS = 64  # ADM's attention heads

    @classmethod
    def head_channels(cls, config: dict) -> int:
        """ADM's heads have 64 channels."""
        return cls.HEAD_CHANNELS

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0, augment_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4), channel_mult_emb: int = 4,
                 num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8), dropout: float = 0.10,
                 label_dropout: float = 0.0):  # EDM's keywords, in EDM's order
        super().__init__()
        self.img_resolution = int(img_resolution)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.label_dim = int(label_dim)
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        # PyTorch's default layer init (kaiming-uniform with bound 1/sqrt(fan_in)) and zeroed output layers.
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels, channels_per_head=self.HEAD_CHANNELS, dropout=dropout, init=init, init_zero=init_zero
        )

        # Mapping network (registration order as in EDM).
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            if label_dim
            else None
        )

        # Encoder: every module's output is a skip connection.
        self.enc = nn.ModuleDict()
        skips = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                cout = model_channels * mult
                self.enc[f"{tag}_conv"] = Conv2d(in_channels, cout, kernel=3, **init)
            else:
                self.enc[f"{tag}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
                skips.append(cout)

        # Decoder: middle (or up) block, then num_blocks + 1 blocks that each take one skip.
        self.dec = nn.ModuleDict()
        self._dec_cat: list[bool] = []
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            tag = f"{res}x{res}"
            if level == len(channel_mult) - 1:
                self.dec[f"{tag}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{tag}_in1"] = UNetBlock(cout, cout, **block_kwargs)
                self._dec_cat += [False, False]
            else:
                self.dec[f"{tag}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
                self._dec_cat.append(False)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
                self._dec_cat.append(True)
        assert not skips, "every encoder output must feed exactly one decoder block"
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embedding(
        self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, augment_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The conditioning vector [B, emb_channels] (float32 for float32 noise labels)."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = label_input(class_labels, self.label_dim, emb.shape[0], emb, self.label_dropout, self.training)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, in_channels, H, W]; noise_labels: [B]; returns [B, out_channels, H, W] in x's dtype."""
        emb = self.embedding(noise_labels, class_labels, augment_labels)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block, cat in zip(self.dec.values(), self._dec_cat):
            if cat:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
