"""Feature networks for the metrics, and streaming feature extraction.

A `FeatureNet` maps images [B, C, H, W] (uint8 in 0..255, or float in [-1, 1]) to features [B, F] and, when it
is a classifier, logits [B, C] for the Inception Score. Float images are first quantised to uint8 exactly as
image files are written (EDM: `(x * 127.5 + 128).clip(0, 255).to(uint8)`), so features of streamed samples
equal
those of the same samples saved as PNGs.

Two kinds: the FID Inception-v3 (`metrics/inception.py`, weights supplied by the user) and small CNN
classifiers
that diffdistill trains itself (`diffdistill features train`); the one for `digits` ships in
`diffdistill/assets/`. A classifier file is `NAME.safetensors` plus `NAME.json` ({"type": "classifier",
"config": ClassifierConfig, "meta": {...}}).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.images import subset_indices  # noqa: F401  (EDM's seeded subset rule, used with these features)
from ..errors import DiffdistillError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_CLASSIFIER = ASSETS / "digits_classifier.safetensors"
FEATURE_NETS = ("digits", "inception", "PATH.safetensors (a classifier from `features train`)",
                "PATH.pth (Inception weights)")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def warn(message: str) -> None:
    """A loud warning on stderr (once, from the main rank): 'WARNING: message'."""
    import sys

    from ..dist import print0

    print0(f"WARNING: {message}", file=sys.stderr)


def to_uint8(images: Tensor) -> Tensor:
    """uint8 images unchanged; float images in [-1, 1] quantised as image files are written (EDM
    convention)."""
    if images.dtype == torch.uint8:
        return images
    if not images.dtype.is_floating_point:
        raise DiffdistillError(f"images must be uint8 or float in [-1, 1], got dtype {images.dtype}")
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


class FeatureNet(nn.Module):
    """Base class: `forward(images) -> (features float32 [B, F], logits [B, num_classes] or None)`.

    Subclasses implement `embed(uint8 images) -> (features, logits)`; `forward` validates and quantises.
    """

    def __init__(self, name: str, feature_dim: int, num_classes: int, in_channels: int,
                 resolution: int | None,
                 weights_sha256: str | None = None, weights_path: str | None = None):
        super().__init__()
        self.name = name
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)        # 0: no logits (IS unavailable)
        self.in_channels = int(in_channels)
        self.resolution = resolution               # None: any size (the network resizes)
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path

    # How uint8 pixels reach the network (part of its identity: the same weights fed differently give other
    # features). Subclasses that resize or normalise otherwise override both.
    resize: str | None = None
    normalisation = "x/127.5-1"   # a stable token, compared between records: uint8 x -> [-1, 1], native size

    def identity(self) -> dict:
        """What makes two networks' features comparable: name, weights sha256, resize mode, normalisation,
        feature dimension. Recorded with every reference and result, compared by `check_same_feature_net`."""
        return dict(name=self.name, weights_sha256=self.weights_sha256, resize=self.resize,
                    normalisation=self.normalisation, feature_dim=self.feature_dim)

    def describe(self) -> dict:
        """What a result record says about the feature network: its identity and the weight file."""
        return dict(self.identity(), weights=self.weights_path)

    def label(self) -> str:
        """A short name for printed tables: 'digits_classifier classifier, not Inception', 'Inception tf1'."""
        return net_label(self.describe())

    def check_images(self, images: Tensor) -> None:
        """Raise a one-line error when `images` cannot be fed to this network."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DiffdistillError(f"feature network {self.name!r} needs image batches [B, C, H, W], "
                                   f"got {shape}")
        c, h, w = images.shape[1:]
        channels_ok = c == self.in_channels or (self.in_channels == 3 and c == 1 and self.resolution is None)
        size_ok = self.resolution is None or (h == self.resolution and w == self.resolution)
        if not channels_ok or not size_ok:
            want = f"{self.in_channels}x{self.resolution}x{self.resolution}" if self.resolution else \
                f"{self.in_channels} (or 1) channels"
            raise DiffdistillError(f"feature network {self.name!r} expects images of {want}, got {c}x{h}x{w}")

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        self.check_images(images)
        device = next(self.parameters()).device
        features, logits = self.embed(to_uint8(images).to(device))
        return features.float(), None if logits is None else logits.float()


