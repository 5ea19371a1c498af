"""The projected discriminator of GDD (methods/projected.py): weights files, logit layout, frozen parts, gradients."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffdistill.errors import DiffdistillError
from diffdistill.methods.discriminators import augment_color, augment_cutout, augment_translation, diff_augment
from diffdistill.methods.projected import (
    EfficientNetLite0,
    VGG16BNFeatures,
    build_projected_discriminator,
    load_backbone,
)

EFF = ("tf_efficientnet_lite0",)


def _randomise_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random weights of the right shapes: torchvision's full vgg16_bn layout (features.* plus a classifier key,
    which is accepted and ignored) and timm's tf_efficientnet_lite0 layout."""
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    vgg, eff = VGG16BNFeatures(), EfficientNetLite0()
    _randomise_bn(vgg)
    _randomise_bn(eff)
    vgg_state = {f"features.{k}": v for k, v in vgg.state_dict().items() if not k.endswith("num_batches_tracked")}
    vgg_state["classifier.6.bias"] = torch.zeros(1000)
    save_file(vgg_state, str(root / "vgg16_bn.safetensors"))
    torch.save(eff.state_dict(), root / "lite0.pth")
    return dict(vgg=root / "vgg16_bn.safetensors", eff=root / "lite0.pth", root=root,
                vgg_state=vgg.state_dict(), eff_state=eff.state_dict())


