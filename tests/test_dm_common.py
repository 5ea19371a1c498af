"""Shared helpers of the distribution-matching family (diffdistill/methods/common.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.errors import DiffdistillError
from diffdistill.methods import common
from diffdistill.networks.unet import unet_preset
from diffdistill.samplers import sample_onestep
from diffdistill.teachers.analytic import Gaussian, ring8


def tiny_teacher(dropout=0.0):
    torch.manual_seed(0)
    net = unet_preset("tiny", 8, 1, dropout=dropout)
    return Precond(net, (1, 8, 8)).eval().requires_grad_(False)


def test_copy_is_trainable_and_independent():
    teacher = tiny_teacher()
    net = common.copy_denoiser(teacher)
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert not torch.equal(next(net.parameters()), next(teacher.parameters()))


def test_boundary_copy_keeps_the_teacher_at_sigma_max_and_identity_at_sigma_min():
    teacher = tiny_teacher()
    gen = common.copy_denoiser(teacher, boundary=True).eval()
    assert gen.precond.kind == "boundary" and teacher.precond.kind == "edm"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        # §5.2: at sigma = 80 the boundary scalings are within ~3e-5 of EDM's
        assert torch.allclose(gen(80 * x, 80.0), teacher(80 * x, 80.0), rtol=1e-4, atol=1e-4)
        assert torch.equal(gen(x, gen.sigma_min), x)                  # f(x, sigma_min) = x exactly
        assert not torch.allclose(teacher(x, teacher.sigma_min), x, atol=0)  # EDM's D is not


def test_student_of_an_analytic_teacher_is_a_fresh_mlp():
    teacher = ring8()
    net = common.student_from_teacher(teacher)
    assert isinstance(net, Precond) and net.shape == (2,) and net.sigma_data == pytest.approx(teacher.sigma_data)
    x = torch.randn(5, 2)
    # MLP output layer starts at zero: D(x) = c_skip x
    c_skip = teacher.sigma_data**2 / (1.0 + teacher.sigma_data**2)
    assert torch.allclose(net(x, 1.0), c_skip * x, atol=1e-6)
    assert net.config()["network"]["name"] == "mlp"
    with pytest.raises(DiffdistillError, match="no weights"):
        common.copy_denoiser(teacher)


def test_generate_equals_the_onestep_sampler_of_the_recipe():
    teacher = tiny_teacher()
    gen = common.copy_denoiser(teacher).eval()
    z = torch.randn(3, 1, 8, 8)
    recipe = common.onestep_recipe(2.5)
    with torch.no_grad():
        ref = sample_onestep(gen, z, torch.tensor(recipe["sigmas"], dtype=torch.float64))
        assert torch.allclose(common.generate(gen, z, 2.5), ref.float(), atol=1e-5)
    with pytest.raises(DiffdistillError, match="outside"):
        common.check_sigma(teacher, 1000.0)


def test_o12_edm_loss_of_the_ideal_denoiser_is_one_per_element():
    """O12: data N(0, sd^2 I) with sd = 0.5 and its exact denoiser: E[weighted loss] = 1 per element, any sigma."""
    torch.manual_seed(0)
    d, n = 4, 100_000
    ideal = Gaussian(torch.zeros(d), 0.5)
    for sigma in (0.02, 0.3, 5.0):
        x = 0.5 * torch.randn(n, d, dtype=torch.float64)
        per = torch.stack([common.edm_loss(ideal, x[i::10], torch.full((n // 10,), sigma, dtype=torch.float64),
                                           sigma_data=0.5) for i in range(10)])
        se = float(per.std()) / math.sqrt(10)
        assert abs(float(per.mean()) - d) < 4 * se + 1e-3, (sigma, per.mean())


def test_fake_score_loss_trains_only_the_fake_net():
    teacher = tiny_teacher()
    fake, gen = common.copy_denoiser(teacher), common.copy_denoiser(teacher)
    x_g = common.generate(gen, torch.randn(4, 1, 8, 8), 1.0)
    loss = common.fake_score_loss(fake, x_g)
    loss.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    sig = common.sample_sigma(10_000, teacher, p_mean=5.0, p_std=3.0)
    assert float(sig.max()) <= teacher.sigma_max and float(sig.min()) >= teacher.sigma_min


def test_paired_denoise_shares_dropout_masks():
    teacher = tiny_teacher(dropout=0.5)
    fake = common.copy_denoiser(teacher)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a, b = common.paired_denoise([teacher, fake], x, 0.7, dropout="shared")
        assert torch.equal(a, b)
        # the masks are really on: two shared evaluations with different RNG states differ
        c, _ = common.paired_denoise([teacher, fake], x, 0.7, dropout="shared")
        assert not torch.equal(a, c)
        e1, e2 = common.paired_denoise([teacher, fake], x, 0.7, dropout="eval")
        assert torch.equal(e1, e2) and torch.equal(e1, teacher(x, 0.7))
    assert not teacher.training and fake.training
    with pytest.raises(ValueError):
        common.paired_denoise([teacher], x, 0.7, dropout="sometimes")


def _expected_frozen(net: nn.Module, roles: set[str]) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if n.split(".")[-2] in roles)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_freeze_by_role_on_the_unet(level):
    teacher = tiny_teacher()
    gen = common.copy_denoiser(teacher)
    total = common.count_params(gen)
    trainable, total2 = common.freeze_by_role(gen, level)
    roles = set(common.FREEZE_ROLES[level])
    assert total2 == total and trainable == total - _expected_frozen(gen, roles)
    names = {n for n, p in gen.named_parameters() if not p.requires_grad}
    assert any(".conv0." in n for n in names) and any(".proj." in n for n in names)
    assert (level >= 2) == any(".qkv." in n for n in names)
    assert (level >= 3) == any(".skip." in n for n in names)
    # what §5.3 keeps trainable: norms, affine, the mapping network, the input conv, the output conv
    for keep in ("norm0", "affine", "map_layer0", "enc.8x8_conv", "aux_conv"):
        assert any(keep in n and p.requires_grad for n, p in gen.named_parameters()), keep


def test_freeze_errors():
    with pytest.raises(DiffdistillError, match="matches no layer"):
        common.freeze_by_role(common.student_from_teacher(ring8()), 1)

    class AllConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.ModuleDict({"conv0": nn.Conv2d(1, 1, 3), "conv1": nn.Conv2d(1, 1, 3)})

    with pytest.raises(DiffdistillError, match="every parameter"):
        common.freeze_by_role(AllConvs(), 1)
    with pytest.raises(DiffdistillError, match="freeze level"):
        common.freeze_by_role(AllConvs(), 7)


def test_zero_loss_reaches_every_parameter_with_zero_gradient():
    net = common.student_from_teacher(ring8())
    common.zero_loss(net).backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) == 0.0 for p in net.parameters())


def test_boundary_mlp_for_analytic_gdd():
    net = common.student_from_teacher(ring8(), boundary=True)
    assert net.precond == PrecondConfig(kind="boundary", sigma_data=net.sigma_data)
    x = torch.randn(3, 2)
    assert torch.equal(net(x, net.sigma_min), x)


def test_one_student_factory_for_every_preset():
    """`student_from_teacher` builds every method's networks: copies, the default fresh MLP and the named MLP
    presets of KD/PD (`kd.make_student` goes through it: 'auto' for an analytic teacher is its 'mlp-toy')."""
    from diffdistill.methods import kd
    from diffdistill.networks.mlp import MLP_PRESETS

    teacher = ring8()
    for name in ("tiny", "toy"):
        net = common.student_from_teacher(teacher, boundary=True, preset=f"mlp-{name}")
        cfg = net.config()["network"]
        assert all(cfg[k] == v for k, v in MLP_PRESETS[name].items()), (name, cfg)
        assert net.precond == PrecondConfig(kind="boundary", sigma_data=teacher.sigma_data)
        x = torch.randn(3, 2)
        assert torch.equal(net(x, net.sigma_min), x) and net.training
    default = common.student_from_teacher(teacher, hidden=24, depth=2).config()["network"]
    assert (default["hidden"], default["num_layers"], default["input_fourier"]) == (24, 2, 32)
    torch.manual_seed(0)
    auto = kd.make_student(teacher)
    torch.manual_seed(0)
    toy = common.student_from_teacher(teacher, preset="mlp-toy")
    assert auto.config() == toy.config()
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), toy.state_dict().values()))
    image = tiny_teacher(dropout=0.2)
    copy = common.student_from_teacher(image, preset="teacher", dropout=0.0)
    assert common.dropout_of(copy) == 0.0 and common.dropout_of(image) == 0.2
    with pytest.raises(DiffdistillError, match="no network to copy"):
        common.student_from_teacher(teacher, preset="teacher")
    with pytest.raises(DiffdistillError, match="unknown student preset 'resnet'"):
        common.student_from_teacher(teacher, preset="resnet")
    with pytest.raises(DiffdistillError, match="unknown MLP preset 'huge'"):
        common.student_from_teacher(teacher, preset="mlp-huge")
    with pytest.raises(DiffdistillError, match="flat data"):
        common.student_from_teacher(image, preset="mlp-toy")


@pytest.mark.parametrize("method", ["di", "sid", "dmd2"])
def test_lr_decay_reaches_both_networks_schedules(method):
    """--lr-decay linear: the generator's and the fake score's LRs fall linearly to 0 at the end of the run; the
    default keeps the papers' constant LR."""
    from diffdistill.train.loop import lr_at
    from tests.cli_util import cli_method

    for options, decay in (((), "constant"), (("--lr-decay", "linear"), "linear")):
        groups = cli_method(method, tiny_teacher(), None, *options).groups()
        assert set(groups) == {"generator", "fake_score"}
        for group in groups.values():
            assert group.optim.decay == decay
            flat = lr_at(dataclasses.replace(group.optim, decay="constant"), 5000, 0, 10_000)   # DMD2: warm-up
            assert flat > 0
            assert lr_at(group.optim, 5000, 0, 10_000) == pytest.approx(flat / 2 if decay == "linear" else flat)
