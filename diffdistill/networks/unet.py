"""DDPM++ / NCSN++ U-Net (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

Parameter names and tensor shapes follow EDM's `SongUNet` state_dict (Karras et al. 2022,
`training/networks.py`), so an EDM checkpoint maps 1:1 (`diffdistill.teachers.edm`) and GDD-I's name-based
freezing (algorithms.md §5.3) selects the same layers. The layers below are written here; only names,
shapes and the maths match EDM.

Backbone convention: `forward(x_in [B,C,H,W], c_noise [B], class_labels [B,L] one-hot or None) -> [B,C,H,W]`;
`config()` returns {'name': 'unet', **constructor kwargs}.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------
# Initialisation: EDM draws weights from a scaled uniform/normal and multiplies by a per-layer gain.


def _init_tensor(shape, mode: str, fan_in: int, fan_out: int) -> Tensor:
    """xavier/kaiming, uniform/normal, with the fan counts given explicitly (convs count kernel taps)."""
    if mode == "xavier_uniform":
        bound = math.sqrt(6 / (fan_in + fan_out))
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "xavier_normal":
        return torch.empty(shape).normal_(0, math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        bound = math.sqrt(3 / fan_in)
        return torch.empty(shape).uniform_(-bound, bound)
    if mode == "kaiming_normal":
        return torch.empty(shape).normal_(0, math.sqrt(1 / fan_in))
    raise ValueError(f"unknown init mode {mode!r}")


class Init:
    """How a layer's weight and bias are drawn: `mode`, times `weight_gain` / `bias_gain`."""

    def __init__(self, mode: str = "kaiming_normal", weight_gain: float = 1.0, bias_gain: float = 0.0):
        self.mode, self.weight_gain, self.bias_gain = mode, weight_gain, bias_gain

    def draw(self, shape, fan_in: int, fan_out: int, gain: float) -> Tensor:
        if gain == 0:
            return torch.zeros(shape)
        return _init_tensor(shape, self.mode, fan_in, fan_out) * gain


# --------------------------------------------------------------------------------------------------
# Layers (names of parameters and buffers match EDM: weight, bias, resample_filter, freqs)


