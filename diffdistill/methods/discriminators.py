"""Discriminators for GDD (Zheng & Yang 2024) and other GAN terms: D(x, cond one-hot or None) -> logits [B, K].

Every discriminator returns K per-patch logits per sample, as the official projected discriminator does (its
multi-scale heads end in a 4x4 convolution over a small map: one logit per patch, all scales concatenated);
K = 1 for the discriminators that end in one logit. A discriminator whose patches come from several feature
networks gives their counts per network in a `splits` attribute (summing to K; `projected.py` does); the GAN
losses average softplus over each network's patches and sum over the networks (`gdd.patch_softplus`, as the
official loss does per backbone). Without the attribute all K patches are one group.

- `MLPDiscriminator`: flat toy data (shape (D,)), K = 1.
- `ConvDiscriminator`: a plain convolutional discriminator for images, K = 1.
- `ProjectedDiscriminator`: trainable multi-scale patch heads on the feature maps of a *frozen* feature network
  (Projected GAN, Sauer et al. 2021), with two feature sources:
  `TeacherFeatures` (default: the teacher UNet's own encoder, read by forward hooks at a fixed sigma;
  no outside weights) and `BackboneFeatures` (a timm/torchvision ImageNet network from a local weights file).
- `projected` (`build_discriminator('projected', ...)`): the official GDD discriminator on frozen VGG16-BN and
  EfficientNet-lite0 features, from `diffdistill.methods.projected` (imported only when asked for).
Class conditioning is by projection (Miyato & Koyama 2018): each patch logit += <embed(y), phi_patch(x)>.

The image discriminators take `diffaug`: DiffAugment (Zhao et al. 2020; GDD's `--diffaug`, policy 'color,
translation,cutout') of every input, real or generated, drawn afresh per call inside the discriminator, so that the
R1 gradient flows through it as in the official code.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.denoiser import Denoiser, as_onehot
from ..errors import DiffdistillError


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.2)


# --------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al. 2020), policy 'color,translation,cutout' as in GDD's training/diffaug.py


def _rand(x: Tensor) -> Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def augment_color(x: Tensor) -> Tensor:
    """Per sample: brightness + U(-0.5, 0.5), saturation x U(0, 2), contrast x U(0.5, 1.5) (in that order)."""
    x = x + (_rand(x) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (_rand(x) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x) + 0.5) + mean


def augment_translation(x: Tensor, ratio: float = 0.125) -> Tensor:
    """Per sample integer shift (ty, tx), |t| <= round(ratio * size): out[i, j] = x[i + ty, j + tx], 0 outside."""
    b, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    cols = torch.arange(w, device=x.device).view(1, 1, w) + torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    index = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, c, -1)
    return x.flatten(2).gather(2, index).view_as(x) * inside.to(x.dtype)


def augment_cutout(x: Tensor, ratio: float = 0.2) -> Tensor:
    """Per sample a zeroed round(ratio * size) square centred uniformly on the image (clipped at the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device) - ch // 2
    left = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device) - cw // 2
    r = torch.arange(h, device=x.device).view(1, h, 1)
    c = torch.arange(w, device=x.device).view(1, 1, w)
    cut = (r >= top) & (r < top + ch) & (c >= left) & (c < left + cw)
    return x * (~cut).unsqueeze(1).to(x.dtype)


def diff_augment(x: Tensor) -> Tensor:
    """DiffAugment policy 'color,translation,cutout' on x in [-1, 1] [B, C, H, W]; differentiable in x."""
    return augment_cutout(augment_translation(augment_color(x)))


