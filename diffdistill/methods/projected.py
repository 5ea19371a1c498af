"""The projected discriminator of the official GDD code (Zheng & Yang 2024), written here from what it computes.

GDD (`Zyriix/GDD: pg_modules/discriminator.py, projector.py, blocks.py, feature_networks/pretrained_builder.py`,
set up in `training/training_loop.py`) uses the Projected GAN discriminator (Sauer et al. 2021,
`autonomousvision/projected-gan`) with StyleGAN-XL's class conditioning. For CIFAR-10 (`--backbone=1`) the
feature networks are `vgg16_bn` (torchvision) and `tf_efficientnet_lite0` (timm), in that order. Per backbone:

1. **Input.** x in [-1, 1] (optionally DiffAugment, drawn afresh for each backbone) -> [0, 1] -> normalised with
   the backbone's statistics (VGG: ImageNet mean/std; EfficientNet-lite: mean = std = 0.5, i.e. x itself) ->
   bilinearly resized to 224x224 (align_corners=False) when the images are smaller than 224 (`interp224`).
2. **Frozen backbone, four taps** (eval mode: BatchNorm uses its stored statistics; never trained):
   - VGG16-BN: `features[:13]`, `[13:23]`, `[23:33]`, `[33:43]` -> 128@S/2, 256@S/4, 512@S/8, 512@S/16
     (the last max-pool, index 43, is not used).
   - EfficientNet-lite0: stem + `blocks[0:2]`, `blocks[2]`, `blocks[3:5]`, `blocks[5:7]`
     -> 24@S/4, 40@S/8, 112@S/16, 320@S/32 (conv_head / classifier unused).
3. **Random fixed projections** (`proj_type=2`, `cout=64`, `expand=True`; default PyTorch init, never trained):
   cross-channel mixing CCM = a 1x1 conv per tap to 64, 128, 256, 512 channels; cross-scale mixing CSM =
   from the deepest tap up, (sum with the shallower CCM map) -> x2 bilinear upsampling (align_corners=True) ->
   1x1 conv halving the channels (the shallowest keeps 64). The four maps have 64, 64, 128, 256 channels at
   twice the tap resolutions.
4. **Trainable heads**, one per map (`num_discs=4`), built from a *nominal* resolution `im_res // 2**(k+1)`
   (im_res = 256 when resizing to 224, else the image size): DownBlocks (spectral-norm conv 4x4 stride 2 with
   bias, BatchNorm, LeakyReLU 0.2) halve the nominal size down to 8 (or the smallest nominal size if under 8),
   with the channel table {128: 64, 64: 64, 32: 128, 16: 256, 8: 512, ...} (the input size takes the map's
   channels); then a spectral-norm conv (4x4, or end//2 when ending under 8; no bias) gives patch logits.
   At 224 the VGG heads give 11x11 patches each and the EfficientNet heads 4x4: K = 4*121 + 4*16 = 548.
5. **Conditioning** (StyleGAN-XL projection, `SingleDiscCond`): the last conv outputs a 64-channel map; a class
   embedding -> FullyConnectedLayer (N(0,1) weights scaled by 1/sqrt(fan_in), zero bias, LeakyReLU 0.2 with
   gain sqrt 2) -> 64-dim c; logit = <map, c> / sqrt(64) per patch. Each head has its own embedding.

Logits of all heads are flattened and concatenated along dim 1 in the official order (backbones in the order
above, then taps shallow to deep, patches row-major). The official loss reduces them per backbone: with
`logits += tensor[B, n_b]` it collects B rows per backbone and sums `f(row).mean()` over them, i.e.
L = sum over samples and backbones of the mean over that backbone's patches (GDD's `training/loss.py`). The
module exposes `splits` (logits per backbone) and `scale_splits` (per backbone and tap) and `per_backbone_mean`.

DiffAugment (`training/diffaug.py`, policy 'color,translation,cutout') exists in the official code but is off in
every official GDD command (`--diffaug=False`); here it is GDD's `--diffaug` (`discriminators.diff_augment`),
default off.

What differs from the official code, and why:
- The class embedding is initialised N(0, 1) (the official `rand_embedding=True` path): the official default
  loads a pickled 1000x320 ImageNet embedding (`in_embeddings/tf_efficientnet_lite0.pkl`) and indexes it with
  the label; for CIFAR-10 that uses its first 10 rows, which carry no CIFAR meaning. We cannot ship that file.
  Only rows of present labels are used, so `nn.Embedding(label_dim, 320)` is equivalent in structure.
- Backbone weights come from a local file of the standard torchvision / timm key layout (no downloads); the
  architectures are written here. Frozen weights (backbone and projections) are buffers, not parameters, so
  `parameters()` is exactly the trainable heads and `requires_grad_(True)` cannot unfreeze them. The backbone
  buffers are not saved in `state_dict()` (they come from the weights files); the projections are.
- The random projections are drawn from their own seed (`proj_seed`), not the global training RNG, so every
  process and every resume has the same ones.
- Spectral norm is `torch.nn.utils.parametrizations.spectral_norm` (15 power iterations at creation, then one
  per training forward), the official uses the older hook version (one per training forward from the start).
- BatchNorm in the heads uses the statistics of whatever batch it sees; the official run sees 64 images per GPU
  (4 GPUs, batch 256) and never syncs them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from ..errors import DiffdistillError
from .discriminators import IMAGENET_MEAN, IMAGENET_STD, diff_augment, load_state_dict_file

BACKBONES = ("vgg16_bn", "tf_efficientnet_lite0")     # GDD's `--backbone=1` (CIFAR-10), in the official order

# --------------------------------------------------------------------------------------------------
# Backbones (key layouts of torchvision's vgg16_bn().features and timm's tf_efficientnet_lite0)

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16BNFeatures(nn.Sequential):
    """torchvision's `vgg16_bn().features` (conv 3x3 + BatchNorm + ReLU, max-pools), same state-dict keys."""

    TAPS = (13, 23, 33, 43)            # GDD splits `features` at these indices (pretrained_builder.py)
    CHANNELS = (128, 256, 512, 512)
    NAME = "torchvision vgg16_bn"
    # The full torchvision model's classifier, accepted and ignored in a weights file.
    IGNORED = {"classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
               "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
               "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,)}
    PREFIX = "features."

    def __init__(self):
        layers, ch = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                ch = v
        super().__init__(*layers)

    def taps(self, x: Tensor) -> list[Tensor]:
        out, start = [], 0
        for stop in self.TAPS:
            for layer in list(self)[start:stop]:
                x = layer(x)
            out.append(x)
            start = stop
        return out

    @staticmethod
    def tap_sizes(s: int) -> list[int]:
        sizes = []
        for _ in range(4):
            s //= 2
            sizes.append(s)
        return sizes


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (timm's `tf_*` models): output = ceil(input / stride)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        static = stride == 1
        super().__init__(cin, cout, k, stride, padding=(k - 1) // 2 if static else 0, groups=groups, bias=False)
        self.dynamic = not static

    def forward(self, x: Tensor) -> Tensor:
        if self.dynamic:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):     # F.pad order: last dim first
                total = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-3)          # timm's BN_EPS_TF_DEFAULT for tf_* models


class _DepthwiseSeparable(nn.Module):
    """timm DepthwiseSeparableConv: dw conv -> BN+ReLU6 -> pw conv -> BN (residual when shapes allow)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw, self.bn1 = _SameConv2d(cin, cin, k, stride, groups=cin), _bn(cin)
        self.conv_pw, self.bn2 = _SameConv2d(cin, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return h + x if self.skip else h


class _InvertedResidual(nn.Module):
    """timm InvertedResidual without SE: pw expand -> BN+ReLU6 -> dw -> BN+ReLU6 -> pw project -> BN."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.conv_pw, self.bn1 = _SameConv2d(cin, mid, 1), _bn(mid)
        self.conv_dw, self.bn2 = _SameConv2d(mid, mid, k, stride, groups=mid), _bn(mid)
        self.conv_pwl, self.bn3 = _SameConv2d(mid, cout, 1), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.bn1(self.conv_pw(x)))
        h = F.relu6(self.bn2(self.conv_dw(h)))
        h = self.bn3(self.conv_pwl(h))
        return h + x if self.skip else h


