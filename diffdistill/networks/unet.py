"""DDPM++ / NCSN++ U-Net (Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", App. H) and the layers it shares with the ADM network of `adm.py`.

Checkpoint compatibility is the one thing taken from EDM (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): module names, parameter names and tensor shapes equal those of EDM's
networks, so `diffdistill.teachers.edm` copies an EDM checkpoint tensor by tensor and GDD-I's name-based freezing
(Zheng & Yang 2024; `--freeze` of the official GDD train.py) selects the same layers. Structure and code are
written here from the papers.

Backbone convention: `forward(x_in [B,C,H,W], c_noise [B], class_labels [B,L] one-hot or None,
augment_labels [B,A] or None) -> [B,C_out,H,W]`; `config()` returns {'name': 'unet', **constructor kwargs}.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------
# Initial values


@dataclass(frozen=True)
class Init:
    """Initial values of a layer: a base distribution times `weight_gain` (weights) or `bias_gain` (biases).

    Base distributions, with the layer's fan counts (a convolution's count its kernel taps):
    xavier_uniform U(+-sqrt(6 / (fan_in + fan_out))) (Glorot & Bengio 2010), kaiming_uniform U(+-sqrt(3 / fan_in)),
    kaiming_normal N(0, 1 / fan_in) (He et al. 2015). A gain of 0 gives zeros and draws no random numbers.
    """

    mode: str = "kaiming_normal"
    weight_gain: float = 1.0
    bias_gain: float = 0.0

    def __post_init__(self):
        if self.mode not in ("xavier_uniform", "kaiming_uniform", "kaiming_normal"):
            raise ValueError(f"unknown init mode {self.mode!r}")

    def sample(self, shape: tuple[int, ...], fan_in: int, fan_out: int, gain: float) -> Tensor:
        if gain == 0:
            return torch.zeros(shape)
        if self.mode == "kaiming_normal":
            return torch.empty(shape).normal_(0, math.sqrt(1 / fan_in)) * gain
        limit = math.sqrt(6 / (fan_in + fan_out)) if self.mode == "xavier_uniform" else math.sqrt(3 / fan_in)
        return torch.empty(shape).uniform_(-limit, limit) * gain


def _weight_and_bias(module: nn.Module, weight_shape: tuple[int, ...], bias: bool, init: Init) -> None:
    """Give `module` parameters `weight` [out, in, *kernel] and (if `bias`) `bias` [out], in that order."""
    taps = math.prod(weight_shape[2:])
    fan_in, fan_out = weight_shape[1] * taps, weight_shape[0] * taps
    module.weight = nn.Parameter(init.sample(weight_shape, fan_in, fan_out, init.weight_gain))
    module.bias = nn.Parameter(init.sample(weight_shape[:1], fan_in, fan_out, init.bias_gain)) if bias else None


# --------------------------------------------------------------------------------------------------
# Layers. Parameters and buffers are called weight, bias, resample_filter and freqs, as in EDM's checkpoints.


class Linear(nn.Module):
    """Affine map y = x W^T + b, computed in the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init | None = None):
        super().__init__()
        self.in_features = in_features
        _weight_and_bias(self, (out_features, in_features), bias, init or Init())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _fir_kernel(taps) -> Tensor:
    """The separable 2-D FIR filter [1, 1, k, k] of the 1-D taps, scaled to unit DC gain."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Conv2d(nn.Module):
    """A kernel x kernel convolution (kernel 0: none), preceded by FIR resampling by 2 when `up` or `down`.

    Upsampling is a transposed depthwise convolution with the filter (zero insertion, then filtering, with gain 4
    so that constants stay constant); downsampling is a strided depthwise filtering. With taps [1, 1] these are
    nearest-neighbour upsampling and 2x2 average pooling; NCSN++ uses [1, 3, 3, 1] (Song et al. 2021, App. H,
    after StyleGAN2's FIR resampling, Karras et al. 2020).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), init: Init | None = None):
        super().__init__()
        if up and down:
            raise ValueError("a convolution cannot both up- and downsample")
        self.up, self.down = up, down
        self.weight = self.bias = None
        if kernel:
            _weight_and_bias(self, (out_channels, in_channels, kernel, kernel), bias, init or Init())
        resampling = up or down
        self.register_buffer("resample_filter", _fir_kernel(resample_filter) if resampling else None)
        self.filter_pad = (len(resample_filter) - 1) // 2 if resampling else 0

    def _depthwise_filter(self, x: Tensor) -> Tensor:
        """The FIR filter as the weight [C, 1, k, k] of a depthwise convolution over x's C channels."""
        return self.resample_filter.to(x.dtype).expand(x.shape[1], 1, -1, -1)

    def _add_bias(self, x: Tensor) -> Tensor:
        return x if self.bias is None else x + self.bias.to(x.dtype)[None, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = F.conv_transpose2d(x, self._depthwise_filter(x) * 4, stride=2, padding=self.filter_pad,
                                   groups=x.shape[1])
        elif self.down:
            x = F.conv2d(x, self._depthwise_filter(x), stride=2, padding=self.filter_pad, groups=x.shape[1])
        if self.weight is not None:
            x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2)
        return self._add_bias(x)


class ConvDown2d(Conv2d):
    """Convolution, then FIR downsampling by 2, with all the padding applied before the convolution.

    The residual input branch of NCSN++ (Song et al. 2021, App. H, "input skip" of type residual) uses this
    ordering: the convolution runs on the full-resolution map and the filter strides over its valid output.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 resample_filter=(1, 1), init: Init | None = None):
        if not kernel:
            raise ValueError("ConvDown2d needs a convolution kernel")
        super().__init__(in_channels, out_channels, kernel, bias=bias, down=True, resample_filter=resample_filter,
                         init=init)

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), padding=self.weight.shape[-1] // 2 + self.filter_pad)
        x = F.conv2d(x, self._depthwise_filter(x), stride=2, groups=x.shape[1])
        return self._add_bias(x)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over min(num_groups, C // min_channels_per_group) groups, so that
    narrow layers keep at least `min_channels_per_group` channels per group."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm needs >= {min_channels_per_group} channels, got {num_channels}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def _sinusoids(angles: Tensor, sin_first: bool) -> Tensor:
    parts = (angles.sin(), angles.cos()) if sin_first else (angles.cos(), angles.sin())
    return torch.cat(parts, dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of a scalar (Vaswani et al. 2017; DDPM, Ho et al. 2020; ADM): [cos(x w_k), sin(x w_k)]
    with w_k = (1/max_positions)^(k / (n - endpoint)), k < n = num_channels / 2; `sin_first` swaps the halves."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False,
                 sin_first: bool = False):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions
        self.endpoint, self.sin_first = endpoint, sin_first

    def forward(self, x: Tensor) -> Tensor:
        n = self.num_channels // 2
        exponents = torch.arange(n, dtype=torch.float32, device=x.device) / (n - int(self.endpoint))
        freqs = (1 / self.max_positions) ** exponents
        return _sinusoids(torch.outer(x, freqs.to(x.dtype)), self.sin_first)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020; NCSN++): [cos(2 pi f x), sin(2 pi f x)] with fixed
    frequencies f ~ N(0, scale^2) (buffer `freqs`, num_channels / 2 of them); `sin_first` swaps the halves."""

    def __init__(self, num_channels: int, scale: float = 16, sin_first: bool = False):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)
        self.sin_first = sin_first

    def forward(self, x: Tensor) -> Tensor:
        return _sinusoids(torch.outer(x, (2 * math.pi) * self.freqs.to(x.dtype)), self.sin_first)


