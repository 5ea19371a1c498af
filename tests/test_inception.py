"""FID Inception-v3: the standard weight file's names and shapes load strictly, 2048-d features, resize
conventions, and clear errors. No real weights exist on these machines: a randomly initialised network saved
in the standard layout stands in for `pt_inception-2015-12-05-6726825d.pth`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffdistill.errors import DiffdistillError
from diffdistill.metrics import inception as inc
from diffdistill.metrics.features import load_feature_net
from diffdistill.metrics.inception import InceptionV3, load_inception, resize_bilinear_tf1

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    state = InceptionV3().state_dict()
    path = tmp_path_factory.mktemp("inception") / inc.WEIGHTS_NAME
    torch.save(state, path)
    return path, state


def test_parameter_layout_is_the_standard_files():
    net = InceptionV3()
    state = net.state_dict()
    # torchvision's inception_v3 has 27,161,264 parameters; the FID variant drops the auxiliary head
    # (3,326,696 parameters) and has 1008 instead of 1000 classes (+8 * 2049): 23,850,960.
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - 3_326_696 + 8 * 2049
    # 94 conv + batch-norm units (conv.weight and five batch-norm tensors each), plus fc.weight and fc.bias.
    assert sum(k.endswith(".conv.weight") for k in state) == 94 and len(state) == 94 * 6 + 2
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert all(m.eps == 1e-3 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_loads_strictly_and_gives_2048_features(weights, monkeypatch):
    path, state = weights
    net = load_inception(path)
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert net.weights_sha256 and net.describe()["weights_sha256"] == net.weights_sha256
    gen = torch.Generator().manual_seed(1)
    small = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=gen)
    feats, logits = net(small)
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008) and torch.isfinite(feats).all()
    big = torch.rand(1, 3, 299, 299, generator=gen) * 2 - 1
    feats, logits = net(big)
    assert feats.shape == (1, 2048) and torch.isfinite(logits).all()
    # Logits are the pool features times fc.weight^T, without the bias (the IS convention).
    assert torch.allclose(logits, feats @ net.fc.weight.T, rtol=1e-4, atol=1e-4)
    # The same file through the other entry points.
    monkeypatch.setenv(inc.ENV_VAR, str(path))
    assert load_feature_net("inception").weights_sha256 == net.weights_sha256
    assert load_feature_net(str(path)).name == "inception"


def test_tolerates_missing_batchnorm_counters_and_rejects_other_mismatches(weights, monkeypatch):
    path, state = weights
    no_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    monkeypatch.setattr(inc.torch, "load", lambda *a, **k: dict(no_counters))
    assert torch.equal(load_inception(path).fc.weight, state["fc.weight"])
    torchvision_like = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    monkeypatch.setattr(inc.torch, "load", lambda *a, **k: torchvision_like)
    with pytest.raises(DiffdistillError, match=r"fc\.(weight|bias) has shape \(1000.*needs \(1008"):
        load_inception(path)
    extra = dict(state, **{"AuxLogits.fc.weight": torch.zeros(1000, 768)})
    monkeypatch.setattr(inc.torch, "load", lambda *a, **k: extra)
    with pytest.raises(DiffdistillError, match=r"not the FID Inception-v3 weights.*AuxLogits"):
        load_inception(path)


def test_missing_or_bad_weight_file(tmp_path, monkeypatch):
    monkeypatch.delenv(inc.ENV_VAR, raising=False)
    url = r"github\.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05"
    with pytest.raises(DiffdistillError, match=r"no Inception-v3 weights.*" + url):
        load_inception(None)
    with pytest.raises(DiffdistillError, match=r"nope\.pth: Inception-v3 weight file not found.*pytorch-fid"):
        load_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(DiffdistillError, match=r"junk\.pth: not a readable PyTorch weight file"):
        load_inception(tmp_path / "junk.pth")
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "partial.pth")
    # 566 tensors less fc.weight less the 94 optional batch-norm counters: 471 missing.
    with pytest.raises(DiffdistillError, match=r"partial\.pth: not the FID Inception-v3 weights \(471 miss"):
        load_inception(tmp_path / "partial.pth")
    net = InceptionV3()
    with pytest.raises(DiffdistillError, match=r"expects images of 3 \(or 1\) channels, got 4x32x32"):
        net(torch.zeros(1, 4, 32, 32))


def tf1_resize_oracle(img: np.ndarray, size: int) -> np.ndarray:
    """TF1 resize_bilinear(align_corners=False) pixel by pixel: source = dst * in/out, upper index clamped."""
    h, w = img.shape
    out = np.zeros((size, size))
    for i in range(size):
        y = i * h / size
        y0, fy = int(np.floor(y)), y - np.floor(y)
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            x = j * w / size
            x0, fx = int(np.floor(x)), x - np.floor(x)
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_tf1_resize_matches_the_pixel_formula():
    img = torch.arange(20, dtype=torch.float64).reshape(1, 1, 4, 5) ** 1.5
    for size in (3, 7, 11):
        got = resize_bilinear_tf1(img, size)[0, 0].numpy()
        assert np.allclose(got, tf1_resize_oracle(img[0, 0].numpy(), size), atol=1e-12)
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64)
    assert torch.equal(resize_bilinear_tf1(x, 8), x)                  # same size: identity
    assert torch.equal(resize_bilinear_tf1(x, 4), x[:, :, ::2, ::2])  # factor 2 down: every other pixel
    # It differs from PyTorch's half-pixel convention (which pytorch-fid uses) when upsampling.
    assert not torch.allclose(resize_bilinear_tf1(x, 13), F.interpolate(x, 13, mode="bilinear"))


def test_resize_modes_differ_even_at_299_by_their_normalisation():
    """At 299x299 both resizes are the identity, but tf1 scales by (x - 128) / 128 and pytorch-fid by
    2 x / 255 - 1: the inputs differ by up to 1/128 (at x = 255), so the two modes never give the same features."""
    x = torch.arange(256, dtype=torch.uint8).repeat(3 * 299 * 299 // 256 + 1)[:3 * 299 * 299].reshape(1, 3, 299, 299)
    tf1, ptfid = InceptionV3(resize="tf1"), InceptionV3(resize="pytorch-fid")
    a, b = tf1.preprocess(x), ptfid.preprocess(x)
    xf = x.float()
    assert torch.allclose(a, (xf - 128) / 128, atol=1e-6) and torch.allclose(b, 2 * xf / 255 - 1, atol=1e-6)
    assert (a - b).abs().max() == pytest.approx(1 / 128, abs=1e-6)
    assert tf1.identity()["normalisation"] != ptfid.identity()["normalisation"]
    assert tf1.identity()["resize"] == "tf1" and ptfid.identity()["resize"] == "pytorch-fid"


def test_non_standard_weights_are_said_loudly(weights, monkeypatch, capsys):
    path, _ = weights
    net = load_inception(path)
    err = capsys.readouterr().err
    assert "WARNING" in err and "NOT the standard FID file" in err and inc.WEIGHTS_SHA256[:16] in err
    assert not net.describe()["standard_weights"] and "NON-STANDARD weights" in net.label()
    monkeypatch.setattr(inc, "WEIGHTS_SHA256", net.weights_sha256)   # as if it were the standard file
    net = load_inception(path)
    assert "WARNING" not in capsys.readouterr().err
    assert net.describe()["standard_weights"] and net.label() == "Inception-v3 FID weights, tf1 resize"
    assert inc.adm_identity() == net.identity()  # guided-diffusion's evaluator: this network, TF1 resize