# timm's arch_def of EfficientNet-lite0: (block, repeats, kernel, stride, expansion, channels)
_LITE0 = [("ds", 1, 3, 1, 1, 16), ("ir", 2, 3, 2, 6, 24), ("ir", 2, 5, 2, 6, 40), ("ir", 3, 3, 2, 6, 80),
          ("ir", 3, 5, 1, 6, 112), ("ir", 4, 5, 2, 6, 192), ("ir", 1, 3, 1, 6, 320)]


class EfficientNetLite0(nn.Module):
    """timm's `tf_efficientnet_lite0` (ReLU6, no SE, TF 'SAME' padding, BN eps 1e-3), same state-dict keys."""

    TAPS = ((0, 2), (2, 3), (3, 5), (5, 7))   # GDD's _make_efficientnet: stem+blocks[0:2], [2:3], [3:5], [5:9]
    CHANNELS = (24, 40, 112, 320)
    NAME = "timm tf_efficientnet_lite0"
    IGNORED: dict = {}
    PREFIX = None

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv_stem, self.bn1 = _SameConv2d(3, 32, 3, 2), _bn(32)
        stages, cin = [], 32
        for kind, repeats, k, stride, expand, cout in _LITE0:
            blocks = []
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(_DepthwiseSeparable(cin, cout, k, s) if kind == "ds"
                              else _InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = _SameConv2d(cin, 1280, 1), _bn(1280)     # unused here; kept for the keys
        self.classifier = nn.Linear(1280, num_classes)

    def taps(self, x: Tensor) -> list[Tensor]:
        x = F.relu6(self.bn1(self.conv_stem(x)))
        out = []
        for a, b in self.TAPS:
            for stage in self.blocks[a:b]:
                x = stage(x)
            out.append(x)
        return out

    @staticmethod
    def tap_sizes(s: int) -> list[int]:
        s = math.ceil(s / 2)                       # stem
        sizes = []
        for _ in range(4):                         # every tap ends one stride-2 stage further
            s = math.ceil(s / 2)
            sizes.append(s)
        return sizes


_BACKBONE_CLASSES = {"vgg16_bn": VGG16BNFeatures, "tf_efficientnet_lite0": EfficientNetLite0}
_NORM = {"vgg16_bn": (IMAGENET_MEAN, IMAGENET_STD), "tf_efficientnet_lite0": ((0.5,) * 3, (0.5,) * 3)}


def load_backbone(module: nn.Module, path: str | Path) -> nn.Module:
    """Load a torchvision/timm weights file into a backbone of this file, checking every key and shape.

    Accepted: exactly the module's keys, or (VGG) the full torchvision model (`features.*` plus its classifier,
    which is ignored). Missing `num_batches_tracked` counters are allowed (old checkpoints lack them).
    """
    state = load_state_dict_file(path)
    prefix = getattr(module, "PREFIX", None)
    if prefix and any(k.startswith(prefix) for k in state):
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    ignored = getattr(module, "IGNORED", {})
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k, v in state.items() if k not in expected and ignored.get(k) != tuple(v.shape)]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{what} {keys[:3]}" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise DiffdistillError(f"{path}: not {module.NAME} weights ({'; '.join(parts)})")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return module


