"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Sec. 2, App. B and Fig. 21) as `EDM2UNet`.

Every layer keeps the expected magnitude of its activations (and of its weights) at one:

- `MPConv`: convolution / fully connected layer whose weights are normalised per output channel and scaled by
  1 / sqrt(fan_in) (Eq. 47); in training mode it also rewrites its stored weights to unit magnitude before each
  use, the forced weight normalisation of Eq. 66 (no weight decay is then needed). No biases anywhere.
- `mp_silu` (Eq. 81), `mp_sum` (Eq. 88), `mp_cat` (Eq. 103), `MPFourier` features (Eq. 75), pixel norm of the
  encoder's main path (in place of group normalisation) and of the attention's queries, keys and values
  (cosine attention).
- The output is scaled by a learned `out_gain`, each block's embedding modulation (1 + ...) by a learned
  `emb_gain`, both zero at initialisation: the untrained network outputs zero and modulates by one.

Interoperability with EDM2 (NVlabs/edm2, `training/networks_edm2.py`): the constructor takes EDM2's `UNet`
keywords and its block keywords (`resample_filter`, `channels_per_head`, `dropout`, `res_balance`,
`attn_balance`, `clip_act`), and the state_dict keys and shapes are EDM2's, in EDM2's order (`out_gain`,
`emb_fourier.{freqs,phases}`, `emb_noise.weight`, `emb_label.weight`, `enc.64x64_conv.weight`,
`enc.<res>_block<i>.{emb_gain,conv_res0,emb_linear,conv_res1,conv_skip,attn_qkv,attn_proj}.*`, `dec.*`,
`out_conv.weight`), so the weights of EDM2's `Precond.unet` load by key. This project's registry passes
`in_channels`/`out_channels` where EDM2 has one `img_channels` (EDM2: in_channels = out_channels = img_channels);
the first convolution sees in_channels + 1 channels (a constant-one channel is appended, as in EDM2).
Two differences of interface, no difference of function:
- `augment_dim` must be 0 (EDM2 has no augmentation conditioning) and `augment_labels` must be None;
- `label_dropout` (default 0, EDM2's behaviour) zeroes whole label vectors in training for classifier-free
  guidance; a zero label vector is EDM2's "no label" input (its Precond feeds zeros for missing labels).

Precision, as in EDM2: the network runs in the dtype of its input x (EDM2's fp16 mode feeds float16 images).
The noise and label embedding stays in float32 (for float32 noise labels); weights are normalised in float32 and
then cast; norms accumulate in float32; block outputs are clipped to +-clip_act (256) so that float16 cannot
overflow. A float64 network computes everything in float64.

Presets (`EDM2UNet.presets`, `--arch=edm2-xs` ... `edm2-xxl`): EDM2's sizes, which differ only
in model_channels (128, 192, 256, 320, 384, 448) and dropout (0, 0, 0.1, 0.1, 0.1, 0.1); the rest is this class's
defaults (channel_mult 1,2,3,4, three blocks per level, attention at 16x16 and 8x8). EDM2's ImageNet 64x64
pixel presets and its 512x512 latent presets (a 64x64x4 latent) build the same network apart from the channels;
EDM2 has no 64x64 XXL, so `edm2-xxl` takes the latent preset's width and dropout.
At 32x32 the presets are used unchanged ("same presets, four levels"): levels 32, 16, 8, 4 with attention at
16x16 and 8x8, the layout of DDPM's CIFAR-10 U-Net (Ho et al. 2020: four levels down to 4x4, attention at
16x16). Attention then sits one level higher (narrower) than at 64x64, so XS has 119,205,797 parameters there
instead of 124,710,821 (3 channels, 1000 classes); `--attn=8,4` gives exactly the 64x64 network instead (attention
on the two lowest levels, a quarter of its FLOPs). Below 16x16, pass attn_resolutions (and fewer levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dnnlib.util import records_init_kwargs
from training.networks.base import Network, Preset
from training.networks.layers import label_input, self_attention

RESAMPLE_MODES = ("keep", "up", "down")


def normalize(x: torch.Tensor, dim: int | Sequence[int] | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x / (eps + rms(x)) over `dim` (default: all but the first), the rms accumulated in at least float32."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    acc = torch.promote_types(x.dtype, torch.float32)
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=acc)
    count = x.numel() // max(norm.numel(), 1)
    return x / (norm * (1 / math.sqrt(count)) + eps).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU, silu(x) / 0.596 (Eq. 81: E[silu(z)^2]^(1/2) = 0.5967 for z ~ N(0, 1))."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 - t) a + t b) / sqrt((1 - t)^2 + t^2): the blend of two unit-magnitude tensors, unit again (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along `dim` weighting a by (1 - t) and b by t, keeping unit magnitude (Eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(n_a)), b * (scale * t / math.sqrt(n_b))], dim=dim)


def resample(x: torch.Tensor, mode: str, taps: Sequence[float] = (1, 1)) -> torch.Tensor:
    """2x up- or downsampling with the separable FIR filter `taps` (normalised to unit sum), or x for 'keep'."""
    if mode == "keep":
        return x
    if len(taps) == 2 and taps[0] == taps[1]:  # the box filter: 2x2 average pooling / nearest upsampling exactly
        return F.avg_pool2d(x, 2) if mode == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
    f = torch.as_tensor(taps, dtype=x.dtype, device=x.device)
    f = (torch.outer(f, f) / f.sum().square()).expand(x.shape[1], 1, -1, -1)
    pad = (len(taps) - 1) // 2
    if mode == "down":
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=pad)
    return F.conv_transpose2d(x, 4 * f, groups=x.shape[1], stride=2, padding=pad)  # gain 4 keeps constants


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features sqrt(2) cos(2 pi (f_i x + phi_i)), f_i ~ N(0, bandwidth^2),
    phi_i ~ U(0, 1) (Eq. 75); buffers `freqs` = 2 pi f and `phases` = 2 pi phi as in EDM2's state_dict."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.num_channels = int(num_channels)
        self.register_buffer("freqs", 2 * math.pi * bandwidth * torch.randn(num_channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B] -> [B, num_channels] in x's dtype, evaluated in at least float32."""
        acc = torch.promote_types(x.dtype, torch.float32)
        y = torch.outer(x.to(acc), self.freqs.to(acc)) + self.phases.to(acc)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or fully connected layer (kernel []), no bias (Eq. 47).

    The weight used is gain * w_i / (||w_i|| / sqrt(fan_in) + eps) / sqrt(fan_in) per output channel i; in
    training mode the stored weight is first replaced by its normalised self (forced weight normalisation,
    Eq. 66), so that its magnitude cannot drift and the effective learning rate stays put.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.weight = nn.Parameter(torch.randn(self.out_channels, self.in_channels, *kernel))

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Apply the layer to x in x's dtype (weights normalised in at least float32)."""
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(acc)))  # Eq. 66
        w = self.weight.to(acc)
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))  # Eq. 47
        w = w.to(x.dtype)
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel={list(self.weight.shape[2:])}"