def net_label(desc: dict | None) -> str:
    """How tables name a feature network (from `FeatureNet.describe()` or a recorded identity):
    'Inception-v3 FID weights, tf1 resize', 'Inception-v3, NON-STANDARD weights, tf1 resize',
    'digits classifier, not Inception'."""
    from .inception import WEIGHTS_SHA256

    if not desc:
        return "unknown feature network"
    name = str(desc.get("name") or "unnamed")
    if name == "inception":
        weights = "FID weights" if desc.get("weights_sha256") == WEIGHTS_SHA256 else "NON-STANDARD weights"
        return f"Inception-v3 {weights}, {desc.get('resize') or 'unknown'} resize"
    name = name.replace("_", " ")
    return f"{name if name.endswith('classifier') else name + ' classifier'}, not Inception"


def _identity_text(ident: dict, keys) -> str:
    return ", ".join(f"{k} {str(ident.get(k))[:16] if k == 'weights_sha256' else ident.get(k)}" for k in keys)


def check_same_feature_net(made: dict | None, used: dict, where: str) -> list[str]:
    """Compare the feature network a reference was made with (`made`, its recorded identity) with the one in
    use (`used`); raise a one-line error when they differ, return warnings for what cannot be checked.

    Compared: the weights sha256, the resize mode, the normalisation and the feature dimension, i.e. what
    decides the features. The name is compared only when a side has no sha256 (a renamed copy of the same
    weight file gives the same features). A reference without a record (pytorch-fid/EDM statistics, files of
    older diffdistill versions) is accepted with a warning: it cannot be checked.
    """
    if not made:
        return [f"{where}: the reference does not record its feature network (pytorch-fid/EDM statistics or an "
                f"older file), so it cannot be checked against {net_label(used)}: make sure it was computed "
                "with the same network, weights and resize"]
    keys = ["weights_sha256", "resize", "normalisation", "feature_dim"]
    if not (made.get("weights_sha256") and used.get("weights_sha256")):
        keys.insert(0, "name")
    # Older records lack resize/normalisation: for a classifier the sha256 fixes both (there is one input
    # convention); for Inception the resize decides the features and its absence is reported.
    unchecked = [k for k in keys if k not in made]
    differ = [k for k in keys if k in made and made.get(k) != used.get(k)]
    if differ:
        raise DiffdistillError(f"{where}: the reference was made with another feature network "
                               f"({net_label(made)}: {_identity_text(made, differ)}) than this evaluation uses "
                               f"({net_label(used)}: {_identity_text(used, differ)}); recompute it with "
                               "`diffdistill ref-stats` and the same --features/--inception/--resize")
    if used.get("name") == "inception" and "resize" in unchecked:
        return [f"{where}: the reference does not record its Inception resize mode, so it cannot be checked "
                f"against '{used.get('resize')}'"]
    return []


# --------------------------------------------------------------------------------------------------
# Small classifiers trained by diffdistill


@dataclass
class ClassifierConfig:
    """A small CNN: per stage two 3x3 conv + SiLU, then 2x2 average pool; flatten; linear + SiLU =
    features."""

    in_channels: int = 1                   # image channels (1 grey, 3 RGB)
    resolution: int = 8                    # image height = width; divisible by 2 ** len(widths)
    widths: list[int] = field(default_factory=lambda: [16, 32])  # channels of each stage
    feature_dim: int = 64                  # width of the penultimate layer = the feature vector
    num_classes: int = 10                  # number of logits (classes of the training labels)


