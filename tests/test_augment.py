"""EDM's geometric augmentation pipeline (diffdistill.methods.augment) and the augment labels of Precond.

Each transform alone, with p = 1, is checked against its closed form on a smooth image (exact for flips and
integer translations, within the resampling filter's error for rotations and scalings), the 9-d label layout
entry by entry, the draw rates (p per transform; x-flips always a fair coin) and determinism under the seed.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.methods.augment import LABEL_DIM, AugmentParams, AugmentPipe, augment_dim
from diffdistill.networks.mlp import MLP
from diffdistill.networks.unet import unet_preset
from diffdistill.teachers.analytic import Gaussian

torch.set_num_threads(1)

H = W = 32
YY, XX = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")


def smooth(x, y):
    """A smooth 3-channel image as a function of centred pixel coordinates (x right, y down)."""
    def f(a, b):
        return torch.sin(0.25 * a + 0.3) + 0.5 * torch.cos(0.2 * b - 0.1 * a)
    return torch.stack([f(x, y), f(y, x), f(0.5 * x, y)])[None].float()


IMG = smooth(XX, YY)


def params(n=1, **kw) -> AugmentParams:
    z = torch.zeros(n)
    d = dict(xflip=z, yflip=z, scale=z, rotate=z, aniso=z, aniso_angle=z, translate=torch.zeros(2, n))
    d.update({k: torch.as_tensor(v, dtype=torch.float32).reshape(d[k].shape) for k, v in kw.items()})
    return AugmentParams(**d)


def interior(t, m=8):
    return t[..., m:-m, m:-m]


def test_p0_is_the_identity_with_zero_labels():
    torch.manual_seed(0)
    x = torch.randn(16, 3, H, W)
    y, labels = AugmentPipe(p=0.0)(x)
    assert labels.shape == (16, LABEL_DIM) and labels.dtype == torch.float32
    assert float(labels.abs().max()) == 0.0
    # The oversampled resampling chain (orthonormal filter) leaves the images as they were, to float rounding.
    assert float((y - x).abs().max()) < 1e-4


def test_flips_are_exact_and_labelled():
    pipe = AugmentPipe(p=1.0)
    x = torch.randn(2, 3, H, W)
    y, labels = pipe.apply(x, params(2, xflip=[1, 0]))
    assert torch.allclose(y[0], x[0].flip(2), atol=1e-4) and torch.allclose(y[1], x[1], atol=1e-4)
    assert labels.tolist() == [[1.0] + [0.0] * 8, [0.0] * 9]
    y, labels = pipe.apply(x, params(2, yflip=[0, 1]))
    assert torch.allclose(y[1], x[1].flip(1), atol=1e-4) and torch.allclose(y[0], x[0], atol=1e-4)
    assert labels[1].tolist() == [0.0, 1.0] + [0.0] * 7
    # Flips alone skip the resampling: exact.
    y, _ = AugmentPipe(p=1.0, yflip=0, scale=0, rotate=0, aniso=0, translate=0).apply(x, params(2, xflip=[1, 1]))
    assert torch.equal(y, x.flip(3))


def test_integer_translation_moves_pixels():
    """translate w = (3, -2) pixels / (0.125 * size): content moves 3 right and 2 up; labels are w."""
    wx, wy = 3 / (W * 0.125), -2 / (H * 0.125)
    y, labels = AugmentPipe(p=1.0).apply(IMG, params(translate=[wx, wy]))
    shifted = torch.roll(IMG, shifts=(-2, 3), dims=(2, 3))
    assert float(interior(y - shifted, 4).abs().max()) < 1e-4
    assert labels[0].tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 0, wx, wy])


@pytest.mark.parametrize("case", ["rotate90", "rotate30", "scale", "aniso", "aniso_rotated"])
def test_geometric_transforms_match_their_closed_form(case):
    """out(p) = in(G^-1 p) with G^-1 = S(1/s) R(a) [R(-r) S(1/t, t) R(r)] T(-d) (EDM's inverse map)."""
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    u = 5.0                                 # 2^(0.2 * 5) = 2
    r = math.pi / 4
    cr, sr = math.cos(r), math.sin(r)
    table = {
        # rotation by a: (x, y) -> (cos a x - sin a y, sin a x + cos a y); labels cos a - 1, sin a
        "rotate90": (dict(rotate=math.pi / 2), (-YY, XX), [0, 0, 0, -1, 1, 0, 0, 0, 0]),
        "rotate30": (dict(rotate=math.pi / 6), (c * XX - s * YY, s * XX + c * YY), [0, 0, 0, c - 1, s, 0, 0, 0, 0]),
        # isotropic scale s = 2: content magnified; label u
        "scale": (dict(scale=u), (XX / 2, YY / 2), [0, 0, u, 0, 0, 0, 0, 0, 0]),
        # anisotropic: x stretched by 2, y squeezed by 2; labels v cos r, v sin r
        "aniso": (dict(aniso=u), (XX / 2, 2 * YY), [0, 0, 0, 0, 0, u, 0, 0, 0]),
        "aniso_rotated": (dict(aniso=u, aniso_angle=r),
                          _aniso_rotated(r), [0, 0, 0, 0, 0, u * cr, u * sr, 0, 0]),
    }
    kw, (gx, gy), label = table[case]
    y, labels = AugmentPipe(p=1.0).apply(IMG, params(**kw))
    err = float(interior(y - smooth(gx, gy)).abs().max())
    assert err < 0.05, err                      # measured 0.007-0.029 (the symlet filter is not symmetric)
    assert labels[0].tolist() == pytest.approx(label, abs=1e-6)
    if case == "rotate90":
        assert float(interior(y - torch.rot90(IMG, 1, dims=(2, 3))).abs().max()) < 0.05
        assert float(interior(y - torch.rot90(IMG, -1, dims=(2, 3))).abs().max()) > 0.5   # the other way: far


def _aniso_rotated(r):
    """R(-r) S(1/2, 2) R(r) applied to (x, y)."""
    c, s = math.cos(r), math.sin(r)
    x1, y1 = c * XX - s * YY, s * XX + c * YY          # R(r)
    x2, y2 = x1 / 2, 2 * y1                           # S(1/2, 2)
    return c * x2 + s * y2, -s * x2 + c * y2          # R(-r)


def test_label_layout_and_rates():
    """Labels: [xflip, yflip, u, cos a - 1, sin a, v cos r, v sin r, w_x, w_y]; each transform with probability p
    (translations on both axes together), x-flips a fair coin on every image (xflip = 1e8, as EDM's setting)."""
    torch.manual_seed(0)
    n, p = 20000, 0.12
    pipe = AugmentPipe(p=p)
    labels = pipe.labels(pipe.sample(n, torch.device("cpu")))
    assert labels.shape == (n, 9) and pipe.label_dim == 9
    assert set(labels[:, 0].unique().tolist()) == {0.0, 1.0} and set(labels[:, 1].unique().tolist()) == {0.0, 1.0}
    se = math.sqrt(p * (1 - p) / n)
    assert float(labels[:, 0].mean()) == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / n))
    assert float(labels[:, 1].mean()) == pytest.approx(p / 2, abs=4 * se)
    for cols in ([2], [3, 4], [5, 6], [7, 8]):
        drawn = (labels[:, cols] != 0).any(1).double().mean()
        assert float(drawn) == pytest.approx(p, abs=4 * se), cols
    assert bool(((labels[:, 7] != 0) == (labels[:, 8] != 0)).all())
    a = torch.atan2(labels[:, 4], labels[:, 3] + 1)                 # cos/sin labels of one angle in (-pi, pi]
    assert torch.allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(n), atol=1e-5)
    assert float(a.abs().max()) > 3.0
    # Subsets keep the order of the enabled transforms.
    assert AugmentPipe(p=1.0, xflip=0, yflip=0, rotate=0, aniso=0).label_dim == 3      # scale, translate
    assert AugmentPipe(p=1.0, scale=0, rotate=0, aniso=0, translate=0).label_dim == 2  # the flips


