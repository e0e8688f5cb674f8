"""Building blocks of the DDPM++, NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021) U-Nets.

Parameter and buffer names, tensor layouts and weight-initialisation conventions follow the
parameterisation of EDM (Karras et al. 2022, Appendix F), so that state_dicts of networks trained
there load by key: Linear weight [out, in], Conv2d weight [out, in, k, k], GroupNorm weight/bias [C],
FIR resampling filter as the buffer `resample_filter` of shape [1, 1, k, k], Fourier frequencies as
the buffer `freqs`.

Mixed precision: every layer casts its parameters to the dtype of its input, so a network fed float16
runs in float16 (EDM's `use_fp16`) and one under autocast lets autocast choose. The timestep embedding
stays in float32 and each block casts its projection to the activations' dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A tensor of `shape` drawn from one of the Glorot (xavier_*) or He (kaiming_*) initialisations.

    Variances: xavier 2 / (fan_in + fan_out) (Glorot & Bengio 2010); kaiming 1 / fan_in (He et al.
    2015 without the ReLU gain, as EDM uses it). Uniform draws use the bound sqrt(3 * variance).
    """
    if mode not in INIT_MODES:
        raise ValueError(f"init_mode must be one of {', '.join(INIT_MODES)}; got {mode!r}")
    variance = 2.0 / (fan_in + fan_out) if mode.startswith("xavier") else 1.0 / max(fan_in, 1)
    if mode.endswith("uniform"):
        return math.sqrt(3.0 * variance) * (2.0 * torch.rand(*shape) - 1.0)
    return math.sqrt(variance) * torch.randn(*shape)