def _freeze(module: nn.Module, persistent: bool) -> nn.Module:
    """Turn every parameter into a buffer (so nothing can train it); mark buffers (non-)persistent."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach().clone(), persistent=persistent)
        if not persistent:
            m._non_persistent_buffers_set.update(m._buffers)
    return module.eval()


# --------------------------------------------------------------------------------------------------
# Random projections (CCM + CSM) and heads


class RandomProjection(nn.Module):
    """Cross-channel mixing (1x1 convs to cout*(1, 2, 4, 8)) and cross-scale mixing (sum, x2 up, 1x1 conv)."""

    def __init__(self, channels_in, cout: int = 64):
        super().__init__()
        mixed = [cout, cout * 2, cout * 4, cout * 8]
        self.ccm = nn.ModuleList(nn.Conv2d(ci, co, 1) for ci, co in zip(channels_in, mixed))
        # CSM level k maps mixed[k] channels to mixed[k] // 2 (level 0 keeps cout).
        self.csm = nn.ModuleList(nn.Conv2d(c, c if k == 0 else c // 2, 1) for k, c in enumerate(mixed))
        self.channels = [cout, cout, cout * 2, cout * 4]

    def forward(self, taps: list[Tensor]) -> list[Tensor]:
        mixed = [conv(t) for conv, t in zip(self.ccm, taps)]
        out, h = [None] * 4, None
        for k in (3, 2, 1, 0):                     # deepest first
            h = mixed[k] if h is None else h + mixed[k]
            h = self.csm[k](F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True))
            out[k] = h
        return out


def _sn_conv(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Module:
    return spectral_norm(nn.Conv2d(cin, cout, k, stride, padding, bias=bias))


class _FullyConnected(nn.Module):
    """StyleGAN2's FullyConnectedLayer with activation 'lrelu': N(0,1) weights used /sqrt(fan_in), gain sqrt 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


