"""EDM's geometric augmentation with augment labels (Karras et al. 2022, App. F.2; official EDM `augment.py`).

EDM trains its CIFAR-10 networks with a non-leaking augmentation pipeline: each image is x/y-flipped, scaled,
rotated, anisotropically scaled and translated with probability p per transform, and the network is told what
was done through a 9-dim `augment_labels` input (`augment_dim=9`, zeros at sampling). Diff-Instruct trains its
fake score on generator samples augmented the same way (p = 0.12, `di_train.py` default), so that the fake score
sees the distribution, and the conditioning, its teacher was trained with.

This module is written here from the description of what EDM's `training/augment.py` does with the options
Diff-Instruct and EDM's CIFAR-10 runs enable (`xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
translate_frac=1`, standard deviations 0.2 / 0.2 / 0.125, full-circle rotations, aniso frame rotated with
probability 0.5); colour transforms and integer rotations/translations are not implemented (off in that setting).

What happens to a batch [N, C, H, W] (with `p`, per sample and per transform):
- xflip: with probability min(1, xflip * p) a fair coin decides a horizontal flip (xflip = 1e8: always the
  coin, so half the images are flipped whatever p is); label 1 = flipped. yflip the same, vertically.
- The four geometric transforms compose one inverse map G^-1 of centred pixel coordinates (output -> input):
  G^-1 = S(1/s) R(a) [R(-r) S(1/t, t) R(r)] T(-d), with s = 2^(0.2 u), u ~ N(0, 1) (label u); a ~ U(-pi, pi)
  (labels cos a - 1, sin a); t = 2^(0.2 v), v ~ N(0, 1), r ~ U(-pi, pi) used with probability 0.5 else 0
  (labels v cos r, v sin r); d = 0.125 (W w_x, H w_y), w ~ N(0, 1) (labels w_x, w_y). A transform not drawn
  contributes the identity and zero labels.
- The map is executed with 2x oversampling: reflect padding (as much as the batch's transformed corners need),
  upsampling by 2 with the symlet-6 low-pass filter, bilinear resampling (zeros outside), filtering with the
  same filter and decimation by 2. Without any transform this chain is the identity to float rounding (the
  filter is orthonormal); EDM runs every image through it once any geometric transform is enabled.
- Labels: [N, 9] float32 = [xflip, yflip, u, cos a - 1, sin a, v cos r, v sin r, w_x, w_y] (the enabled
  transforms' entries, in this order).

The random numbers are drawn from the global torch generator on the images' device, in EDM's order and shapes,
so a seeded run is reproducible (and draws what EDM would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError

# Symlet-6 low-pass decomposition filter (PyWavelets `sym6` dec_lo), the anti-aliasing filter of the pipeline.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

LABEL_DIM = 9  # labels of the official setting: xflip, yflip, scale, rotate (2), aniso (2), translate (2)


@dataclass
class AugmentParams:
    """One draw of the pipeline's per-sample parameters (zeros = that transform not applied)."""

    xflip: Tensor       # [N] 0/1
    yflip: Tensor       # [N] 0/1
    scale: Tensor       # [N] u: isotropic scale 2^(scale_std u)
    rotate: Tensor      # [N] angle a (radians)
    aniso: Tensor       # [N] v: anisotropic scale 2^(aniso_std v) along the frame rotated by aniso_angle
    aniso_angle: Tensor  # [N] r (radians)
    translate: Tensor   # [2, N] (w_x, w_y): shift of translate_std * (W, H) * w pixels