class Linear(nn.Module):
    """Fully connected layer y = x W^T + b with EDM's initialisation arguments."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        fans = dict(mode=init_mode, fan_in=self.in_features, fan_out=self.out_features)
        self.weight = nn.Parameter(weight_init([self.out_features, self.in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([self.out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer in the dtype of x."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(nn.Module):
    """2-D convolution ('same' padding) with optional 2x FIR up- or downsampling.

    `kernel=0` gives a pure resampling layer without weights. The resampling filter is the outer
    product of `resample_filter` with itself, normalised to unit sum: [1, 1] is the box filter (nearest
    upsampling / 2x2 average pooling, DDPM++), [1, 3, 3, 1] the binomial filter of NCSN++ (Song et
    al. 2021; Zhang 2019). `fused_resample` convolves and resamples in one strided step, as NCSN++'s
    residual encoder does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both upsample and downsample")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.up = bool(up)
        self.down = bool(down)
        self.fused_resample = bool(fused_resample)
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [self.out_channels, self.in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([self.out_channels], **fans) * init_bias) if kernel and bias else None
        taps = [float(t) for t in resample_filter]
        f = torch.as_tensor(taps, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if (up or down) else None)
        # The box filter [c, c] is exactly nearest upsampling / 2x2 average pooling: cheaper kernels
        # (the buffer is then not read; it is kept for the state_dict layout).
        self._box = len(taps) == 2 and taps[0] == taps[1] and taps[0] != 0

    def _up(self, x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
        """Transposed FIR upsampling by 2 (filter gain 4 keeps a constant image constant)."""
        if self._box and padding == 0:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        c = x.shape[1]
        return F.conv_transpose2d(x, (f * 4).expand(c, 1, -1, -1), groups=c, stride=2, padding=padding)

    def _down(self, x: torch.Tensor, f: torch.Tensor, padding: int) -> torch.Tensor:
        """FIR downsampling by 2 (depthwise filter, stride 2)."""
        if self._box and padding == 0:
            return F.avg_pool2d(x, 2)
        c = x.shape[1]
        return F.conv2d(x, f.expand(c, 1, -1, -1), groups=c, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Resample and/or convolve x in its own dtype."""
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv2d(self._up(x, f, w_pad + f_pad), w)
        elif self.fused_resample and self.down and w is not None:
            x = self._down(F.conv2d(x, w, padding=w_pad + f_pad), f, 0)
        else:
            if self.up:
                x = self._up(x, f, f_pad)
            if self.down:
                x = self._down(x, f, f_pad)
            if w is not None:
                x, b = F.conv2d(x, w, b, padding=w_pad), None  # the bias goes into the convolution
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x

    def extra_repr(self) -> str:
        k = self.weight.shape[-1] if self.weight is not None else 0
        return (
            f"{self.in_channels}, {self.out_channels}, kernel={k}, up={self.up}, down={self.down}, "
            f"fused_resample={self.fused_resample}"
        )


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) with min(num_groups, C // min_channels_per_group) groups.

    Runs in the input's dtype with weight and bias cast to it; the native CPU and CUDA kernels
    accumulate the group statistics in float32 for float16/bfloat16 inputs, so no explicit upcast
    is needed (tests/test_networks.py checks this against a float64 reference).
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1 or num_channels % self.num_groups != 0:
            raise ValueError(
                f"GroupNorm over {num_channels} channels: need at least {min_channels_per_group} channels and "
                f"a channel count divisible by the group count {max(self.num_groups, 1)}; choose model_channels "
                f"so that every level's width is a multiple of 4 (and of 32 from 128 channels on)"
            )
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise x over groups of channels and the spatial axes."""
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"


def self_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head self-attention over the pixels of a [B, 3C, H, W] qkv map, returning [B, C, H, W].

    Softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017) via scaled_dot_product_attention. Channel layout
    as in EDM's checkpoints: the 3C channels are ordered (head, channel within head, {q, k, v}).
    """
    B, C3, H, W = qkv.shape
    C = C3 // 3
    d = C // num_heads
    q, k, v = qkv.reshape(B, num_heads, d, 3, H * W).permute(3, 0, 1, 4, 2).unbind(0)  # [B, heads, HW, d]
    a = F.scaled_dot_product_attention(q, k, v)
    if qkv.is_contiguous(memory_format=torch.channels_last):  # keep the caller's layout (one copy either way)
        return a.permute(0, 2, 1, 3).reshape(B, H, W, C).permute(0, 3, 1, 2)
    return a.transpose(-1, -2).reshape(B, C, H, W)


class UNetBlock(nn.Module):
    """Residual block with timestep conditioning, optional 2x up/down-sampling and self-attention.

    The union of the DDPM++/NCSN++ block (additive conditioning, skip_scale sqrt(1/2); Song et al.
    2021) and the ADM block (adaptive group normalisation, scale and shift; Dhariwal & Nichol 2021).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
    ):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_weight=0) if init_zero is None else dict(init_zero)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.emb_channels = int(emb_channels)
        # As in EDM: with heads derived from channels_per_head, fewer channels than one head disables attention.
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = int(heads) if attention else 0
        if self.num_heads and out_channels % self.num_heads != 0:
            raise ValueError(f"attention over {out_channels} channels cannot be split into {self.num_heads} heads")
        self.dropout = float(dropout)
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = bool(adaptive_scale)

        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            attn_init = init_attn if init_attn is not None else init
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **attn_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [B, in_channels, H, W]; emb: [B, emb_channels] (any float dtype; cast to x's)."""
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:  # AdaGN (Dhariwal & Nichol 2021, Sec. 3): GroupNorm(h) (1 + scale) + shift
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:  # additive timestep conditioning (Ho et al. 2020; Song et al. 2021)
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            a = self_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding [cos(x w_i), sin(x w_i)], w_i = max_positions^(-i / (n/2 - endpoint)) (Vaswani et al.)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"PositionalEmbedding needs an even number of channels >= 2, got {num_channels}")
        self.num_channels = int(num_channels)
        self.max_positions = max_positions
        self.endpoint = bool(endpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B] noise labels -> [B, num_channels]."""
        half = self.num_channels // 2
        exponent = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** exponent
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)], f_i ~ N(0, scale^2) (Tancik et al. 2020; NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"FourierEmbedding needs an even number of channels >= 2, got {num_channels}")
        self.num_channels = int(num_channels)
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B] noise labels -> [B, num_channels]."""
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def label_input(
    class_labels: torch.Tensor | None, label_dim: int, batch: int, like: torch.Tensor, p: float, training: bool
) -> torch.Tensor:
    """Class-label vectors in the dtype of `like`: zeros when None; dropped with probability p in training.

    Dropping labels during training is classifier-free guidance's joint training of the conditional
    and unconditional model (Ho & Salimans 2022); the mask is drawn on the device, per sample.
    """
    if class_labels is None:
        labels = torch.zeros([1, label_dim], dtype=like.dtype, device=like.device)
    else:
        labels = class_labels.to(like.dtype).reshape(-1, label_dim)
    if training and p:
        keep = torch.rand([batch, 1], device=like.device) >= p
        labels = labels * keep.to(labels.dtype)
    return labels
