"""DDPM++ and NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs") as parameterised in EDM.

One class covers both architectures; the constructor's keyword names and defaults are EDM's, so the
`_init_kwargs` stored in EDM / PFGM++ checkpoints can be passed in unchanged and the state_dict keys
(`map_noise`, `map_label`, `map_augment`, `map_layer0/1`, `enc.<res>x<res>_<name>`,
`dec.<res>x<res>_<name>`) match theirs.

- DDPM++: positional embedding, standard encoder and decoder, box resampling filter [1, 1].
- NCSN++: random Fourier embedding of twice the width, residual ("input skip") encoder, binomial
  resampling filter [1, 3, 3, 1].

Presets (train.py --arch): ddpmpp and ncsnpp at EDM's CIFAR-10 widths (Song et al. 2021, as configured by
Karras et al. 2022, Table 7).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dnnlib.util import records_init_kwargs
from training.networks.base import Network, Preset
from training.networks.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    label_input,
)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@records_init_kwargs
class SongUNet(Network, nn.Module):
    """The DDPM++ / NCSN++ U-Net: F_theta(x, noise_labels, class_labels, augment_labels)."""

    presets = {
        "ddpmpp": Preset(dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                              embedding_type="positional", encoder_type="standard", decoder_type="standard",
                              channel_mult_noise=1, resample_filter=[1, 1]), resolution=32),
        "ncsnpp": Preset(dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16],
                              embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                              channel_mult_noise=2, resample_filter=[1, 3, 3, 1]), resolution=32),
    }  # fmt: skip
    short_name = "song"

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        _check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        _check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        _check_choice("decoder_type", decoder_type, DECODER_TYPES)
        super().__init__()
        self.img_resolution = int(img_resolution)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.label_dim = int(label_dim)
        self.label_dropout = float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        # Song et al.'s initialisation: Glorot-uniform everywhere, near-zero output layers of each
        # residual branch (weight 1e-5), attention input projection scaled by sqrt(0.2).
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )  # fmt: skip

        # Mapping network: noise (+ label + augmentation) embedding -> two-layer MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        self._enc_plan: list[tuple[str, str]] = []  # (key, role) in execution order
        self._build_encoder(model_channels, channel_mult, num_blocks, attn_resolutions, encoder_type,
                            resample_filter, block_kwargs, init)  # fmt: skip
        self.dec = nn.ModuleDict()
        self._dec_plan: list[tuple[str, str]] = []
        self._build_decoder(model_channels, channel_mult, num_blocks, attn_resolutions, decoder_type,
                            resample_filter, block_kwargs, init_zero)  # fmt: skip

    def _add(self, where: str, key: str, role: str, module: nn.Module) -> None:
        getattr(self, where)[key] = module
        getattr(self, f"_{where}_plan").append((key, role))

    def _build_encoder(self, model_channels, channel_mult, num_blocks, attn_resolutions, encoder_type,
                       resample_filter, block_kwargs, init) -> None:  # fmt: skip
        """Encoder: per level a downsampling block (levels > 0) and num_blocks residual blocks."""
        cout = caux = self.in_channels
        self._skip_channels: list[int] = []
        for level, mult in enumerate(channel_mult):
            res = self.img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                cout = model_channels
                self._add("enc", f"{tag}_conv", "conv", Conv2d(self.in_channels, cout, kernel=3, **init))
                self._skip_channels.append(cout)
            else:
                self._add("enc", f"{tag}_down", "block", UNetBlock(cout, cout, down=True, **block_kwargs))
                self._skip_channels.append(cout)
                if encoder_type == "skip":  # progressive growing input (Karras et al. 2019; Song et al. 2021)
                    down = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self._add("enc", f"{tag}_aux_down", "aux_down", down)
                    self._add("enc", f"{tag}_aux_skip", "aux_skip", Conv2d(caux, cout, kernel=1, **init))
                if encoder_type == "residual":
                    conv = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                  fused_resample=True, **init)  # fmt: skip
                    self._add("enc", f"{tag}_aux_residual", "aux_residual", conv)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                block = UNetBlock(cin, cout, attention=res in attn_resolutions, **block_kwargs)
                self._add("enc", f"{tag}_block{idx}", "block", block)
                self._skip_channels.append(cout)
        self._bottom_channels = cout

    def _build_decoder(self, model_channels, channel_mult, num_blocks, attn_resolutions, decoder_type,
                       resample_filter, block_kwargs, init_zero) -> None:  # fmt: skip
        """Decoder: per level (from the lowest) an up block or the two middle blocks, num_blocks + 1
        blocks fed with the encoder's skips, and the output head(s)."""
        skips = list(self._skip_channels)
        cout = self._bottom_channels
        last = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = self.img_resolution >> level
            tag = f"{res}x{res}"
            if level == last:
                self._add("dec", f"{tag}_in0", "block", UNetBlock(cout, cout, attention=True, **block_kwargs))
                self._add("dec", f"{tag}_in1", "block", UNetBlock(cout, cout, **block_kwargs))
            else:
                self._add("dec", f"{tag}_up", "block", UNetBlock(cout, cout, up=True, **block_kwargs))
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self._add("dec", f"{tag}_block{idx}", "block_cat", UNetBlock(cin, cout, attention=attn, **block_kwargs))
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    c = self.out_channels
                    up = Conv2d(c, c, kernel=0, up=True, resample_filter=resample_filter)
                    self._add("dec", f"{tag}_aux_up", "aux_up", up)
                self._add("dec", f"{tag}_aux_norm", "aux_norm", GroupNorm(num_channels=cout, eps=1e-6))
                self._add("dec", f"{tag}_aux_conv", "aux_conv", Conv2d(cout, self.out_channels, kernel=3, **init_zero))
        assert not skips, "every encoder output must feed exactly one decoder block"

    def embedding(
        self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None, augment_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The conditioning vector [B, emb_channels] (float32 for float32 noise labels)."""
        emb = self.map_noise(noise_labels)
        B = emb.shape[0]
        emb = emb.reshape(B, 2, -1).flip(1).reshape(B, -1)  # [sin, cos] order of Song et al.'s code
        if self.map_label is not None:
            labels = label_input(class_labels, self.label_dim, B, emb, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

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
        aux = x
        for key, role in self._enc_plan:
            module = self.enc[key]
            if role == "aux_down":
                aux = module(aux)
            elif role == "aux_skip":
                x = skips[-1] = x + module(aux)
            elif role == "aux_residual":  # NCSN++ input skip, variance-preserving sum
                x = skips[-1] = aux = (x + module(aux)) * math.sqrt(0.5)
            else:
                x = module(x) if role == "conv" else module(x, emb)
                skips.append(x)
        out = None
        head = None
        for key, role in self._dec_plan:
            module = self.dec[key]
            if role == "aux_up":
                out = module(out)
            elif role == "aux_norm":
                head = module(x)
            elif role == "aux_conv":
                head = module(F.silu(head))
                out = head if out is None else head + out
            else:
                if role == "block_cat":
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out