# Presets by data shape (C, H, W): digits 8x8 grey, MNIST 28x28 grey, CIFAR-10 32x32 RGB.
PRESETS: dict[tuple[int, int, int], ClassifierConfig] = {
    (1, 8, 8): ClassifierConfig(1, 8, [16, 32], 64, 10),
    (1, 28, 28): ClassifierConfig(1, 28, [32, 64], 128, 10),
    (3, 32, 32): ClassifierConfig(3, 32, [32, 64, 128], 256, 10),
}


def preset_for(shape, num_classes: int = 10) -> ClassifierConfig:
    """The preset for images of `shape` (C, H, W), or a generic one for other square sizes."""
    shape = tuple(int(s) for s in shape)
    if shape in PRESETS:
        return ClassifierConfig(**{**asdict(PRESETS[shape]), "num_classes": num_classes})
    if len(shape) != 3 or shape[1] != shape[2]:
        raise DiffdistillError(f"a classifier needs square images [C, H, W], got shape {shape}")
    stages = 0
    while shape[1] % (2 ** (stages + 1)) == 0 and shape[1] // 2 ** (stages + 1) >= 4 and stages < 4:
        stages += 1
    widths = [32 * 2**i for i in range(max(stages, 1))]
    return ClassifierConfig(shape[0], shape[1], widths[:stages] if stages else [32], 128, num_classes)