class UNetBlock(nn.Module):
    """Pre-activation residual block with an embedding input, optional resampling and optional self-attention.

        main      GN -> SiLU -> conv3x3 (up/down) -> embedding -> GN -> SiLU -> dropout -> conv3x3
        shortcut  identity; FIR resampling and/or a 1x1 projection when the shape changes (or resample_proj)
        out       (main + shortcut) * skip_scale
        attention out = (proj(MHSA(qkv(GN(out)))) + out) * skip_scale

    The embedding enters as a per-channel bias before the second norm (DDPM++, Ho et al. 2020 / Song et al. 2021:
    adaptive_scale=False) or as the scale and shift after it, GN(h) * (1 + s) + b (ADM's adaptive group norm,
    Dhariwal & Nichol 2021 §3: adaptive_scale=True). Attention is softmax(q k^T / sqrt(c)) v over all pixels,
    per head of c channels; `num_heads = 0` turns it off.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter=(1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Init | None = None, init_zero: Init | None = None, init_attn: Init | None = None):
        super().__init__()
        init = init or Init()
        init_zero = init_zero or Init(weight_gain=0.0)
        resampling = dict(up=up, down=down, resample_filter=resample_filter)
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head

        # Parameters are created in this order (it fixes which random numbers each layer draws).
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, init=init, **resampling)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init=init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init=init_zero)
        new_width = in_channels != out_channels
        self.skip = None
        if new_width or up or down:
            self.skip = Conv2d(in_channels, out_channels, 1 if (new_width or resample_proj) else 0, init=init,
                               **resampling)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, 3 * out_channels, 1, init=init_attn or init)
            self.proj = Conv2d(out_channels, out_channels, 1, init=init_zero)

    def _inject(self, h: Tensor, emb: Tensor) -> Tensor:
        """The embedding's effect on the main branch, through the second norm and its activation."""
        per_channel = self.affine(emb)[:, :, None, None].to(h.dtype)
        if not self.adaptive_scale:
            return F.silu(self.norm1(h + per_channel))
        scale, shift = per_channel.chunk(2, dim=1)
        return F.silu(self.norm1(h) * (scale + 1) + shift)

    def _attend(self, qkv: Tensor) -> Tensor:
        """Multi-head self-attention over pixels; qkv [B, 3C, H, W] -> [B, C, H, W]."""
        batch, _, height, width = qkv.shape
        heads = self.num_heads
        channels = qkv.shape[1] // 3
        # The 3C channels are ordered (head, channel within the head, q/k/v); each of q, k, v: [B*heads, HW, C/heads].
        q, k, v = qkv.reshape(batch * heads, channels // heads, 3, -1).permute(2, 0, 3, 1).unbind(0)
        mixed = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(qkv.dtype)
        return mixed.transpose(1, 2).reshape(batch, channels, height, width)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shortcut = x if self.skip is None else self.skip(x)
        h = self._inject(self.conv0(F.silu(self.norm0(x))), emb)
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        out = (h + shortcut) * self.skip_scale
        if self.num_heads:
            out = (self.proj(self._attend(self.qkv(self.norm2(out)))) + out) * self.skip_scale
        return out


# --------------------------------------------------------------------------------------------------
# The U-Net trunk shared by DDPM++/NCSN++ (here) and ADM (adm.py)


@dataclass(frozen=True)
class _Level:
    """One resolution level of a U-Net; level 0 has the input's resolution, each next one half of it."""

    index: int
    res: int
    width: int          # channels of the level's residual blocks: model_channels * channel_mult[index]
    attention: bool     # res is one of attn_resolutions

    def key(self, role: str) -> str:
        """The level's module name for `role` (EDM's `{R}x{R}_{role}`)."""
        return f"{self.res}x{self.res}_{role}"


def _levels(img_resolution: int, model_channels: int, channel_mult, attn_resolutions) -> tuple[_Level, ...]:
    if not len(channel_mult):
        raise ValueError("channel_mult must list at least one resolution level")
    if img_resolution % (1 << (len(channel_mult) - 1)):
        raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
    return tuple(_Level(i, img_resolution >> i, model_channels * mult, (img_resolution >> i) in attn_resolutions)
                 for i, mult in enumerate(channel_mult))


class _UNetTrunk(nn.Module):
    """Encoder and decoder of the U-Net (Ronneberger et al. 2015) as used by DDPM (Ho et al. 2020, App. B),
    DDPM++/NCSN++ (Song et al. 2021, App. H) and ADM (Dhariwal & Nichol 2021, §3):

    - encoder, per level: a 3x3 stem convolution (level 0) or a downsampling block, then `num_blocks` residual
      blocks; every activation so produced is kept for the decoder;
    - decoder, per level from the coarsest: two blocks, the first with attention (coarsest level) or an upsampling
      block (others), then `num_blocks + 1` blocks, each fed with its input concatenated with the level's kept
      encoder activations, newest first.

    Subclasses set `_levels` and `num_blocks` and call `_build_trunk`. DDPM++/NCSN++ add modules next to the trunk:
    an input branch of the encoder (built by `input_branch` right after each downsampling block, run by
    `_merge_input_branch`) and per-level outputs of the decoder (built by `level_output` after a level's last
    block, run by `_level_output`); building them at those points puts them where EDM's checkpoints have them.
    """

    _levels: tuple[_Level, ...]
    num_blocks: int

    def _build_trunk(self, in_channels: int, stem_channels: int, block: dict, attend_all_decoder_blocks: bool,
                     input_branch: Callable[[_Level, list[int]], dict[str, nn.Module]] | None = None,
                     level_output: Callable[[_Level, int], dict[str, nn.Module]] | None = None) -> int:
        """Register `enc` and `dec`; returns the channel count of the decoder's last activation.

        input_branch(level, entry widths so far) and level_output(level, width of its last decoder block) return
        the extra modules to register at those points, by name.
        """
        n = self.num_blocks
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        entry = []      # entry[l]: channels of the activation that enters level l's residual blocks
        width = in_channels
        for lv in self._levels:
            if lv.index == 0:
                self.enc[lv.key("conv")] = Conv2d(width, stem_channels, 3, init=block["init"])
                width = stem_channels
            else:
                self.enc[lv.key("down")] = UNetBlock(width, width, down=True, **block)
            entry.append(width)
            if lv.index and input_branch is not None:
                self.enc.update(input_branch(lv, entry))
            for i in range(n):
                self.enc[lv.key(f"block{i}")] = UNetBlock(width, lv.width, attention=lv.attention, **block)
                width = lv.width

        # Decoder block i of a level takes the level's encoder activation n - i: a block output (lv.width
        # channels) for i < n, the entry activation for i = n.
        for lv in reversed(self._levels):
            if lv.index == len(self._levels) - 1:
                self.dec[lv.key("in0")] = UNetBlock(width, width, attention=True, **block)
                self.dec[lv.key("in1")] = UNetBlock(width, width, **block)
            else:
                self.dec[lv.key("up")] = UNetBlock(width, width, up=True, **block)
            for i in range(n + 1):
                kept = lv.width if i < n else entry[lv.index]
                attention = lv.attention and (attend_all_decoder_blocks or i == n)
                self.dec[lv.key(f"block{i}")] = UNetBlock(width + kept, lv.width, attention=attention, **block)
                width = lv.width
            if level_output is not None:
                self.dec.update(level_output(lv, width))
        return width

    def _merge_input_branch(self, lv: _Level, h: Tensor, branch: Tensor) -> tuple[Tensor, Tensor]:
        """(activation, input branch) after level lv's downsampling block; the branch starts as the input."""
        return h, branch

    def _level_output(self, lv: _Level, h: Tensor, out: Tensor | None) -> Tensor | None:
        """The network output so far after level lv of the decoder (None before any level made one)."""
        return out

    def _encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[list[Tensor]]]:
        """(bottleneck activation, the activations kept at each level)."""
        h = branch = x
        kept = []
        for lv in self._levels:
            if lv.index == 0:
                h = self.enc[lv.key("conv")](h)
            else:
                h, branch = self._merge_input_branch(lv, self.enc[lv.key("down")](h, emb), branch)
            level_kept = [h]
            for i in range(self.num_blocks):
                h = self.enc[lv.key(f"block{i}")](h, emb)
                level_kept.append(h)
            kept.append(level_kept)
        return h, kept

    def _decode(self, h: Tensor, kept: list[list[Tensor]], emb: Tensor) -> tuple[Tensor, Tensor | None]:
        """(last activation, output from `_level_output`)."""
        out = None
        for lv in reversed(self._levels):
            if lv.index == len(self._levels) - 1:
                h = self.dec[lv.key("in1")](self.dec[lv.key("in0")](h, emb), emb)
            else:
                h = self.dec[lv.key("up")](h, emb)
            for i, skip in enumerate(reversed(kept[lv.index])):
                h = self.dec[lv.key(f"block{i}")](torch.cat([h, skip], dim=1), emb)
            out = self._level_output(lv, h, out)
        return h, out