def test_deterministic_under_the_seed():
    x = torch.randn(8, 3, 16, 16)
    pipe = AugmentPipe(p=0.5)
    torch.manual_seed(3)
    a = pipe(x)
    torch.manual_seed(3)
    b = pipe(x)
    torch.manual_seed(4)
    c = pipe(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_bad_input():
    from diffdistill.errors import DiffdistillError
    with pytest.raises(DiffdistillError, match="probability"):
        AugmentPipe(p=1.5)
    with pytest.raises(DiffdistillError, match="images"):
        AugmentPipe()(torch.zeros(4, 2))


def test_precond_passes_augment_labels_to_its_backbone():
    torch.manual_seed(0)
    net = unet_preset("tiny", 8, 3, augment_dim=9)
    with torch.no_grad():                        # random weights everywhere (the last convs start near 0)
        for w in net.parameters():
            w.normal_(0, 0.2)
    d = Precond(net, (3, 8, 8), 0, PrecondConfig(kind="edm")).eval()
    assert augment_dim(d) == 9
    x, sigma = torch.randn(4, 3, 8, 8), torch.full((4,), 0.7)
    labels = torch.randn(4, 9)
    seen = []
    forward = net.forward
    net.forward = lambda *a, **kw: seen.append(kw.get("augment_labels")) or forward(*a, **kw)
    with torch.no_grad():
        plain, lab = d(x, sigma), d(x, sigma, augment_labels=labels)
        zero = d(x, sigma, augment_labels=torch.zeros(4, 9))
    assert seen[0] is None and torch.equal(seen[1], labels)
    assert torch.allclose(plain, zero)          # no labels = zero labels (map_augment has no bias)
    assert float((plain - lab).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="augment labels must have shape"):
        d(x, sigma, augment_labels=torch.zeros(4))
    # Networks without augment labels, and denoisers that are not Precond, refuse them.
    mlp = Precond(MLP(4, hidden=16, num_layers=2), (4,))
    assert augment_dim(mlp) == 0
    with pytest.raises(ValueError, match="augment_dim 0"):
        mlp(torch.zeros(2, 4), 1.0, augment_labels=torch.zeros(2, 9))
    gauss = Gaussian([0.0], 1.0)
    assert augment_dim(gauss) == 0
    with pytest.raises(ValueError, match="takes no augment labels"):
        gauss(torch.zeros(2, 1), 1.0, augment_labels=torch.zeros(2, 9))