class Classifier(FeatureNet):
    """The small CNN of `ClassifierConfig`; features = the penultimate layer, logits = the class head."""

    def __init__(self, config: ClassifierConfig, name: str = "classifier"):
        reduce = 2 ** len(config.widths)
        if config.resolution % reduce or not config.widths or min(config.feature_dim, config.num_classes) < 1:
            raise DiffdistillError(f"bad classifier config {asdict(config)}: the resolution must be "
                                   f"divisible by 2 ** len(widths) = {reduce}, with >= 1 stage and class")
        super().__init__(name, config.feature_dim, config.num_classes, config.in_channels, config.resolution)
        self.config = config
        layers: list[nn.Module] = []
        cin = config.in_channels
        for width in config.widths:
            layers += [nn.Conv2d(cin, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                       nn.SiLU(), nn.AvgPool2d(2)]
            cin = width
        self.body = nn.Sequential(*layers)
        flat = cin * (config.resolution // reduce) ** 2
        self.penultimate = nn.Linear(flat, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images  # to [-1, 1]
        features = F.silu(self.penultimate(self.body(x).flatten(1)))
        return features, self.head(features)


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_classifier(net: Classifier, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write `path` (.safetensors) and its JSON config beside it; returns the weights path."""
    from ..io import atomic_save_tensors, atomic_write_json

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    atomic_save_tensors(path, net.state_dict())
    atomic_write_json(_json_path(path), dict(type="classifier", config=asdict(net.config), meta=meta or {}))
    return path


def load_classifier(path: str | os.PathLike, device="cpu") -> Classifier:
    """Load a classifier from `NAME.safetensors` (or `NAME.json`); errors name the file and the mismatch."""
    from ..io import load_state_strict, load_tensors

    path = Path(path)
    weights = path.with_suffix(".safetensors")
    config_path = _json_path(weights)
    for p in (weights, config_path):
        if not p.is_file():
            raise DiffdistillError(f"{p}: classifier file not found (a classifier is NAME.safetensors + "
                                   "NAME.json)")
    try:
        spec = json.loads(config_path.read_text())
        if spec.get("type") != "classifier":
            raise KeyError("type")
        names = {f.name for f in fields(ClassifierConfig)}
        unknown = set(spec["config"]) - names
        if unknown:
            raise KeyError(f"unknown keys {sorted(unknown)}")
        config = ClassifierConfig(**spec["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DiffdistillError(f"{config_path}: not a diffdistill classifier config ({e})") from None
    net = Classifier(config, name=weights.stem)
    load_state_strict(net, load_tensors(weights), weights, config_path.name)
    net.weights_path = str(weights)
    net.weights_sha256 = sha256_file(weights)
    net.meta = spec.get("meta", {})
    return net.to(device).eval().requires_grad_(False)


def load_feature_net(spec: str, inception: str | None = None, device="cpu",
                     resize: str = "tf1") -> FeatureNet:
    """`digits` (shipped classifier), `inception` (weights from `inception` or $DIFFDISTILL_INCEPTION), a
    classifier file (`.safetensors`/`.json`) or an Inception weight file (`.pth`)."""
    from .inception import load_inception

    if spec == "digits":
        if not DIGITS_CLASSIFIER.is_file():
            raise DiffdistillError(f"{DIGITS_CLASSIFIER}: the shipped digits classifier is missing "
                                   "(re-create it with scripts/make_digits_classifier.py)")
        return load_classifier(DIGITS_CLASSIFIER, device)
    if spec == "inception":
        return load_inception(inception, device, resize=resize)
    path = Path(spec)
    if path.suffix in (".pth", ".pt"):
        return load_inception(path, device, resize=resize)
    if path.suffix in (".safetensors", ".json"):
        return load_classifier(path, device)
    raise DiffdistillError(f"unknown feature network {spec!r} (one of: {', '.join(FEATURE_NETS)})")


# A classifier whose held-out accuracy is below this is a poor feature network: `features train` warns. The
# classifiers here exist for data Inception does not suit (8x8 digits, MNIST), where small CNNs reach well above 90%;
# below 90% the features do not separate the classes well, so FID/KID/IS from them miss what makes a sample
# look like one class or another (train longer, or use more data; natural images want Inception).
POOR_ACCURACY = 0.9


def accuracy_warning(result: dict) -> str | None:
    """The warning for a `train_classifier` result whose held-out accuracy is poor or unmeasured (None: fine)."""
    acc = result.get("holdout_accuracy")
    if acc is None or acc != acc:  # NaN: no held-out split
        return ("no held-out images (--holdout 0): the classifier's accuracy is unmeasured, so nothing says its "
                "features are good enough for FID/KID/IS")
    if acc < POOR_ACCURACY:
        return (f"held-out accuracy {acc:.3f} is below {POOR_ACCURACY:.2f}: a poor feature network (its features "
                "separate the classes badly, so FID/KID/IS computed with it miss class structure); train longer "
                "or on more data")
    return None


@dataclass
class ClassifierTraining:
    """How `train_classifier` fits a classifier (Adam, cosine-decayed learning rate, light augmentation)."""

    epochs: int = 30              # passes over the training split
    batch_size: int = 128         # images per step
    lr: float = 2e-3              # peak Adam learning rate (cosine decay to 0)
    weight_decay: float = 1e-4    # AdamW weight decay
    holdout: float = 0.2          # fraction of the data held out to measure accuracy
    shift: int = 1                # random translation by up to this many pixels (0 = off)
    xflip: bool = False           # random horizontal flips (for natural images; never for digits)
    seed: int = 0                 # seed of the split, the initialisation and the batches


def _augment(x: Tensor, cfg: ClassifierTraining, gen: torch.Generator) -> Tensor:
    if cfg.shift:
        s = cfg.shift
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        dy, dx = (int(v) for v in torch.randint(0, 2 * s + 1, (2,), generator=gen))
        x = padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    if cfg.xflip:
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def train_classifier(images: Tensor, labels: Tensor, config: ClassifierConfig | None = None,
                     training: ClassifierTraining | None = None, log=print) -> tuple[Classifier, dict]:
    """Fit a classifier on uint8 images [N, C, H, W] and int labels [N]; returns it (eval mode) and
    {'holdout_accuracy', 'train_accuracy', 'n_train', 'n_holdout'}."""
    training = training or ClassifierTraining()
    images, labels = to_uint8(torch.as_tensor(images)), torch.as_tensor(labels).long()
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise DiffdistillError(f"need images [N, C, H, W] and labels [N], got {tuple(images.shape)} and "
                               f"{tuple(labels.shape)}")
    if int(labels.min()) < 0:
        raise DiffdistillError("training a classifier needs class labels (this data set is unlabelled)")
    num_classes = int(labels.max()) + 1
    config = config or preset_for(images.shape[1:], num_classes)
    torch.manual_seed(training.seed)
    net = Classifier(config)
    gen = torch.Generator().manual_seed(training.seed)
    order = torch.randperm(len(images), generator=gen)
    n_hold = int(round(training.holdout * len(images)))
    hold, train = order[:n_hold], order[n_hold:]
    opt = torch.optim.AdamW(net.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    steps = training.epochs * max(1, -(-len(train) // training.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for epoch in range(training.epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        total = 0.0
        for lo in range(0, len(perm), training.batch_size):
            idx = perm[lo:lo + training.batch_size]
            x = _augment(images[idx].float() / 127.5 - 1, training, gen)
            loss = F.cross_entropy(net.embed(x)[1], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log and (epoch + 1) % max(1, training.epochs // 10) == 0:
            log(f"epoch {epoch + 1}/{training.epochs}: loss {total / len(train):.4f}")
    net.eval().requires_grad_(False)

    def accuracy(idx: Tensor) -> float:
        if len(idx) == 0:
            return float("nan")
        hits = 0
        for lo in range(0, len(idx), 512):
            hits += int((net(images[idx[lo:lo + 512]])[1].argmax(1) == labels[idx[lo:lo + 512]]).sum())
        return hits / len(idx)

    return net, dict(holdout_accuracy=accuracy(hold), train_accuracy=accuracy(train), n_train=len(train),
                     n_holdout=len(hold))


# --------------------------------------------------------------------------------------------------
# Streaming extraction


def dataset_batches(dataset, batch_size: int = 256, n: int | None = None, start: int = 0, indices=None):
    """Image batches [B, C, H, W] (float in [-1, 1]) of `dataset[start : start + n]`, or of the items
    `indices` in that order when given (`ds[i] -> (x, label)`)."""
    if indices is None:
        stop = len(dataset) if n is None else min(len(dataset), start + n)
        indices = range(start, stop)
    indices = [int(i) for i in indices]
    for lo in range(0, len(indices), batch_size):
        yield torch.stack([torch.as_tensor(dataset[i][0]) for i in indices[lo:lo + batch_size]])


def compute_features(feature_net: FeatureNet, images: Iterable, *, limit: int | None = None,
                     source: str | None = None, gather: bool = True, progress: bool = False
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and logits) of every image an iterable of batches yields, as float64 arrays [N, F], [N, C].

    Batches may be tensors [B, C, H, W] or (images, labels) tuples. Under torchrun each rank passes its own
    shard; with `gather` the rows are concatenated across ranks in rank order (`dist.all_gather_cat`).
    """
    from ..dist import all_gather_cat

    feats, logits, count = [], [], 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=limit, unit="img", desc=f"features ({feature_net.name})", leave=False)
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = torch.as_tensor(batch)
        if limit is not None:
            batch = batch[: limit - count]
        if batch.shape[0] == 0:
            break
        try:
            f, lg = feature_net(batch)
        except DiffdistillError as e:
            raise DiffdistillError(f"{source}: {e}" if source else str(e)) from None
        feats.append(f.cpu())
        if lg is not None:
            logits.append(lg.cpu())
        count += batch.shape[0]
        if bar is not None:
            bar.update(batch.shape[0])
        if limit is not None and count >= limit:
            break
    if bar is not None:
        bar.close()
    features = torch.cat(feats) if feats else torch.zeros(0, feature_net.feature_dim)
    logit_t = torch.cat(logits) if logits else None
    if gather:
        device = next(feature_net.parameters()).device
        features = all_gather_cat(features.to(device)).cpu()
        logit_t = None if logit_t is None else all_gather_cat(logit_t.to(device)).cpu()
    return features.double().numpy(), None if logit_t is None else logit_t.double().numpy()


def check_count(n: int, needed: int, what: str, source: str | None = None) -> None:
    """A one-line error when there are fewer than `needed` samples for `what`."""
    if n < needed:
        where = f"{source}: " if source else ""
        raise DiffdistillError(f"{where}{what} needs at least {needed} samples, got {n}")