_NFC = {1: 2048, 2: 1024, 4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}
EMBED_DIM = 320           # width of the official pretrained class embedding (tf_efficientnet_lite0.pkl)
CMAP_DIM = 64


class PatchHead(nn.Module):
    """One multi-scale head: DownBlocks from the nominal size `start` to `end`, then a conv to patch logits."""

    def __init__(self, channels_in: int, start: int, end: int, label_dim: int = 0):
        super().__init__()
        if start not in _NFC:                                     # official: snap to the nearest table size
            start = int(min(_NFC, key=lambda s: abs(s - start)))
        nfc = dict(_NFC)
        nfc[start] = channels_in
        self.n_down = 0
        layers = []
        while start > end:
            layers += [_sn_conv(nfc[start], nfc[start // 2], 4, 2, 1, bias=True), nn.BatchNorm2d(nfc[start // 2]),
                       nn.LeakyReLU(0.2)]
            start //= 2
            self.n_down += 1
        self.main = nn.Sequential(*layers)
        self.kernel = 4 if end >= 8 else max(1, end // 2)
        self.label_dim = label_dim
        self.out = _sn_conv(nfc[end], CMAP_DIM if label_dim else 1, self.kernel, bias=False)
        if label_dim:
            self.embed = nn.Embedding(label_dim, EMBED_DIM)     # N(0,1): the official rand_embedding init
            self.embed_proj = _FullyConnected(EMBED_DIM, CMAP_DIM)

    def n_logits(self, size: int) -> int:
        for _ in range(self.n_down):
            size //= 2
        size = size - self.kernel + 1
        return size * size

    def forward(self, f: Tensor, cond: Tensor | None) -> Tensor:
        out = self.out(self.main(f))
        if self.label_dim:
            c = self.embed_proj(self.embed(cond.argmax(1)))[:, :, None, None]
            out = (out * c).sum(1, keepdim=True) / math.sqrt(CMAP_DIM)
        return out.flatten(1)


# --------------------------------------------------------------------------------------------------
# The discriminator


class ProjectedGANDiscriminator(nn.Module):
    """D(x in [-1, 1] [B, C, H, W], cond one-hot [B, label_dim] or None) -> patch logits [B, K] (see module doc)."""

    def __init__(self, shape, label_dim: int = 0, weights: dict | None = None, *,
                 backbones=BACKBONES, interp224: bool = True, diffaug: bool = False, cout: int = 64,
                 proj_seed: int = 0):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise DiffdistillError(f"the projected discriminator needs images [1 or 3, H, W], got shape {shape}")
        unknown = [b for b in backbones if b not in _BACKBONE_CLASSES]
        if unknown or not backbones:
            raise DiffdistillError(f"unknown projected-discriminator backbone(s) {unknown or '(none)'} "
                                   f"(known: {', '.join(_BACKBONE_CLASSES)})")
        weights = weights or {}
        self.shape, self.label_dim, self.diffaug = shape, int(label_dim), bool(diffaug)
        self.names = list(backbones)
        _, h, w = shape
        self.resize = interp224 and min(h, w) < 224
        if not self.resize and h != w:
            raise DiffdistillError(f"the projected discriminator needs square images without resizing, got {h}x{w}")
        size = 224 if self.resize else h
        im_res = 256 if self.resize else h                 # official: nominal resolution behind the head layout
        nominal = [(im_res // 2 ** (k + 2)) * 2 for k in range(4)]   # RESOLUTIONS, doubled by CSM
        end = 8 if nominal[-1] >= 8 else nominal[-1]
        if end < 1:
            raise DiffdistillError(f"{h}x{w} images are too small for the projected discriminator without "
                                   f"resizing to 224 (interp224)")

        self.backbones, self.projections, self.heads = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.scale_splits: list[int] = []
        self.splits: list[int] = []
        for name in self.names:
            cls = _BACKBONE_CLASSES[name]
            net = cls()
            if weights.get(name) is not None:
                load_backbone(net, weights[name])
            self.backbones[name] = _freeze(net, persistent=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(proj_seed + len(self.projections))
                proj = RandomProjection(cls.CHANNELS, cout)
            self.projections[name] = _freeze(proj, persistent=True)
            taps = cls.tap_sizes(size)
            if any(2 * taps[k + 1] != taps[k] for k in range(3)):
                raise DiffdistillError(f"{h}x{w} images give {name} feature maps of sizes {taps}, which the "
                                       f"cross-scale mixing cannot add (use a multiple of 32, or interp224)")
            heads = nn.ModuleList(PatchHead(c, n, end, self.label_dim)
                                  for c, n in zip(proj.channels, nominal))
            counts = [head.n_logits(2 * t) for head, t in zip(heads, taps)]
            if min(counts) < 1:
                raise DiffdistillError(f"{h}x{w} images are too small for the {name} heads without resizing "
                                       f"(use interp224)")
            self.heads[name] = heads
            self.scale_splits += counts
            self.splits.append(sum(counts))
            mean, std = _NORM[name]
            self.register_buffer(f"mean_{name}", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer(f"std_{name}", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbones.eval()          # frozen BatchNorm statistics, always
        self.projections.eval()
        return self

    def per_backbone_mean(self, values: Tensor) -> Tensor:
        """[B, K] per-logit values -> [B, n_backbones] means over each backbone's patches (the official reduction)."""
        return torch.stack([v.mean(1) for v in values.split(self.splits, dim=1)], dim=1)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.shape:
            raise DiffdistillError(f"projected discriminator built for images {self.shape}, got {tuple(x.shape)}")
        if self.label_dim:
            if cond is None or cond.ndim != 2 or cond.shape != (x.shape[0], self.label_dim):
                got = None if cond is None else tuple(cond.shape)
                raise DiffdistillError(f"the conditional projected discriminator needs one-hot labels "
                                       f"[{x.shape[0]}, {self.label_dim}], got {got}")
        else:
            cond = None
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        logits = []
        for name in self.names:
            xa = diff_augment(x) if self.diffaug else x     # official: a fresh draw per backbone
            xa = ((xa + 1) / 2 - getattr(self, f"mean_{name}")) / getattr(self, f"std_{name}")
            if self.resize:
                xa = F.interpolate(xa, size=(224, 224), mode="bilinear", align_corners=False)
            feats = self.projections[name](self.backbones[name].taps(xa))
            logits += [head(f, cond) for head, f in zip(self.heads[name], feats)]
        return torch.cat(logits, dim=1)


def build_projected_discriminator(shape, label_dim: int = 0, vgg_weights: str | Path | None = None,
                                  effnet_weights: str | Path | None = None, *, backbones=BACKBONES,
                                  interp224: bool = True, diffaug: bool = False, cout: int = 64,
                                  proj_seed: int = 0) -> ProjectedGANDiscriminator:
    """GDD's CIFAR-10 discriminator (vgg16_bn + tf_efficientnet_lite0 by default).

    vgg_weights / effnet_weights: local torchvision `vgg16_bn` / timm `tf_efficientnet_lite0` weights
    (safetensors, or a torch state dict read with weights_only=True). None leaves that backbone randomly
    initialised (for tests, or when a caller insists on it; a real run needs the pretrained weights).
    Options: backbones (subset/order of BACKBONES), interp224 (resize images under 224 to 224, official
    default True), diffaug (official GDD commands: False), cout (CCM width, 64), proj_seed (projection draw).
    """
    return ProjectedGANDiscriminator(shape, label_dim,
                                     {"vgg16_bn": vgg_weights, "tf_efficientnet_lite0": effnet_weights},
                                     backbones=tuple(backbones), interp224=interp224, diffaug=diffaug,
                                     cout=cout, proj_seed=proj_seed)


__all__ = ["build_projected_discriminator", "ProjectedGANDiscriminator", "VGG16BNFeatures", "EfficientNetLite0",
           "RandomProjection", "PatchHead", "load_backbone", "BACKBONES"]
