"""Inception-v3 as used for FID and IS: the network of TensorFlow's `inception-2015-12-05` graph.

This is the TF-ported variant that pytorch-fid and torch-fidelity use (Szegedy et al. 2016 architecture with
the
TF graph's quirks): average pools inside the A, C and E1 blocks ignore the zero padding, the last E block
pools
with max instead of average, batch-norm eps is 1e-3 and the classifier has 1008 outputs. Parameter names and
shapes equal those of pytorch-fid's weight file `pt_inception-2015-12-05-6726825d.pth`, which this module
loads
with `torch.load(weights_only=True)` and `strict=True`. Nothing is downloaded: the user passes the file.

Input convention (torch-fidelity, = the TF graph, = guided-diffusion's evaluator): uint8 images are resized to
299x299 by TF1 bilinear resampling (`align_corners=False`, source coordinate = dst * in/out, no half-pixel
offset), then scaled by (x - 128) / 128. `resize='pytorch-fid'` selects pytorch-fid's convention instead: x/255,
then `F.interpolate(..., 299, 'bilinear', align_corners=False)` (half-pixel centres), then 2x - 1 =
(x - 127.5) / 127.5. The two never give the same features: even at 299x299, where both resizes are the
identity, the normalisations differ (by up to 1/128, at x = 255), and upsampled images (CIFAR-10's 32x32)
differ by the resampling too. So the resize mode is part of a reference's identity (`FeatureNet.identity`).

Only the file with sha256 `WEIGHTS_SHA256` gives the FID of the literature; `load_inception` warns loudly for
any other file of the same layout, and tables label it 'NON-STANDARD weights'.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DiffdistillError
from .features import FeatureNet, sha256_file, warn

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
ENV_VAR = "DIFFDISTILL_INCEPTION"
INPUT_SIZE = 299
RESIZE_MODES = ("tf1", "pytorch-fid")
# The pixel normalisation of each resize mode (stable tokens: references record and compare them).
NORMALISATION = {"tf1": "(x-128)/128", "pytorch-fid": "2*(x/255)-1"}
MIXED_BLOCKS = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c")


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's value) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    # TF's 3x3 "SAME" average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (`Mixed_5b..d`)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (`Mixed_6a`)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (`Mixed_6b..e`)."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (`Mixed_7a`)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs (`Mixed_7b`: avg pool; `Mixed_7c`: max pool, as in the TF
    graph)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TF1 `resize_bilinear(align_corners=False)`: source coordinate i * in/out (no half-pixel offset), the
    upper
    neighbour clamped to the last row/column; separable, rows then columns."""
    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo.to(x.device), hi.to(x.device), (src - lo).to(x.dtype).to(x.device)

    ylo, yhi, dy = axis(x.shape[2])
    xlo, xhi, dx = axis(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]
    rows = top + (bottom - top) * dy[:, None]
    left, right = rows[..., xlo], rows[..., xhi]
    return left + (right - left) * dx