# --------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++


class UNet(_UNetTrunk):
    """The DDPM++ / NCSN++ family (Song et al. 2021, App. H), in the configurations EDM trains.

    DDPM++: positional noise embedding, plain encoder, [1, 1] resampling. NCSN++: random Fourier features, a residual
    input branch (the image, downsampled alongside the encoder and merged into it at each level) and [1, 3, 3, 1]
    FIR resampling. The skip encoder adds a 1x1 projection of the downsampled image at each level; the skip decoder
    emits an output at every level and sums them, upsampling the coarser sum (progressive growing, StyleGAN2).
    Blocks add the embedding as a bias, scale the residual sum by sqrt(1/2) and attend with one head.
    Module names are EDM's: `map_*`, `enc.{R}x{R}_{conv,down,blockN,aux_*}`, `dec.{R}x{R}_{in0,in1,up,blockN,aux_*}`.
    """

    def __init__(
        self,
        img_resolution: int,                 # input/output resolution (H = W)
        in_channels: int,                    # channels of x_in
        out_channels: int,                   # channels of the output
        label_dim: int = 0,                  # number of classes (0 = unconditional)
        augment_dim: int = 0,                # augmentation-label size (EDM's augment pipe: 9; 0 = none)
        model_channels: int = 128,           # base channel count
        channel_mult=(1, 2, 2, 2),           # channel multiplier per resolution level
        channel_mult_emb: int = 4,           # embedding width = model_channels * this
        num_blocks: int = 4,                 # residual blocks per level
        attn_resolutions=(16,),              # resolutions with self-attention
        dropout: float = 0.10,               # dropout inside residual blocks
        label_dropout: float = 0.0,          # training-time class-label dropout (classifier-free guidance)
        embedding_type: str = "positional",  # noise embedding: positional (DDPM++) | fourier (NCSN++)
        channel_mult_noise: int = 1,         # noise embedding width = model_channels * this (NCSN++: 2)
        encoder_type: str = "standard",      # standard (DDPM++) | residual (NCSN++) | skip
        decoder_type: str = "standard",      # standard | skip
        resample_filter=(1, 1),              # FIR taps for up/downsampling ([1,3,3,1] for NCSN++)
    ):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "residual", "skip"):
            raise ValueError(f"encoder_type must be standard, residual or skip, got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be standard or skip, got {decoder_type!r}")
        self._levels = _levels(img_resolution, model_channels, channel_mult, attn_resolutions)
        self._config = dict(
            img_resolution=int(img_resolution), in_channels=int(in_channels), out_channels=int(out_channels),
            label_dim=int(label_dim), augment_dim=int(augment_dim), model_channels=int(model_channels),
            channel_mult=[int(m) for m in channel_mult], channel_mult_emb=int(channel_mult_emb),
            num_blocks=int(num_blocks), attn_resolutions=[int(r) for r in attn_resolutions],
            dropout=float(dropout), label_dropout=float(label_dropout), embedding_type=embedding_type,
            channel_mult_noise=int(channel_mult_noise), encoder_type=encoder_type, decoder_type=decoder_type,
            resample_filter=[int(t) for t in resample_filter])
        self.num_blocks, self.encoder_type, self.decoder_type = num_blocks, encoder_type, decoder_type
        self.label_dim, self.label_dropout = label_dim, label_dropout

        # Song et al.'s initialisation: Xavier-uniform everywhere, weights of the layers that close a residual
        # branch (and of the output) scaled to ~0, attention qkv with gain sqrt(0.2).
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight_gain=1e-5)
        init_attn = Init("xavier_uniform", weight_gain=math.sqrt(0.2))

        # Mapping network: noise embedding (+ class + augmentation labels) -> two SiLU layers.
        noise_width, emb_width = model_channels * channel_mult_noise, model_channels * channel_mult_emb
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_width, endpoint=True, sin_first=True)
        else:
            self.map_noise = FourierEmbedding(noise_width, sin_first=True)
        self.map_label = Linear(label_dim, noise_width, init=init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_width, bias=False, init=init) if augment_dim else None
        self.map_layer0 = Linear(noise_width, emb_width, init=init)
        self.map_layer1 = Linear(emb_width, emb_width, init=init)

        def input_branch(lv: _Level, entry: list[int]) -> dict[str, nn.Module]:
            if encoder_type == "skip":      # the image at the level's resolution, projected to the level's width
                return {lv.key("aux_down"): Conv2d(in_channels, in_channels, 0, down=True,
                                                   resample_filter=resample_filter),
                        lv.key("aux_skip"): Conv2d(in_channels, entry[-1], 1, init=init)}
            if encoder_type == "residual":  # the previous level's merged activation (into level 1: the image)
                source = in_channels if lv.index == 1 else entry[-2]
                return {lv.key("aux_residual"): ConvDown2d(source, entry[-1], 3, resample_filter=resample_filter,
                                                           init=init)}
            return {}

        def level_output(lv: _Level, width: int) -> dict[str, nn.Module]:
            if not (decoder_type == "skip" or lv.index == 0):
                return {}
            head = {}
            if decoder_type == "skip" and lv.index < len(self._levels) - 1:   # the coarser levels' sum
                head[lv.key("aux_up")] = Conv2d(out_channels, out_channels, 0, up=True,
                                                resample_filter=resample_filter)
            head[lv.key("aux_norm")] = GroupNorm(width, eps=1e-6)
            head[lv.key("aux_conv")] = Conv2d(width, out_channels, 3, init=init_zero)
            return head

        block = dict(emb_channels=emb_width, num_heads=1, dropout=float(dropout), skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)
        self._build_trunk(in_channels, model_channels, block, attend_all_decoder_blocks=False,
                          input_branch=input_branch, level_output=level_output)

    def config(self) -> dict:
        """{'name': 'unet', **constructor kwargs} (JSON)."""
        return dict(name="unet", **copy.deepcopy(self._config))

    # Running the input branch (skip / residual encoders) and the per-level outputs (skip decoder; level 0 always).

    def _merge_input_branch(self, lv: _Level, h: Tensor, branch: Tensor) -> tuple[Tensor, Tensor]:
        if self.encoder_type == "skip":
            branch = self.enc[lv.key("aux_down")](branch)
            return h + self.enc[lv.key("aux_skip")](branch), branch
        if self.encoder_type == "residual":
            h = (h + self.enc[lv.key("aux_residual")](branch)) / math.sqrt(2)
            return h, h
        return h, branch

    def _level_output(self, lv: _Level, h: Tensor, out: Tensor | None) -> Tensor | None:
        if lv.key("aux_conv") not in self.dec:
            return out
        if out is not None:
            out = self.dec[lv.key("aux_up")](out)
        level_out = self.dec[lv.key("aux_conv")](F.silu(self.dec[lv.key("aux_norm")](h)))
        return level_out if out is None else level_out + out

    def _embedding(self, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        """The mapping network; the sinusoids come as [sin, cos] (Song et al.'s order)."""
        emb = self.map_noise(c_noise)
        if self.map_label is not None:
            # No labels = all-zero one-hot rows (EDM's wrappers pass zeros; map_label then adds its bias).
            labels = (torch.zeros(emb.shape[0], self.label_dim, device=emb.device, dtype=emb.dtype)
                      if class_labels is None else class_labels.to(emb.dtype))
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self._embedding(c_noise.to(x.dtype).reshape(-1), class_labels, augment_labels)
        h, kept = self._encode(x, emb)
        return self._decode(h, kept, emb)[1]


# --------------------------------------------------------------------------------------------------
# Presets. Expected quality is noted where a reference number exists.

UNET_PRESETS: dict[str, dict] = {
    # Tests: ~45k parameters at 8x8; a forward pass takes milliseconds on CPU.
    "tiny": dict(model_channels=8, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                 attn_resolutions=[4], dropout=0.0),
    # 8x8 grey `digits` (sklearn): ~0.26M parameters, trains in minutes on CPU.
    "digits": dict(model_channels=16, channel_mult=[1, 2], channel_mult_emb=4, num_blocks=2,
                   attn_resolutions=[4], dropout=0.0),
    # MNIST at its native 28x28: levels 28 -> 14 -> 7, ~1.75M parameters.
    "mnist": dict(model_channels=32, channel_mult=[1, 2, 2], channel_mult_emb=4, num_blocks=2,
                  attn_resolutions=[7], dropout=0.1),
    # 32x32 RGB on a CPU (a laptop-sized CIFAR-10 teacher): levels 32 -> 16 -> 8, ~1.26M parameters.
    "cifar10-small": dict(model_channels=32, channel_mult=[1, 2, 2], channel_mult_emb=4, num_blocks=1,
                          attn_resolutions=[8], dropout=0.1),
    # EDM's DDPM++ CIFAR-10 config (EDM's train.py --arch=ddpmpp): 55.73M parameters (unconditional, no augment
    # labels); Karras et al. 2022 report FID 1.79 cond / 1.97 uncond with EDM training and 18-step Heun.
    "cifar10": dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                    attn_resolutions=[16], dropout=0.13, embedding_type="positional", channel_mult_noise=1,
                    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
    # NCSN++ variant of the same recipe (--arch=ncsnpp): 56.40M parameters.
    "cifar10-ncsnpp": dict(model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
                           attn_resolutions=[16], dropout=0.13, embedding_type="fourier",
                           channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                           resample_filter=[1, 3, 3, 1]),
}


def unet_preset(name: str, img_resolution: int, in_channels: int, label_dim: int = 0, **overrides) -> UNet:
    """A UNet from a named preset (`UNET_PRESETS`) for the given image size; `overrides` replace fields."""
    if name not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {name!r} (known: {', '.join(UNET_PRESETS)})")
    kwargs = dict(UNET_PRESETS[name], **overrides)
    return UNet(img_resolution=img_resolution, in_channels=in_channels, out_channels=in_channels,
                label_dim=label_dim, **kwargs)
