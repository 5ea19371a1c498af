"""ADM U-Net (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis", §3 and App. C).

Module names and tensor shapes equal those of EDM's ImageNet-64 network (Karras et al. 2022,
`edm-imagenet-64x64-cond-adm.pkl`), so EDM checkpoints convert tensor by tensor (`diffdistill.teachers.edm`).
The layers and the encoder/decoder trunk are those of `unet.py`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .unet import Conv2d, GroupNorm, Init, Linear, PositionalEmbedding, _levels, _UNetTrunk


class ADMUNet(_UNetTrunk):
    """ADM: residual blocks with adaptive group norm (the embedding gives each channel a scale and a shift),
    multi-head attention (`channels_per_head` channels per head) in every block at `attn_resolutions`, and the
    class embedding added to the mapping network's output (Dhariwal & Nichol 2021, §3 and App. C)."""

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
        self._levels = _levels(img_resolution, model_channels, channel_mult, attn_resolutions)
        self._config = dict(
            img_resolution=int(img_resolution), in_channels=int(in_channels), out_channels=int(out_channels),
            label_dim=int(label_dim), augment_dim=int(augment_dim), model_channels=int(model_channels),
            channel_mult=[int(m) for m in channel_mult], channel_mult_emb=int(channel_mult_emb),
            num_blocks=int(num_blocks), attn_resolutions=[int(r) for r in attn_resolutions],
            dropout=float(dropout), label_dropout=float(label_dropout),
            channels_per_head=int(channels_per_head))
        self.num_blocks, self.label_dropout = num_blocks, label_dropout

        # ADM's initialisation: PyTorch's default U(+-1/sqrt(fan_in)) for weights and biases; zeros for the
        # layers that close a residual branch, for the augmentation-label map and for the output layer.
        init = Init("kaiming_uniform", weight_gain=math.sqrt(1 / 3), bias_gain=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight_gain=0.0, bias_gain=0.0)

        # Mapping network: noise embedding (+ augmentation labels) -> linear, SiLU, linear; + class embedding.
        emb_width = model_channels * channel_mult_emb
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, init=init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_width, init=init)
        self.map_layer1 = Linear(emb_width, emb_width, init=init)
        # The class embedding is a table lookup, i.e. a bias-free linear map of the one-hot label, entries N(0, 1).
        self.map_label = (Linear(label_dim, emb_width, bias=False,
                                 init=Init("kaiming_normal", weight_gain=math.sqrt(label_dim)))
                          if label_dim else None)

        block = dict(emb_channels=emb_width, channels_per_head=channels_per_head, dropout=float(dropout),
                     init=init, init_zero=init_zero)
        width = self._build_trunk(in_channels, model_channels * channel_mult[0], block,
                                  attend_all_decoder_blocks=True)
        self.out_norm = GroupNorm(width)
        self.out_conv = Conv2d(width, out_channels, 3, init=init_zero)

    def config(self) -> dict:
        """{'name': 'adm', **constructor kwargs} (JSON)."""
        return dict(name="adm", **copy.deepcopy(self._config))

    def _embedding(self, c_noise: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and class_labels is not None:    # no labels: a zero class embedding
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self._embedding(c_noise.to(x.dtype).reshape(-1), class_labels, augment_labels)
        h, kept = self._encode(x, emb)
        h = self._decode(h, kept, emb)[0]
        return self.out_conv(F.silu(self.out_norm(h)))


ADM_PRESETS: dict[str, dict] = {
    # Tests: 8x8, two levels, 8-channel attention heads so that attention is exercised.
    "tiny": dict(model_channels=8, channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1,
                 attn_resolutions=[4], dropout=0.0, channels_per_head=8),
    # EDM's ImageNet-64 ADM (train.py --arch=adm): 295.90M parameters (1000 classes); Karras et al. 2022 report
    # FID 1.36 with EDM's stochastic sampler (511 NFE).
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