class InceptionV3(FeatureNet):
    """FID Inception-v3: 2048-d pool features and 1008-class logits (pool @ fc.weight^T, without the bias, as
    the
    original Inception Score code and torch-fidelity's IS use)."""

    def __init__(self, resize: str = "tf1", weights_path: str | None = None):
        if resize not in RESIZE_MODES:
            raise DiffdistillError(f"unknown Inception resize mode {resize!r} "
                                   f"(one of {', '.join(RESIZE_MODES)})")
        super().__init__(name="inception", feature_dim=2048, num_classes=1008, in_channels=3, resolution=None,
                         weights_sha256=None, weights_path=weights_path)
        self.resize = resize
        self.normalisation = NORMALISATION[resize]
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32)
        self.Mixed_5c = FIDInceptionA(256, 64)
        self.Mixed_5d = FIDInceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, 128)
        self.Mixed_6c = FIDInceptionC(768, 160)
        self.Mixed_6d = FIDInceptionC(768, 160)
        self.Mixed_6e = FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def describe(self) -> dict:
        return {**super().describe(), "standard_weights": self.weights_sha256 == WEIGHTS_SHA256}

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 images [B, C, H, W] -> the network's input [B, 3, 299, 299] (resize, then normalise)."""
        x = images.float()
        if x.shape[1] == 1:  # grey images (MNIST): replicate to RGB, the usual practice
            x = x.expand(-1, 3, -1, -1)
        if self.resize == "tf1":
            if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
                x = resize_bilinear_tf1(x, INPUT_SIZE)
            return (x - 128) / 128
        x = F.interpolate(x / 255, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def embed(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = self.preprocess(images)
        # Stem: 299 -> 149 -> 147 -> 147 -> maxpool 73 -> 73 -> 71 -> maxpool 35.
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in MIXED_BLOCKS:  # 35x35 (5b-d) -> 17x17 (6a-e) -> 8x8 (7a-c)
            x = getattr(self, name)(x)
        pool = x.mean(dim=(2, 3))                                   # [B, 2048]
        return pool, pool @ self.fc.weight.T                        # logits without bias (IS convention)


def resolve_inception_path(path: str | os.PathLike | None = None) -> Path:
    """The weight file: `path`, else $DIFFDISTILL_INCEPTION; a clear error saying where to get it
    otherwise."""
    path = path or os.environ.get(ENV_VAR)
    hint = (f"download {WEIGHTS_URL} (pytorch-fid's FID Inception weights) and pass it with --inception PATH "
            f"or the environment variable {ENV_VAR}")
    if not path:
        raise DiffdistillError(f"no Inception-v3 weights given: {hint}")
    path = Path(path)
    if not path.is_file():
        raise DiffdistillError(f"{path}: Inception-v3 weight file not found; {hint}")
    return path


def load_inception(path: str | os.PathLike | None = None, device="cpu", resize: str = "tf1") -> InceptionV3:
    """Build the FID Inception-v3 and load `pt_inception-2015-12-05-6726825d.pth` strictly (no code
    unpickled)."""
    path = resolve_inception_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable/unsafe file is a user error)
        raise DiffdistillError(f"{path}: not a readable PyTorch weight file ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DiffdistillError(f"{path}: not a state_dict of tensors (expected {WEIGHTS_NAME})")
    net = InceptionV3(resize=resize, weights_path=str(path))
    expected = net.state_dict()
    state = dict(state)
    # BatchNorm's `num_batches_tracked` counters are unused at inference; tolerate files saved without them.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=torch.long)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing keys, e.g. {missing[:2]}"] if missing else []
        parts += [f"{len(unexpected)} unexpected keys, e.g. {unexpected[:2]}"] if unexpected else []
        raise DiffdistillError(f"{path}: not the FID Inception-v3 weights ({'; '.join(parts)})")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise DiffdistillError(f"{path}: tensor {key} has shape {tuple(value.shape)}, the FID "
                                   f"Inception-v3 needs {tuple(expected[key].shape)}")
    net.load_state_dict(state, strict=True)
    net.weights_sha256 = sha256_file(path)
    if net.weights_sha256 != WEIGHTS_SHA256:
        warn(f"{path}: Inception-v3 weights of the right layout but NOT the standard FID file {WEIGHTS_NAME} "
             f"(sha256 {net.weights_sha256[:16]}..., expected {WEIGHTS_SHA256[:16]}...): FID/KID/IS measured with "
             "them are not comparable with published numbers")
    return net.to(device).eval().requires_grad_(False)


def adm_identity() -> dict:
    """The feature network of guided-diffusion's (ADM's) evaluator, which made the `mu`/`sigma` of its reference
    batches: TF's inception-2015-12-05 graph, pool_3 (2048-d), fed uint8 images that the graph resizes with TF1
    bilinear and scales by (x - 128) / 128. pytorch-fid's weight file is that graph's weights, so this is the
    identity of `load_inception(standard file, resize='tf1')`."""
    return dict(name="inception", weights_sha256=WEIGHTS_SHA256, resize="tf1", normalisation=NORMALISATION["tf1"],
                feature_dim=2048)