def test_backbone_files_load_strictly_and_a_wrong_file_is_one_line(weights):
    vgg = load_backbone(VGG16BNFeatures(), weights["vgg"])
    assert torch.equal(vgg.state_dict()["40.weight"], weights["vgg_state"]["40.weight"])
    eff = load_backbone(EfficientNetLite0(), weights["eff"])
    assert torch.equal(eff.state_dict()["blocks.5.3.conv_pwl.weight"],
                       weights["eff_state"]["blocks.5.3.conv_pwl.weight"])
    # the EfficientNet file given as VGG weights
    with pytest.raises(DiffdistillError) as err:
        load_backbone(VGG16BNFeatures(), weights["eff"])
    msg = str(err.value)
    assert "\n" not in msg and str(weights["eff"]) in msg and "missing ['0.weight'" in msg and "conv_stem" in msg
    # one tensor of the wrong shape
    bad = dict(weights["eff_state"])
    bad["conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    save_file(bad, str(weights["root"] / "bad.safetensors"))
    with pytest.raises(DiffdistillError, match=r"wrong shape \['conv_stem.weight \(16, 3, 3, 3\) != \(32, 3, 3, 3\)'"):
        build_projected_discriminator((3, 32, 32), 0, effnet_weights=weights["root"] / "bad.safetensors",
                                      backbones=EFF)
    with pytest.raises(DiffdistillError, match="not found"):
        load_backbone(EfficientNetLite0(), weights["root"] / "absent.pth")


def test_official_cifar_layout_frozen_backbones_and_trainable_heads(weights):
    torch.manual_seed(1)
    d = build_projected_discriminator((3, 32, 32), 0, vgg_weights=weights["vgg"], effnet_weights=weights["eff"])
    # 224-resized CIFAR: VGG heads give 11x11 patches, EfficientNet heads 4x4 (official order: VGG first)
    assert d.splits == [484, 64] and d.scale_splits == [121] * 4 + [16] * 4
    assert torch.equal(d.backbones["vgg16_bn"][40].weight, weights["vgg_state"]["40.weight"])
    d.train().requires_grad_(True)
    assert all(name.startswith("heads.") for name, _ in d.named_parameters())
    assert not any(p.requires_grad for p in d.backbones.buffers())
    assert all(not m.training for m in d.backbones.modules()) and all(not m.training for m in d.projections.modules())
    assert all(m.training for m in d.heads.modules())
    assert not any(k.startswith("backbones.") for k in d.state_dict())        # weights come from the files
    assert any(k.startswith("projections.") for k in d.state_dict())
    running = d.backbones["tf_efficientnet_lite0"].bn1.running_mean.clone()
    with torch.no_grad():
        logits = d(torch.rand(1, 3, 32, 32) * 2 - 1, None)
    assert logits.shape == (1, 548) and torch.isfinite(logits).all()
    assert torch.equal(d.backbones["tf_efficientnet_lite0"].bn1.running_mean, running)   # BN statistics frozen


@pytest.fixture(scope="module")
def eff_disc(weights):
    torch.manual_seed(2)
    return build_projected_discriminator((3, 32, 32), 0, effnet_weights=weights["eff"], backbones=EFF)


def test_grey_28_is_the_rgb_repeat(weights):
    torch.manual_seed(3)
    grey = build_projected_discriminator((1, 28, 28), 0, effnet_weights=weights["eff"], backbones=EFF).eval()
    rgb = build_projected_discriminator((3, 28, 28), 0, effnet_weights=weights["eff"], backbones=EFF).eval()
    rgb.load_state_dict(grey.state_dict())
    x = torch.rand(1, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        out = grey(x, None)
        assert out.shape == (1, 64)
        torch.testing.assert_close(out, rgb(x.repeat(1, 3, 1, 1), None))
    with pytest.raises(DiffdistillError, match=r"built for images \(1, 28, 28\)"):
        grey(torch.zeros(1, 3, 28, 28), None)
    with pytest.raises(DiffdistillError, match="interp224"):
        build_projected_discriminator((1, 28, 28), 0, backbones=EFF, interp224=False)


def test_gradient_reaches_the_input_and_r1_trains_only_the_heads(eff_disc):
    d = eff_disc.train()
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(d(x, None).sum(), x, create_graph=True)
    assert grad.abs().sum() > 0
    d.zero_grad()
    grad.pow(2).sum().backward()                                  # R1 needs the double backward
    assert all(p.grad is not None for p in d.parameters() if p.ndim == 4)
    assert d.per_backbone_mean(torch.arange(64.).repeat(2, 1)).tolist() == [[31.5], [31.5]]


def test_projection_conditioning(weights, eff_disc):
    torch.manual_seed(4)
    d = build_projected_discriminator((3, 32, 32), 3, effnet_weights=weights["eff"], backbones=EFF).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = F.one_hot(torch.tensor([0, 0]), 3).float(), F.one_hot(torch.tensor([0, 2]), 3).float()
    with torch.no_grad():
        la, lb = d(x, a), d(x, b)
        assert la.shape == (2, 64)
        torch.testing.assert_close(la[0], lb[0])                 # same label, same logits
        assert not torch.allclose(la[1], lb[1])                  # the label changes the logits
        eff_disc.eval()
        torch.testing.assert_close(eff_disc(x, None), eff_disc(x, b))   # unconditional: labels ignored
    assert len(d.heads["tf_efficientnet_lite0"][0].embed.weight) == 3
    with pytest.raises(DiffdistillError, match="one-hot labels"):
        d(x, None)


def test_projections_come_from_their_own_seed(eff_disc):
    torch.manual_seed(5)                                       # eff_disc was built after manual_seed(2)
    same = build_projected_discriminator((3, 32, 32), 0, backbones=EFF).projections.state_dict()
    ref = eff_disc.projections.state_dict()
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    other = build_projected_discriminator((3, 32, 32), 0, backbones=EFF, proj_seed=1).projections.state_dict()
    key = "tf_efficientnet_lite0.ccm.0.weight"
    assert not torch.equal(other[key], ref[key])


def test_diffaugment_policy():
    torch.manual_seed(7)
    x = torch.full((64, 3, 16, 16), 0.3)
    out = augment_color(x)          # constant image: saturation and contrast keep it, brightness shifts it
    shift = out - 0.3
    assert torch.allclose(shift, shift[:, :1, :1, :1].expand_as(shift), atol=1e-6)
    assert shift.min() >= -0.5 and shift.max() <= 0.5 and shift.std() > 0.1
    ones = torch.ones(64, 1, 16, 16)
    moved = augment_translation(ones)                         # |shift| <= 2 = round(16/8) on each axis
    kept_rows, kept_cols = moved[:, 0].amax(2).sum(1), moved[:, 0].amax(1).sum(1)
    assert kept_rows.min() >= 14 and kept_cols.min() >= 14 and (kept_rows < 16).any()
    assert torch.equal(moved[:, 0].sum((1, 2)), kept_rows * kept_cols)          # a zero border, no wrap
    holes = 1 - augment_cutout(ones)                          # a square of round(16/5) = 3, clipped
    size = holes.sum((1, 2, 3))
    assert size.max() == 9 and size.min() >= 4
    xg = torch.rand(4, 3, 16, 16, requires_grad=True)
    diff_augment(xg).sum().backward()
    assert xg.grad.abs().sum() > 0