class MPBlock(nn.Module):
    """EDM2's encoder or decoder block (Fig. 21): resampling, residual branch modulated by the embedding,
    magnitude-preserving sums, optional self-attention with pixel-normalised q, k, v, activation clipping.

    Encoder ('enc'): the main path is resampled, projected by a 1x1 conv when the width changes and pixel-
    normalised, then the residual branch starts from it. Decoder ('dec'): the residual branch starts from the
    (concatenated) input and the 1x1 projection acts on the main path only where the branches meet.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str = "enc",
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        if flavor not in ("enc", "dec") or resample_mode not in RESAMPLE_MODES:
            raise ValueError(f"flavor must be enc or dec and resample_mode one of {RESAMPLE_MODES}, got {flavor!r}, "
                             f"{resample_mode!r}")  # fmt: skip
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.flavor, self.resample_mode = flavor, resample_mode
        self.resample_filter = [float(t) for t in resample_filter]
        # As in EDM2: fewer channels than one head means no attention (build_network refuses that configuration).
        self.num_heads = out_channels // channels_per_head if attention else 0
        if self.num_heads and out_channels % self.num_heads:
            raise ValueError(
                f"attention over {out_channels} channels cannot be split into {self.num_heads} heads "
                f"(channels_per_head={channels_per_head}); choose widths divisible by their head count"
            )
        self.dropout = float(dropout)
        self.res_balance, self.attn_balance = float(res_balance), float(attn_balance)
        self.clip_act = None if clip_act is None else float(clip_act)
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W]; emb: [B, emb_channels] (cast to x's dtype after the modulation)."""
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm of the main path
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # learned gain, zero at init: scale 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            qkv = self.attn_qkv(x)
            B, _, H, W = qkv.shape
            # Pixel norm of each head's q, k and v (channel layout (head, channel, {q, k, v}), as EDM's).
            qkv = normalize(qkv.reshape(B, self.num_heads, -1, 3, H * W), dim=2).reshape(B, -1, H, W)
            x = mp_sum(x, self.attn_proj(self_attention(qkv, self.num_heads)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


@records_init_kwargs
class EDM2UNet(Network, nn.Module):
    """EDM2's U-Net: F_theta(x, noise_labels, class_labels, augment_labels=None) (module docstring)."""

    # EDM2's sizes XS-XXL (Karras et al. 2024; NVlabs/edm2's presets edm2-img64-*, XXL from edm2-img512-xxl): width
    # and dropout, the rest this class's defaults; each trains with EDM2's recipe at EDM2's learning rate for its size.
    presets = {f"edm2-{size}": Preset(dict(model_channels=channels, dropout=dropout), training=dict(lr=lr), resolution=64)
               for size, channels, dropout, lr in [("xs", 128, 0.0, 0.0120), ("s", 192, 0.0, 0.0100),
                                                   ("m", 256, 0.1, 0.0090), ("l", 320, 0.1, 0.0080),
                                                   ("xl", 384, 0.1, 0.0070), ("xxl", 448, 0.1, 0.0065)]}
    recipe = "edm2"
    short_name = "edm2"

    @classmethod
    def run_name(cls, kwargs: dict) -> str:
        """The preset of this width (edm2-s, ...), or edm2 for a width of no preset."""
        width = kwargs.get("model_channels")
        return next((name for name, preset in cls.presets.items() if preset.kwargs["model_channels"] == width), "edm2")

    @classmethod
    def head_channels(cls, config: dict) -> int:
        """`channels_per_head`."""
        return config["channels_per_head"]

    @classmethod
    def check(cls, config: dict) -> None:
        """EDM2 has no augmentation conditioning: augment_dim must be 0."""
        if config["augment_dim"]:
            raise ValueError(f"EDM2UNet takes no augmentation labels (augment_dim={config['augment_dim']}); train it "
                             "with --augment=0")

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        label_dropout: float = 0.0,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ):
        super().__init__()
        if augment_dim:  # built directly; through training.networks the check (`check`) names the flag
            raise ValueError(f"augment_dim must be 0: EDM2UNet takes no augmentation labels, got {augment_dim}")
        balances = dict(label_balance=label_balance, concat_balance=concat_balance, res_balance=res_balance,
                        attn_balance=attn_balance)  # fmt: skip
        outside = {k: v for k, v in balances.items() if not 0 <= v <= 1}
        if outside or len(resample_filter) % 2 or (clip_act is not None and not clip_act > 0):
            raise ValueError(f"the balances must lie in [0, 1] (got {outside or balances}), resample_filter must have "
                             f"an even number of taps (got {list(resample_filter)}) and clip_act be None or > 0 "
                             f"(got {clip_act})")  # fmt: skip
        self.img_resolution = int(img_resolution)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.label_dim = int(label_dim)
        self.label_dropout = float(label_dropout)
        self.label_balance, self.concat_balance = float(label_balance), float(concat_balance)
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        block_kwargs = dict(emb_channels=emb_channels, resample_filter=resample_filter,
                            channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                            attn_balance=attn_balance, clip_act=clip_act)  # fmt: skip
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding: Fourier features of the noise label, plus the class label, blended (Fig. 21).
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels)
        self.emb_label = MPConv(label_dim, emb_channels) if label_dim else None

        # Encoder: every module's output is a skip connection.
        self.enc = nn.ModuleDict()
        skips = []
        cout = self.in_channels + 1  # the constant-one channel
        for level, width in enumerate(widths):
            res = self.img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                self.enc[f"{tag}_conv"] = MPConv(cout, width, kernel=[3, 3])
                cout = width
            else:
                self.enc[f"{tag}_down"] = MPBlock(cout, cout, flavor="enc", resample_mode="down", **block_kwargs)
            skips.append(cout)
            for idx in range(num_blocks):
                block = MPBlock(cout, width, flavor="enc", attention=res in attn_resolutions, **block_kwargs)
                self.enc[f"{tag}_block{idx}"], cout = block, width
                skips.append(cout)

        # Decoder: two middle blocks (the first attends) or an up block, then num_blocks + 1 blocks each fed a skip.
        self.dec = nn.ModuleDict()
        self._dec_cat: list[bool] = []
        for level, width in reversed(list(enumerate(widths))):
            res = self.img_resolution >> level
            tag = f"{res}x{res}"
            if level == len(widths) - 1:
                self.dec[f"{tag}_in0"] = MPBlock(cout, cout, flavor="dec", attention=True, **block_kwargs)
                self.dec[f"{tag}_in1"] = MPBlock(cout, cout, flavor="dec", **block_kwargs)
                self._dec_cat += [False, False]
            else:
                self.dec[f"{tag}_up"] = MPBlock(cout, cout, flavor="dec", resample_mode="up", **block_kwargs)
                self._dec_cat.append(False)
            for idx in range(num_blocks + 1):
                attention = res in attn_resolutions
                block = MPBlock(cout + skips.pop(), width, flavor="dec", attention=attention, **block_kwargs)
                self.dec[f"{tag}_block{idx}"], cout = block, width
                self._dec_cat.append(True)
        assert not skips, "every encoder output must feed exactly one decoder block"
        self.out_conv = MPConv(cout, self.out_channels, kernel=[3, 3])

    def embedding(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """The conditioning vector [B, emb_channels] (float32 for float32 noise labels)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = label_input(class_labels, self.label_dim, emb.shape[0], emb, self.label_dropout, self.training)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance)
        return mp_silu(emb)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, in_channels, H, W]; noise_labels: [B]; returns [B, out_channels, H, W] in x's dtype."""
        if augment_labels is not None:
            raise ValueError("EDM2UNet has no augmentation conditioning: augment_labels must be None")
        emb = self.embedding(noise_labels, class_labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for module, cat in zip(self.dec.values(), self._dec_cat):
            if cat:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)