class AugmentPipe:
    """EDM's geometric augmentation pipeline (see the module docstring). Call it on images in [-1, 1]
    [N, C, H, W]: returns (augmented images, labels [N, label_dim])."""

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate: float = 1.0, aniso: float = 1.0, translate: float = 1.0, scale_std: float = 0.2,
                 rotate_max: float = 1.0, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
                 translate_std: float = 0.125):
        """p: overall probability; xflip ... translate: per-transform multipliers of p (0 = off; EDM's names
        xflip, yflip, scale, rotate_frac, aniso, translate_frac); the rest as EDM's defaults."""
        if not 0.0 <= p <= 1.0:
            raise DiffdistillError(f"augment probability must lie in [0, 1], got {p}")
        self.p = float(p)
        self.mult = dict(xflip=float(xflip), yflip=float(yflip), scale=float(scale), rotate=float(rotate),
                         aniso=float(aniso), translate=float(translate))
        if any(m < 0 for m in self.mult.values()):
            raise DiffdistillError(f"augment multipliers must be >= 0, got {self.mult}")
        self.scale_std, self.rotate_max, self.aniso_std = float(scale_std), float(rotate_max), float(aniso_std)
        self.aniso_rotate_prob, self.translate_std = float(aniso_rotate_prob), float(translate_std)

    @property
    def label_dim(self) -> int:
        widths = dict(xflip=1, yflip=1, scale=1, rotate=2, aniso=2, translate=2)
        return sum(w for k, w in widths.items() if self.mult[k] > 0)

    @property
    def geometric(self) -> bool:
        return any(self.mult[k] > 0 for k in ("scale", "rotate", "aniso", "translate"))

    def __repr__(self) -> str:
        on = ", ".join(k for k, m in self.mult.items() if m > 0)
        return f"AugmentPipe(p={self.p:g}: {on})"

    # ---------------------------------------------------------------------------------------------
    def sample(self, n: int, device) -> AugmentParams:
        """Draw the parameters of n images (EDM's draws, in its order)."""
        def gate(w: Tensor, name: str) -> Tensor:      # w where a uniform draw says so, else 0
            keep = torch.rand(w.shape, device=device) < self.mult[name] * self.p
            return torch.where(keep, w, torch.zeros_like(w))

        zeros = torch.zeros(n, device=device)
        flips = {}
        for name in ("xflip", "yflip"):
            flips[name] = zeros
            if self.mult[name] > 0:
                coin = torch.randint(2, [n, 1, 1, 1], device=device)
                flips[name] = gate(coin, name).reshape(n).to(torch.float32)
        scale = rotate = aniso = angle = zeros
        translate = torch.zeros(2, n, device=device)
        if self.mult["scale"] > 0:
            scale = gate(torch.randn(n, device=device), "scale")
        if self.mult["rotate"] > 0:
            rotate = gate((torch.rand(n, device=device) * 2 - 1) * (math.pi * self.rotate_max), "rotate")
        if self.mult["aniso"] > 0:
            v = torch.randn(n, device=device)
            r = (torch.rand(n, device=device) * 2 - 1) * math.pi
            aniso = gate(v, "aniso")
            angle = torch.where(torch.rand(n, device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
        if self.mult["translate"] > 0:
            w = torch.randn(2, n, device=device)
            keep = torch.rand(1, n, device=device) < self.mult["translate"] * self.p   # both axes together
            translate = torch.where(keep, w, torch.zeros_like(w))
        return AugmentParams(flips["xflip"], flips["yflip"], scale, rotate, aniso, angle, translate)

    def labels(self, prm: AugmentParams) -> Tensor:
        """The [N, label_dim] augment labels of a draw (the enabled transforms' entries, EDM's layout)."""
        cols = []
        if self.mult["xflip"] > 0:
            cols.append(prm.xflip[:, None])
        if self.mult["yflip"] > 0:
            cols.append(prm.yflip[:, None])
        if self.mult["scale"] > 0:
            cols.append(prm.scale[:, None])
        if self.mult["rotate"] > 0:
            cols += [prm.rotate.cos()[:, None] - 1, prm.rotate.sin()[:, None]]
        if self.mult["aniso"] > 0:
            cols += [(prm.aniso * prm.aniso_angle.cos())[:, None], (prm.aniso * prm.aniso_angle.sin())[:, None]]
        if self.mult["translate"] > 0:
            cols += [prm.translate[0][:, None], prm.translate[1][:, None]]
        n = prm.xflip.shape[0]
        if not cols:
            return torch.zeros(n, 0, device=prm.xflip.device)
        return torch.cat([c.to(torch.float32) for c in cols], dim=1)

    def inverse_map(self, prm: AugmentParams, height: int, width: int) -> Tensor:
        """[N, 3, 3] map G^-1 of centred pixel coordinates (x right, y down): output pixel -> input point."""
        s = torch.exp2(prm.scale * self.scale_std)
        t = torch.exp2(prm.aniso * self.aniso_std)
        r = prm.aniso_angle
        dx = prm.translate[0] * (width * self.translate_std)
        dy = prm.translate[1] * (height * self.translate_std)
        return (_scaling(1 / s, 1 / s) @ _rotation(prm.rotate) @ _rotation(-r) @ _scaling(1 / t, t) @ _rotation(r)
                @ _translation(-dx, -dy))

    def apply(self, images: Tensor, prm: AugmentParams) -> tuple[Tensor, Tensor]:
        """Augment `images` [N, C, H, W] with the parameters `prm`; returns (images, labels)."""
        if images.ndim != 4:
            raise DiffdistillError(f"the augmentation pipeline needs images [N, C, H, W], got {tuple(images.shape)}")
        n, _, h, w = images.shape
        if self.mult["xflip"] > 0:
            images = torch.where(prm.xflip.reshape(n, 1, 1, 1) == 1, images.flip(3), images)
        if self.mult["yflip"] > 0:
            images = torch.where(prm.yflip.reshape(n, 1, 1, 1) == 1, images.flip(2), images)
        if self.geometric:
            images = _warp(images, self.inverse_map(prm, h, w).to(torch.float32))
        return images, self.labels(prm)

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.apply(images, self.sample(images.shape[0], images.device))


# -------------------------------------------------------------------------------------------------
# 3x3 homogeneous matrices of batched parameters


def _homogeneous(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    """[[a, b, c], [d, e, f], [0, 0, 1]] for [N] entries."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).reshape(*a.shape, 3, 3).to(torch.float32)


def _full(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=like.device).expand_as(like)


def _scaling(sx: Tensor, sy: Tensor) -> Tensor:
    z = torch.zeros_like(sx)
    return _homogeneous(sx, z, z, z, _full(sy, sx), z)


def _rotation(a: Tensor) -> Tensor:
    z = torch.zeros_like(a)
    return _homogeneous(a.cos(), -a.sin(), z, a.sin(), a.cos(), z)


def _translation(tx: Tensor, ty: Tensor) -> Tensor:
    o, z = torch.ones_like(tx), torch.zeros_like(tx)
    return _homogeneous(o, z, tx, z, o, _full(ty, tx))


def _affine(sx: float, sy: float, tx: float, ty: float, device) -> Tensor:
    """The constant map (x, y) -> (sx x + tx, sy y + ty)."""
    return torch.tensor([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]], dtype=torch.float32, device=device)


# -------------------------------------------------------------------------------------------------
# Executing a map with 2x oversampling


def _fir(x: Tensor, taps, dim: int, pad: tuple[int, int], step: int = 1) -> Tensor:
    """out[j] = sum_t taps[t] x[step j + t - pad[0]] along `dim` (zeros outside x): a short FIR filter as a few
    multiply-adds of shifted slices (much faster on CPUs than a one-channel convolution)."""
    x = F.pad(x, (pad[0], pad[1]) if dim == 3 else (0, 0, pad[0], pad[1]))
    length = (x.shape[dim] - len(taps)) // step + 1
    out = None
    for t, tap in enumerate(taps):
        part = x.narrow(dim, t, step * (length - 1) + 1)
        if step > 1:
            part = part[..., ::step] if dim == 3 else part[..., ::step, :]
        out = part * tap if out is None else out + part * tap
    return out


def _upsample2(images: Tensor) -> Tensor:
    """x2 along W then H: out[m] = sum_k x[k] h[m + 5 - 2k] (zero insertion + low-pass), length 2L, computed
    as two 6-tap phases: out[2j] = sum_t h[11 - 2t] x[j - 3 + t], out[2j + 1] = sum_t h[10 - 2t] x[j - 2 + t]."""
    rev = SYM6[::-1]
    for dim in (3, 2):
        even, odd = _fir(images, rev[0::2], dim, (3, 2)), _fir(images, rev[1::2], dim, (2, 3))
        images = torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)   # interleave the phases
    return images


def _downsample2(images: Tensor, crop: int) -> Tensor:
    """out[j] = sum_t h[t] x[2j + t - 5] (low-pass and decimation by 2) along W then H, dropping `crop` samples
    each side."""
    images = _fir(images, SYM6, 3, (5, 5), step=2)[..., crop:-crop]
    return _fir(images, SYM6, 2, (5, 5), step=2)[..., crop:-crop, :]


def _warp(images: Tensor, g_inv: Tensor) -> Tensor:
    """out(p) = in(G^-1 p) in centred pixel coordinates, reflect-extended, with 2x oversampling."""
    n, c, h, w = images.shape
    dev = images.device
    cx, cy = (w - 1) / 2, (h - 1) / 2
    half = len(SYM6) // 4                                 # 3: filter support margin (coarse pixels)
    # Reflect padding: as far as the batch's transformed corners reach, plus the filter margin.
    corners = torch.tensor([[-cx, -cy, 1.0], [cx, -cy, 1.0], [cx, cy, 1.0], [-cx, cy, 1.0]], device=dev).t()
    reach = (g_inv @ corners)[:, :2, :].permute(1, 0, 2).reshape(2, -1)   # [xy, N * 4]
    lo, hi = (-reach).amax(dim=1), reach.amax(dim=1)                      # [x, y] beyond the centre
    extra = torch.tensor([2 * half - cx, 2 * half - cy], device=dev)
    limit = torch.tensor([w - 1, h - 1], dtype=torch.float32, device=dev)
    pad_lo = (lo + extra).clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist()
    pad_hi = (hi + extra).clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist()
    images = F.pad(images, [pad_lo[0], pad_hi[0], pad_lo[1], pad_hi[1]], mode="reflect")
    # Coordinates centred on the padded image; then the 2x grid (fine = 2 coarse - 1/2, centred).
    g = _affine(1, 1, (pad_lo[0] - pad_hi[0]) / 2, (pad_lo[1] - pad_hi[1]) / 2, dev) @ g_inv
    fine = _affine(2, 2, -0.5, -0.5, dev)
    g = fine @ g @ _affine(0.5, 0.5, 0.25, 0.25, dev)
    images = _upsample2(images)
    out_h, out_w = (h + 2 * half) * 2, (w + 2 * half) * 2
    # grid_sample's normalised coordinates (align_corners=False): centred pixel coordinate * 2 / size.
    g = _affine(2 / images.shape[3], 2 / images.shape[2], 0, 0, dev) @ g @ _affine(out_w / 2, out_h / 2, 0, 0, dev)
    grid = F.affine_grid(g[:, :2, :].to(images.dtype), [n, c, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2(images, half)


def augment_dim(net: Denoiser) -> int:
    """The augment-label width a denoiser's network takes (EDM's `augment_dim`; 0 = none)."""
    if not getattr(net, "takes_augment_labels", False):
        return 0
    layer = getattr(getattr(net, "backbone", None), "map_augment", None)
    return int(layer.in_features) if layer is not None else 0
