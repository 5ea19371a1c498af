"""ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", §3 and App. C).

Parameter names and shapes follow EDM's `DhariwalUNet` (used by `edm-imagenet-64x64-cond-adm.pkl`), so EDM
checkpoints convert 1:1 (`diffdistill.teachers.edm`). Layers are shared with the DDPM++ UNet in `unet.py`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import Conv2d, GroupNorm, Init, Linear, PositionalEmbedding, UNetBlock


class ADMUNet(nn.Module):
    """ADM: adaptive group-norm residual blocks (scale/shift from the embedding), multi-head attention at
    `attn_resolutions` with `channels_per_head` channels per head, class embedding added after the MLP."""

    def __init__(
        self,
        img_resolution: int,              # input/output resolution (H = W)
        in_channels: int,                 # channels of x_in
        out_channels: int,                # channels of the output
        label_dim: int = 0,               # number of classes (0 = unconditional)
        augment_dim: int = 0,             # augmentation-label size (0 = none)
        model_channels: int = 192,        # base channel count
        channel_mult=(1, 2, 3, 4),        # channel multiplier per resolution level
        channel_mult_emb: int = 4,        # embedding width = model_channels * this
        num_blocks: int = 3,              # residual blocks per level
        attn_resolutions=(32, 16, 8),     # resolutions with self-attention
        dropout: float = 0.10,            # dropout inside residual blocks
        label_dropout: float = 0.0,       # training-time class-label dropout (for classifier-free guidance)
        channels_per_head: int = 64,      # attention head width (EDM/ADM: 64; heads = channels // this)
    ):
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1}")
        self._config = dict(
            img_resolution=int(img_resolution), in_channels=int(in_channels), out_channels=int(out_channels),
            label_dim=int(label_dim), augment_dim=int(augment_dim), model_channels=int(model_channels),
            channel_mult=[int(m) for m in channel_mult], channel_mult_emb=int(channel_mult_emb),
            num_blocks=int(num_blocks), attn_resolutions=[int(r) for r in attn_resolutions],
            dropout=float(dropout), label_dropout=float(label_dropout),
            channels_per_head=int(channels_per_head))
        self.img_resolution, self.label_dim, self.label_dropout = img_resolution, label_dim, label_dropout
        emb_channels = model_channels * channel_mult_emb
        # ADM's initialisation: PyTorch's default uniform(+-1/sqrt(fan_in)) for weights and biases, zeros for
        # the last conv of each block and the output layer.
        init = Init("kaiming_uniform", weight_gain=math.sqrt(1 / 3), bias_gain=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight_gain=0.0, bias_gain=0.0)
        block = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout,
                     init=init, init_zero=init_zero)

        # Embedding network.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, init=init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)
        # Class embedding: a lookup table, i.e. a bias-free linear map of the one-hot label, entries N(0, 1).
        self.map_label = (Linear(label_dim, emb_channels, bias=False,
                                 init=Init("kaiming_normal", weight_gain=math.sqrt(label_dim)))
                          if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        channels = in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(channels, model_channels * mult, 3, init=init)
                channels = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(channels, channels, down=True, **block)
            skip_channels.append(channels)
            for idx in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    channels, out, attention=res in attn_resolutions, **block)
                channels = out
                skip_channels.append(channels)

        # Decoder.
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
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(channels + skip_channels.pop(), out,
                                                                attention=res in attn_resolutions, **block)
                channels = out
        self.out_norm = GroupNorm(channels)
        self.out_conv = Conv2d(channels, out_channels, 3, init=init_zero)

    def config(self) -> dict:
        """{'name': 'adm', **constructor kwargs} (JSON)."""
        return dict(name="adm", **copy.deepcopy(self._config))

    def embed(self, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(c_noise.to(x.dtype).reshape(-1), class_labels, augment_labels)
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for name, layer in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


ADM_PRESETS: dict[str, dict] = {
    # Tests: 8x8, two levels, 8-channel attention heads so that attention is exercised.
    "tiny": dict(model_channels=8, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                 attn_resolutions=[4], dropout=0.0, channels_per_head=8),
    # EDM's ImageNet-64 ADM (train.py --arch=adm): 295.90M parameters (1000 classes), FID 1.36 with EDM's
    # stochastic sampler (511 NFE).
    "imagenet64": dict(model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                       attn_resolutions=[32, 16, 8], dropout=0.10),
}


def adm_preset(name: str, img_resolution: int, in_channels: int, label_dim: int = 0, **overrides) -> ADMUNet:
    """An ADMUNet from a named preset (`ADM_PRESETS`); `overrides` replace fields."""
    if name not in ADM_PRESETS:
        raise ValueError(f"unknown ADM preset {name!r} (known: {', '.join(ADM_PRESETS)})")
    kwargs = dict(ADM_PRESETS[name], **overrides)
    return ADMUNet(img_resolution=img_resolution, in_channels=in_channels, out_channels=in_channels,
                   label_dim=label_dim, **kwargs)