class MLPDiscriminator(nn.Module):
    """LeakyReLU MLP on flat points, with projection conditioning."""

    def __init__(self, dim: int, label_dim: int = 0, hidden: int = 128, depth: int = 3):
        super().__init__()
        self.label_dim = label_dim
        dims = [dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Linear(label_dim, hidden, bias=False) if label_dim else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = x.flatten(1)
        for layer in self.layers:
            h = _lrelu(layer(h))
        logits = self.out(h)
        if self.embed is not None and cond is not None:
            logits = logits + (self.embed(cond.to(h.dtype)) * h).sum(1, keepdim=True)
        return logits


class ConvDiscriminator(nn.Module):
    """Strided 3x3 convolutions halving the resolution down to 4x4 (or less), then a linear logit."""

    def __init__(self, shape, label_dim: int = 0, channels: int = 64, max_channels: int = 256,
                 diffaug: bool = False):
        super().__init__()
        self.diffaug = bool(diffaug)
        if len(shape) != 3:
            raise DiffdistillError(f"the conv discriminator needs images [C, H, W], got shape {tuple(shape)}")
        c, h, w = shape
        self.label_dim = label_dim
        layers = [nn.Conv2d(c, channels, 3, padding=1)]
        ch = channels
        while min(h, w) > 4:
            nxt = min(ch * 2, max_channels)
            layers.append(nn.Conv2d(ch, nxt, 3, stride=2, padding=1))
            ch, h, w = nxt, (h + 1) // 2, (w + 1) // 2
        self.convs = nn.ModuleList(layers)
        self.fc = nn.Linear(ch * h * w, ch)
        self.out = nn.Linear(ch, 1)
        self.embed = nn.Linear(label_dim, ch, bias=False) if label_dim else None

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        h = diff_augment(x) if self.diffaug else x
        for conv in self.convs:
            h = _lrelu(conv(h))
        h = _lrelu(self.fc(h.flatten(1)))
        logits = self.out(h)
        if self.embed is not None and cond is not None:
            logits = logits + (self.embed(cond.to(h.dtype)) * h).sum(1, keepdim=True)
        return logits


# --------------------------------------------------------------------------------------------------
# Frozen feature networks


class _Stop(Exception):
    """Raised by the last feature hook: the rest of the network (the decoder) is not needed."""


class TeacherFeatures(nn.Module):
    """Feature maps of the frozen teacher's encoder at a fixed noise level, read with forward hooks.

    The teacher is called as D(x + noise*sigma*n, sigma, cond); the output of the last encoder block of every
    resolution (`enc.{R}x{R}_*` of this project's UNet / EDM's SongUNet and DhariwalUNet) is a feature map,
    and the forward pass stops after the last one. Gradients flow to the input (for the generator and R1),
    never into the teacher's weights.
    """

    def __init__(self, teacher: Denoiser, sigma: float = 0.5, noise: bool = False,
                 layers: list[str] | None = None):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.sigma, self.noise = float(sigma), bool(noise)
        modules = dict(teacher.named_modules())
        self.layers = layers or self.default_layers(teacher)
        missing = [name for name in self.layers if name not in modules]
        if missing:
            raise DiffdistillError(f"teacher has no layer(s) {missing} to take features from")
        self._feats: dict[str, Tensor] = {}

    @staticmethod
    def default_layers(teacher: nn.Module) -> list[str]:
        """The last encoder module of each resolution, `<prefix>enc.{R}x{R}_<name>` (aux_* skipped)."""
        last: dict[str, str] = {}
        pattern = re.compile(r"^(.*\benc)\.(\d+x\d+)_(?!aux)[^.]+$")
        for name, _ in teacher.named_modules():
            m = pattern.match(name)
            if m:
                last[m.group(2)] = name
        if not last:
            raise DiffdistillError("the teacher-feature discriminator needs a UNet teacher with encoder "
                                   "blocks (`enc.<R>x<R>_*`, as this project's UNet and EDM's networks); "
                                   "use --disc conv")
        return list(last.values())

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self._feats[name] = output
            if len(self._feats) == len(self.layers):
                raise _Stop
        return hook

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()          # the frozen teacher never drops out
        return self

    def forward(self, x: Tensor, cond: Tensor | None = None) -> list[Tensor]:
        if self.noise:
            x = x + self.sigma * torch.randn_like(x)
        # Hooks live only during this call, so the teacher behaves normally everywhere else.
        modules = dict(self.teacher.named_modules())
        handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]
        self._feats = {}
        try:
            self.teacher(x, self.sigma, cond)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        feats, self._feats = [self._feats[name] for name in self.layers], {}
        return feats


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Weights from safetensors or a torch file read with weights_only=True (never unpickling code)."""
    path = Path(path)
    if not path.is_file():
        raise DiffdistillError(f"{path}: backbone weights file not found")
    if path.suffix == ".safetensors":
        from ..io import load_tensors
        return load_tensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the file's fault
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffdistillError(f"{path}: cannot load backbone weights ({msg})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DiffdistillError(f"{path}: not a state dict of tensors")
    return state


class BackboneFeatures(nn.Module):
    """Multi-scale features of a frozen ImageNet network `timm:NAME` / `torchvision:NAME`, weights from PATH.

    Images in [-1, 1] are mapped to [0, 1], grey is repeated to RGB, normalised with ImageNet statistics and
    resized bilinearly to `resolution` (as the official GDD discriminator does). timm and torchvision are
    optional dependencies.
    """

    def __init__(self, spec: str, weights: str | Path, resolution: int = 224):
        super().__init__()
        lib, _, name = spec.partition(":")
        if lib not in ("timm", "torchvision") or not name:
            raise DiffdistillError(f"backbone must be 'timm:NAME' or 'torchvision:NAME', got {spec!r}")
        state = load_state_dict_file(weights)
        try:
            if lib == "timm":
                import timm
                net = timm.create_model(name, pretrained=False, features_only=True)
            else:
                import torchvision
                from torchvision.models import feature_extraction
                full = torchvision.models.get_model(name, weights=None)
        except ImportError:
            raise DiffdistillError(f"the {spec} backbone needs the optional package '{lib}' "
                                   f"(pip install {lib})") from None
        except Exception as e:  # noqa: BLE001 - unknown model names
            raise DiffdistillError(f"cannot build backbone {spec!r} ({e})") from None
        target = net if lib == "timm" else full
        result = target.load_state_dict(state, strict=False)
        if result.missing_keys:
            raise DiffdistillError(f"{weights}: weights do not fit {spec} "
                                   f"(missing {result.missing_keys[:3]})")
        if lib == "torchvision":
            # Four feature maps: the outputs of evenly spaced graph nodes of the trunk.
            nodes = [n for n in feature_extraction.get_graph_node_names(full)[1]
                     if not n.startswith(("fc", "classifier", "head"))]
            picks = [nodes[int(len(nodes) * f) - 1] for f in (0.25, 0.5, 0.75, 0.95)]
            net = feature_extraction.create_feature_extractor(
                full, return_nodes={n: str(i) for i, n in enumerate(picks)})
        self.net = net.eval().requires_grad_(False)
        self.lib, self.resolution = lib, resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: Tensor, cond: Tensor | None = None) -> list[Tensor]:
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        out = self.net((x - self.mean) / self.std)
        return list(out.values()) if isinstance(out, dict) else list(out)


class _Head(nn.Module):
    """A patch discriminator on one feature map: 1x1 in, strided 3x3 convs down to <= 8x8, a 1x1 logit per
    patch [B, h*w]."""

    def __init__(self, channels_in: int, size: int, channels: int, label_dim: int):
        super().__init__()
        layers = [nn.Conv2d(channels_in, channels, 1)]
        while size > 8:
            layers.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
            size = (size + 1) // 2
        layers.append(nn.Conv2d(channels, channels, 3, padding=1))
        self.convs = nn.ModuleList(layers)
        self.out = nn.Conv2d(channels, 1, 1)
        self.embed = nn.Linear(label_dim, channels, bias=False) if label_dim else None

    def forward(self, f: Tensor, cond: Tensor | None) -> Tensor:
        h = f.float()
        for conv in self.convs:
            h = _lrelu(conv(h))
        logits = self.out(h)[:, 0]
        if self.embed is not None and cond is not None:
            logits = logits + torch.einsum("bc,bchw->bhw", self.embed(cond.to(h.dtype)), h)
        return logits.flatten(1)


class ProjectedDiscriminator(nn.Module):
    """Trainable heads on the feature maps of a frozen feature network; the patch logits of all scales
    concatenated, [B, K] (one feature network: one logit group)."""

    def __init__(self, features: nn.Module, shape, label_dim: int = 0, channels: int = 64, diffaug: bool = False):
        super().__init__()
        self.features = features
        self.diffaug = bool(diffaug)
        self.label_dim = label_dim
        with torch.no_grad():
            probe = features(torch.zeros(1, *shape), None if not label_dim else torch.zeros(1, label_dim))
        self.heads = nn.ModuleList(_Head(f.shape[1], f.shape[-1], channels, label_dim) for f in probe)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        feats = self.features(diff_augment(x) if self.diffaug else x, cond)
        return torch.cat([head(f, cond) for head, f in zip(self.heads, feats)], dim=1)


KINDS = ("auto", "projected", "teacher", "conv", "mlp", "backbone")


def build_discriminator(kind: str, shape, label_dim: int = 0, teacher: Denoiser | None = None,
                        channels: int = 64, teacher_sigma: float = 0.5, teacher_noise: bool = False,
                        backbone: str | None = None, backbone_weights: str | None = None,
                        vgg_weights: str | None = None, effnet_weights: str | None = None,
                        diffaug: bool = False) -> nn.Module:
    """kind: 'auto' (the official projected discriminator when both its weight files are given; else mlp for
    flat data, teacher features for UNet teachers, else conv), 'projected', 'teacher', 'conv', 'mlp' or
    'backbone'. diffaug: DiffAugment inside the discriminator (images only)."""
    shape = tuple(shape)
    if kind == "auto":
        if vgg_weights and effnet_weights:
            kind = "projected"
        elif len(shape) == 1:
            kind = "mlp"
        elif teacher is not None and any(True for _ in teacher.parameters()) and _has_encoder(teacher):
            kind = "teacher"
        else:
            kind = "conv"
    if diffaug and len(shape) != 3:
        raise DiffdistillError(f"DiffAugment (--diffaug) is for images [C, H, W], not samples of shape {shape}")
    if kind == "projected":
        return _official_projected(shape, label_dim, vgg_weights, effnet_weights, diffaug)
    if kind == "mlp":
        if len(shape) != 1:
            raise DiffdistillError(f"the MLP discriminator is for flat data (shape (D,)), got {shape}")
        return MLPDiscriminator(shape[0], label_dim, hidden=max(channels, 128))
    if kind == "conv":
        return ConvDiscriminator(shape, label_dim, channels, diffaug=diffaug)
    if kind == "teacher":
        if teacher is None or not any(True for _ in teacher.parameters()):
            raise DiffdistillError("the teacher-feature discriminator needs a network teacher "
                                   "(this one is analytic)")
        features = TeacherFeatures(teacher, teacher_sigma, teacher_noise)
        return ProjectedDiscriminator(features, shape, label_dim, channels, diffaug)
    if kind == "backbone":
        if not backbone or not backbone_weights:
            raise DiffdistillError("the backbone discriminator needs --disc-backbone "
                                   "timm:NAME|torchvision:NAME and --disc-backbone-weights PATH")
        features = BackboneFeatures(backbone, backbone_weights)
        return ProjectedDiscriminator(features, shape, label_dim, channels, diffaug)
    raise DiffdistillError(f"unknown discriminator {kind!r} ({', '.join(KINDS)})")


def _official_projected(shape, label_dim: int, vgg_weights: str | None, effnet_weights: str | None,
                        diffaug: bool = False) -> nn.Module:
    """The official GDD discriminator (`pg_modules/discriminator.py`), from `diffdistill.methods.projected`,
    imported only here."""
    if len(shape) != 3:
        raise DiffdistillError(f"the projected discriminator needs images [C, H, W], got shape {shape}")
    if not (vgg_weights and effnet_weights):
        raise DiffdistillError("the projected discriminator needs the weights of its frozen feature networks: "
                               "--disc-vgg-weights PATH (VGG16-BN) and --disc-effnet-weights PATH "
                               "(EfficientNet-lite0)")
    try:
        from .projected import build_projected_discriminator
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.projected":
            raise
        raise DiffdistillError("the projected discriminator (diffdistill.methods.projected) is not part of "
                               "this installation") from None
    return build_projected_discriminator(shape, label_dim, vgg_weights=vgg_weights, effnet_weights=effnet_weights,
                                         diffaug=diffaug)


def _has_encoder(teacher: nn.Module) -> bool:
    try:
        TeacherFeatures.default_layers(teacher)
    except DiffdistillError:
        return False
    return True


def onehot(cond: Tensor | None, label_dim: int, n: int, device) -> Tensor | None:
    """Int labels (or None) as one-hot rows for projection heads; None when unconditional."""
    if label_dim == 0 or cond is None:
        return None
    return as_onehot(cond, label_dim, n, device)


def r1_penalty(disc: nn.Module, x_real: Tensor, cond: Tensor | None = None) -> Tensor:
    """R1 (Mescheder et al. 2018): ||grad_x sum_k D_k(x_real)||^2 summed over pixels, per sample [B]; the sum
    runs over all K patch logits of a sample, as in the official GDD R1."""
    x = x_real.detach().requires_grad_(True)
    logits = disc(x, cond)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.flatten(1).pow(2).sum(1)


__all__ = ["KINDS", "MLPDiscriminator", "ConvDiscriminator", "TeacherFeatures", "BackboneFeatures",
           "ProjectedDiscriminator", "build_discriminator", "r1_penalty", "onehot", "load_state_dict_file"]