class Linear(nn.Module):
    """y = x W^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init | None = None):
        super().__init__()
        init = init or Init()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(init.draw((out_features, in_features), gain=init.weight_gain, **fans))
        self.bias = nn.Parameter(init.draw((out_features,), gain=init.bias_gain, **fans)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def _fir_kernel(taps) -> Tensor:
    """Separable 2-D FIR filter [1, 1, k, k] from 1-D taps, normalised to unit DC gain."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Conv2d(nn.Module):
    """kxk convolution (k=0: none) with optional FIR up/downsampling by 2 before it.

    `fused=True` applies the resampling and the convolution as one padded pair (NCSN++ residual encoder):
    conv then filter-and-stride for down, transposed filter then unpadded conv for up.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter=(1, 1), fused: bool = False, init: Init | None = None):
        super().__init__()
        if up and down:
            raise ValueError("a convolution cannot both up- and downsample")
        init = init or Init()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused = up, down, fused
        fans = dict(fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = self.bias = None
        if kernel:
            self.weight = nn.Parameter(init.draw((out_channels, in_channels, kernel, kernel),
                                                 gain=init.weight_gain, **fans))
            if bias:
                self.bias = nn.Parameter(init.draw((out_channels,), gain=init.bias_gain, **fans))
        self.register_buffer("resample_filter", _fir_kernel(resample_filter) if (up or down) else None)

    def _filter(self, x: Tensor, channels: int) -> Tensor:
        return self.resample_filter.to(x.dtype).expand(channels, 1, -1, -1)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        pad_w = 0 if w is None else w.shape[-1] // 2
        pad_f = 0 if self.resample_filter is None else (self.resample_filter.shape[-1] - 1) // 2
        if self.fused and w is not None and self.down:
            x = F.conv2d(x, w, padding=pad_w + pad_f)
            x = F.conv2d(x, self._filter(x, self.out_channels), stride=2, groups=self.out_channels)
        elif self.fused and w is not None and self.up:
            # The transposed filter carries gain 4 so that upsampling preserves the mean.
            x = F.conv_transpose2d(x, self._filter(x, self.in_channels) * 4, stride=2,
                                   padding=pad_w + pad_f, groups=self.in_channels)
            x = F.conv2d(x, w)
        else:
            if self.up:
                x = F.conv_transpose2d(x, self._filter(x, self.in_channels) * 4, stride=2, padding=pad_f,
                                       groups=self.in_channels)
            if self.down:
                x = F.conv2d(x, self._filter(x, self.in_channels), stride=2, padding=pad_f,
                             groups=self.in_channels)
            if w is not None:
                x = F.conv2d(x, w, padding=pad_w)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[None, :, None, None]
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

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


class PositionalEmbedding(nn.Module):
    """Sinusoids [cos(x w_k), sin(x w_k)], w_k = (1/max_positions)^(k/(n-endpoint)) (DDPM, ADM)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        k = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** k
        angles = x[:, None] * freqs.to(x.dtype)[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of NCSN++ (Tancik et al. 2020): frequencies ~ N(0, scale^2), a fixed buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = x[:, None] * (2 * math.pi * self.freqs.to(x.dtype))[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with embedding injection and optional up/down and self-attention.

    DDPM++/NCSN++ add the embedding as a bias (adaptive_scale=False); ADM uses it as scale and shift
    (adaptive_scale=True: h = norm(h) * (1 + scale) + shift, Dhariwal & Nichol 2021 §3).
    The attention is single-pass softmax(q^T k / sqrt(c)) over all pixels, per head.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5,
                 resample_filter=(1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Init | None = None, init_zero: Init | None = None, init_attn: Init | None = None):
        super().__init__()
        init = init or Init()
        init_zero = init_zero or Init(weight_gain=0.0)
        self.in_channels, self.out_channels = in_channels, out_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter,
                            init=init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init=init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, init=init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when channels change (or resample_proj); otherwise resampling only.
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down,
                               resample_filter=resample_filter, init=init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, init=init_attn or init)
            self.proj = Conv2d(out_channels, out_channels, 1, init=init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        residual = x if self.skip is None else self.skip(x)
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + residual) * self.skip_scale

        if self.num_heads:
            batch, channels, height, width = x.shape
            # qkv channels are laid out as [head, channel-in-head, (q,k,v)].
            qkv = self.qkv(self.norm2(x)).reshape(batch * self.num_heads, channels // self.num_heads, 3, -1)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B*heads, pixels, c]
            a = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(x.dtype)
            a = a.transpose(1, 2).reshape(batch, channels, height, width)
            x = (self.proj(a) + x) * self.skip_scale
        return x


# --------------------------------------------------------------------------------------------------
# DDPM++ / NCSN++


class UNet(nn.Module):
    """The DDPM++ (positional, standard encoder) / NCSN++ (Fourier, residual encoder) U-Net family.

    Module names follow EDM's SongUNet: `map_*` (embedding network), `enc.{R}x{R}_{conv,down,blockN,aux_*}`,
    `dec.{R}x{R}_{in0,in1,up,blockN,aux_*}`.
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
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self._config = dict(
            img_resolution=int(img_resolution), in_channels=int(in_channels), out_channels=int(out_channels),
            label_dim=int(label_dim), augment_dim=int(augment_dim), model_channels=int(model_channels),
            channel_mult=[int(m) for m in channel_mult], channel_mult_emb=int(channel_mult_emb),
            num_blocks=int(num_blocks), attn_resolutions=[int(r) for r in attn_resolutions],
            dropout=float(dropout), label_dropout=float(label_dropout), embedding_type=embedding_type,
            channel_mult_noise=int(channel_mult_noise), encoder_type=encoder_type, decoder_type=decoder_type,
            resample_filter=[int(t) for t in resample_filter])
        self.img_resolution, self.label_dim, self.label_dropout = img_resolution, label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        # Song et al.'s initialisation: Xavier-uniform; near-zero last convs; qkv with gain sqrt(0.2).
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight_gain=1e-5)
        init_attn = Init("xavier_uniform", weight_gain=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Embedding network: noise (+ label + augment) -> two SiLU layers.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, init=init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, init=init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)

        # Encoder: one level per entry of channel_mult, halving the resolution after level 0.
        self.enc = nn.ModuleDict()
        channels = aux_channels = in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(channels, model_channels, 3, init=init)
                channels = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(channels, channels, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(aux_channels, aux_channels, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(aux_channels, channels, 1, init=init)
                elif encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        aux_channels, channels, 3, down=True, resample_filter=resample_filter, fused=True,
                        init=init)
                    aux_channels = channels
            skip_channels.append(channels)
            for idx in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    channels, out, attention=res in attn_resolutions, **block)
                channels = out
                skip_channels.append(channels)

        # Decoder: mirror image; every blockN consumes one encoder skip connection.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(channels, channels, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(channels, channels, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(channels, channels, up=True, **block)
            for idx in range(num_blocks + 1):
                out = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(channels + skip_channels.pop(), out,
                                                                attention=attn, **block)
                channels = out
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(channels, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(channels, out_channels, 3, init=init_zero)

    def config(self) -> dict:
        """{'name': 'unet', **constructor kwargs} (JSON)."""
        return dict(name="unet", **copy.deepcopy(self._config))

    def embed(self, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        emb = self.map_noise(c_noise)
        # Song et al. order the sinusoids as [sin, cos].
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
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
        emb = self.embed(c_noise.to(x.dtype).reshape(-1), class_labels, augment_labels)

        skips = []
        aux = x
        for name, layer in self.enc.items():
            if name.endswith("_aux_down"):
                aux = layer(aux)
            elif name.endswith("_aux_skip"):
                x = skips[-1] = x + layer(aux)
            elif name.endswith("_aux_residual"):
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        out = None
        h = None
        for name, layer in self.dec.items():
            if name.endswith("_aux_up"):
                out = layer(out)
            elif name.endswith("_aux_norm"):
                h = layer(x)
            elif name.endswith("_aux_conv"):
                h = layer(F.silu(h))
                out = h if out is None else h + out
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, emb)
        return out


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
    # EDM's DDPM++ CIFAR-10 config (train.py --arch=ddpmpp, algorithms.md §1.3): 55.73M parameters
    # (unconditional, no augment labels); FID 1.79 cond / 1.97 uncond with EDM training and 18-step Heun.
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
