"""Diff-Instruct: oracles O16 (expected generator gradient), O19 (equilibrium), O21 (affine generator
converges, ring8 keeps every mode). algorithms.md §4 and §7."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffdistill.diffusion.denoiser import Denoiser
from diffdistill.methods import common
from diffdistill.methods.base import Batch
from diffdistill.methods.di import DIConfig, DiffInstruct, di_generator_loss
from diffdistill.teachers.analytic import Gaussian
from tests.cli_util import cli_method

MU, S2 = 0.3, 0.25


class AffineGenerator(Denoiser):
    """G(init_sigma z; init_sigma) = a + b z: D(x, sigma) = a + b x / sigma."""

    def __init__(self, a: float, b: float):
        super().__init__((1,), sigma_data=0.5)
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def denoise(self, x, sigma, cond):
        return self.a + self.b * x / sigma[:, None]


class GaussianFamily(Denoiser):
    """Exact denoiser of N(m, v) with learnable m and log v: D = m + v/(v+sigma^2) (x - m)."""

    def __init__(self, m: float, v: float):
        super().__init__((1,), sigma_data=0.5)
        self.m = nn.Parameter(torch.tensor(m, dtype=torch.float64))
        self.log_v = nn.Parameter(torch.tensor(math.log(v), dtype=torch.float64))

    def denoise(self, x, sigma, cond):
        v = self.log_v.exp()
        s2 = sigma[:, None].to(x.dtype) ** 2
        return self.m + v / (v + s2) * (x.to(torch.float64) - self.m)


def o16_closed_form(a, b, mu, s2, sigma):
    """algorithms.md O16."""
    da = (a - mu) * sigma**2 / (s2 + sigma**2)
    db = b * sigma**2 * (b**2 - s2) / ((b**2 + sigma**2) * (s2 + sigma**2))
    return da, db


def test_o16_closed_form_matches_the_spec_example():
    da, db = o16_closed_form(-0.4, 1.3, MU, S2, 0.8)
    assert da == pytest.approx(-0.50337, abs=1e-5) and db == pytest.approx(0.57775, abs=1e-5)


@pytest.mark.parametrize("a,b,sigma", [(-0.4, 1.3, 0.8), (0.9, 0.2, 2.5), (0.1, 0.7, 0.05)])
def test_o16_expected_gradient(a, b, sigma):
    torch.manual_seed(0)
    n = 200_000
    teacher = Gaussian([MU], math.sqrt(S2))
    fake = Gaussian([a], abs(b))                         # exact fake denoiser of the generator's N(a, b^2)
    gen = AffineGenerator(a, b)
    z = torch.randn(n, 1, dtype=torch.float64)
    x_g = common.generate(gen, z, 1.0)
    x_g.retain_grad()
    loss, _ = di_generator_loss(teacher, fake, x_g, sigma=sigma, dropout="eval")
    loss.backward()
    # Per-sample gradients (chain rule through dL/dx_g) for the Monte-Carlo standard error.
    g = x_g.grad[:, 0] * n
    per_a, per_b = g, g * z[:, 0]
    assert float(gen.a.grad) == pytest.approx(float(per_a.mean()), rel=1e-9, abs=1e-12)
    assert float(gen.b.grad) == pytest.approx(float(per_b.mean()), rel=1e-9, abs=1e-12)
    da, db = o16_closed_form(a, b, MU, S2, sigma)
    se_a, se_b = float(per_a.std()) / math.sqrt(n), float(per_b.std()) / math.sqrt(n)
    assert abs(float(gen.a.grad) - da) < 4 * se_a + 1e-12
    assert abs(float(gen.b.grad) - db) < 4 * se_b + 1e-12
    # and the sign drives a -> mu, b^2 -> s^2
    assert math.copysign(1, float(gen.a.grad)) == math.copysign(1, a - MU)


@pytest.mark.parametrize("sigma", [0.01, 0.5, 3.0, 40.0])
def test_o19_equilibrium_analytic(sigma):
    """Generator = sampler of the teacher's Gaussian, fake = copy of the teacher: gradient exactly 0."""
    teacher = Gaussian([MU], math.sqrt(S2))
    fake = Gaussian([MU], math.sqrt(S2))
    gen = AffineGenerator(MU, math.sqrt(S2))
    x_g = common.generate(gen, torch.randn(256, 1, dtype=torch.float64), 1.0)
    di_generator_loss(teacher, fake, x_g, sigma=sigma)[0].backward()
    assert float(gen.a.grad) == 0.0 and float(gen.b.grad) == 0.0


class DropoutNet(nn.Module):
    def __init__(self, dim=4, p=0.5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim + 1, 64), nn.SiLU(), nn.Dropout(p), nn.Linear(64, 64),
                                  nn.SiLU(), nn.Dropout(p), nn.Linear(64, dim))

    def forward(self, x, c_noise, labels):
        return self.body(torch.cat([x, c_noise[:, None]], 1))

    def config(self):
        return {"name": "test-dropout"}


def test_o19_equilibrium_with_shared_dropout_masks():
    """A dropout teacher and its copy as fake net: the gradient vanishes only with shared masks (§4.5)."""
    from diffdistill.diffusion.denoiser import Precond

    torch.manual_seed(0)
    teacher = Precond(DropoutNet(), (4,)).eval().requires_grad_(False)
    fake = common.copy_denoiser(teacher)
    x_g = torch.randn(64, 4, requires_grad=True)
    loss, gap = di_generator_loss(teacher, fake, x_g, dropout="shared")
    loss.backward()
    assert float(gap.max()) == 0.0 and float(x_g.grad.abs().max()) == 0.0
    assert not teacher.training and fake.training                   # modes restored
    # Without shared masks (each net drawing its own) the same pair disagrees: the test above can fail.
    teacher.train()
    sigma = torch.full((64,), 0.5)
    assert not torch.equal(teacher(x_g.detach(), sigma), fake(x_g.detach(), sigma))
    teacher.eval()
    # eval mode: also exactly zero (no dropout at all)
    assert float(di_generator_loss(teacher, fake, x_g, dropout="eval")[1].max()) == 0.0


def _run(method, steps, batch, seed=0):
    """A minimal stand-in of the loop's inner step over the Method contract (Adam per group)."""
    torch.manual_seed(seed)
    groups = method.groups()
    opts = {k: torch.optim.Adam(g.params, lr=g.optim.lr, betas=g.optim.betas) for k, g in groups.items()}
    for step in range(steps):
        method.begin_step(step, step * batch)
        for name, g in groups.items():
            if step < g.start or step % g.every:
                continue
            opts[name].zero_grad(set_to_none=True)
            out = g.loss(Batch(size=batch, device=torch.device("cpu"), step=step))
            assert torch.isfinite(out["loss"])
            out["loss"].backward()
            opts[name].step()


def test_affine_generator_converges_to_data():
    """O21: DI with an affine generator and a learnable Gaussian fake score converges to (mu, s)."""
    torch.manual_seed(0)
    teacher = Gaussian([MU], math.sqrt(S2))
    cfg = DIConfig(init_sigma=1.0, gen_lr=2e-2, fake_lr=5e-2, teacher_dropout="eval", fake_warmup_steps=50)
    method = DiffInstruct(teacher, cfg, generator=AffineGenerator(-1.0, 1.5),
                          fake=GaussianFamily(-1.0, 1.5**2))
    _run(method, 400, 256)
    a, b = method.generator.a.item(), abs(method.generator.b.item())
    assert a == pytest.approx(MU, abs=0.05), (a, b)
    assert b == pytest.approx(math.sqrt(S2), abs=0.05), (a, b)


def test_groups_and_export():
    teacher = Precond_with_dropout()
    method = DiffInstruct(teacher, DIConfig(init_sigma=2.5, gen_every=3))
    groups = method.groups()
    assert list(groups) == ["fake_score", "generator"] and groups["generator"].every == 3
    assert groups["generator"].optim.betas[0] == 0.0
    gen_ids = {id(p) for p in method.generator.parameters()}
    assert not gen_ids & {id(p) for p in method.fake.parameters()}
    assert not any(p.requires_grad for p in method.teacher.parameters())
    # only the right group receives gradients, never the teacher
    for name, params in (("fake_score", method.fake), ("generator", method.generator)):
        method.zero_grad(set_to_none=True)
        method.groups()[name].loss(Batch(size=8, device=torch.device("cpu"), step=0))["loss"].backward()
        assert all(p.grad is not None for p in params.parameters())
        assert all(p.grad is None for p in method.teacher.parameters())
    net, recipe = method.export()
    assert net is method.generator and recipe == {"sampler": "onestep", "sigmas": [2.5, 0.0]}
    z = torch.randn(5, 4)
    assert torch.allclose(net.eval()(2.5 * z, 2.5), common.generate(method.generator, z, 2.5))


def Precond_with_dropout():
    from diffdistill.diffusion.denoiser import Precond
    return Precond(DropoutNet(), (4,)).eval().requires_grad_(False)


def test_bad_options():
    from diffdistill.errors import DiffdistillError
    teacher = Precond_with_dropout()
    with pytest.raises(DiffdistillError, match="init sigma"):
        DiffInstruct(teacher, DIConfig(init_sigma=500.0))
    with pytest.raises(DiffdistillError, match="dropout"):
        DiffInstruct(teacher, DIConfig(teacher_dropout="sometimes"))


def test_nan_network_is_named(tmp_path):
    """A generator gone NaN stops the loop naming 'generator' (not the fake score trained on its samples);
    a NaN fake score is named 'fake_score'."""
    from diffdistill.errors import DiffdistillError
    from diffdistill.teachers.analytic import ring8
    from diffdistill.train.loop import TrainConfig, train

    for broken, group in (("generator", "generator"), ("fake", "fake_score")):
        method = DiffInstruct(ring8(), DIConfig(fake_warmup_steps=0))   # the generator updates at once
        with torch.no_grad():
            getattr(method, broken).backbone.out.bias.fill_(float("nan"))
        cfg = TrainConfig(out=str(tmp_path / broken), batch=16, max_steps=3, progress=False, tensorboard=False,
                          checkpoint_kimg=0, device="cpu")
        with pytest.raises(DiffdistillError, match=f"'{group}'"):
            train(method, cfg)


def test_ring8_keeps_every_mode(tmp_path):
    """O13/O21: the one-step DI student of toy:ring8 keeps all eight modes (share within 0.25/8 of 1/8)."""
    from diffdistill.io import load_snapshot
    from diffdistill.teachers.analytic import ring8
    from diffdistill.train.loop import TrainConfig, train

    torch.manual_seed(0)
    teacher = ring8()
    method = DiffInstruct(teacher, DIConfig(gen_lr=2e-3, fake_lr=2e-3, fake_warmup_steps=200))
    steps, batch = 800, 256
    train(method, TrainConfig(out=str(tmp_path / "run"), total_kimg=steps * batch / 1000, batch=batch,
                              ema_halflife_kimg=20, tick_kimg=1e9, checkpoint_kimg=0, progress=False,
                              tensorboard=False, device="cpu"))
    net, recipe, _ = load_snapshot(tmp_path / "run" / "model")
    assert recipe == {"sampler": "onestep", "sigmas": [1.0, 0.0]}
    with torch.no_grad():
        x = common.generate(net, torch.randn(10_000, 2, generator=torch.Generator().manual_seed(1)), 1.0)
    mode = teacher.mode_of(x)
    share = torch.bincount(mode, minlength=8).double() / len(x)
    within = float(((x.double() - teacher.means[mode]).norm(dim=1) < 3 * 0.1).double().mean())
    xt = teacher.sample(10_000, torch.Generator().manual_seed(2))
    within_t = float(((xt.double() - teacher.means[teacher.mode_of(xt)]).norm(dim=1) < 0.3).double().mean())
    print(f"di ring8: shares {[round(s, 3) for s in share.tolist()]}, within 3 std {within:.3f} "
          f"(teacher {within_t:.3f})")
    assert float((share - 1 / 8).abs().max()) < 0.25 / 8
    assert within > 0.8          # measured 0.91 (0.77 before the MLP's input Fourier features)


# --------------------------------------------------------------------------------------------------
# The official setting: augmented fake-score samples, dropout, EMA, recipes (issue 15)


def _image_teacher(augment_dim=9, dropout=0.3):
    from diffdistill.diffusion.denoiser import Precond, PrecondConfig
    from diffdistill.networks.unet import unet_preset

    torch.manual_seed(0)
    net = unet_preset("tiny", 8, 3, augment_dim=augment_dim, dropout=dropout)
    return Precond(net, (3, 8, 8), 0, PrecondConfig(kind="edm")).eval().requires_grad_(False)


def _spy(denoiser):
    """Record the augment labels (or None) the denoiser's backbone is called with."""
    seen = []
    forward = denoiser.backbone.forward
    denoiser.backbone.forward = lambda *a, **kw: seen.append(kw.get("augment_labels")) or forward(*a, **kw)
    return seen


def test_fake_loss_is_edms_loss_on_augmented_samples_with_labels():
    """EDM's loss with an augment pipe (algorithms.md §1.2): sigma, then the augmentation of the clean sample,
    then the noise; the network gets the labels and is compared with the augmented sample."""
    from diffdistill.diffusion import param
    from diffdistill.methods.augment import AugmentPipe
    from diffdistill.methods.common import fake_score_loss

    fake = common.copy_denoiser(_image_teacher()).eval()
    x_g = torch.randn(6, 3, 8, 8)
    pipe = AugmentPipe(p=0.5)
    torch.manual_seed(5)
    loss = fake_score_loss(fake, x_g, None, -1.2, 1.2, pipe)
    torch.manual_seed(5)
    sigma = common.sample_sigma(6, fake, -1.2, 1.2)
    y, labels = pipe(x_g)
    assert float(labels.abs().sum()) > 0 and not torch.allclose(y, x_g, atol=1e-3)
    s = sigma[:, None, None, None]
    d = fake(y + s * torch.randn_like(y), sigma, None, augment_labels=labels)
    ref = (param.edm_loss_weight(s, 0.5) * (d - y) ** 2).flatten(1).sum(1).mean()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)


def test_di_fake_score_gets_augment_labels_by_default():
    """A teacher whose network takes 9 augment labels (EDM's): the fake score trains on augmented generator
    samples with their labels (p = 0.12, di_train.py's default); the generator update passes none."""
    method = DiffInstruct(_image_teacher())
    assert method.augment_pipe is not None and method.augment_pipe.p == 0.12
    fake_seen, gen_seen = _spy(method.fake), _spy(method.generator)
    torch.manual_seed(0)
    method.fake_score_loss(Batch(size=64, device=torch.device("cpu")))
    assert len(fake_seen) == 1 and fake_seen[0].shape == (64, 9)
    labels = fake_seen[0]
    assert float((labels[:, 0] != 0).double().mean()) == pytest.approx(0.5, abs=0.2)   # x-flips: a fair coin
    assert float((labels[:, 2:] != 0).any(1).double().mean()) > 0.1                   # some geometric ones
    fake_seen.clear()
    method.generator_loss(Batch(size=8, device=torch.device("cpu")))
    assert gen_seen == [None, None] and fake_seen == [None]      # G (no grad + grad), fake in the G loss
    # --augment 0: no augmentation, no labels.
    method = DiffInstruct(_image_teacher(), DIConfig(augment=0.0))
    seen = _spy(method.fake)
    method.fake_score_loss(Batch(size=8, device=torch.device("cpu")))
    assert method.augment_pipe is None and seen == [None]


def test_augmentation_without_labels_and_on_flat_data():
    """A network without augment labels (augment_dim 0): no augmentation by default (its teacher was not
    trained with it); asked for, the images are augmented and no labels passed. Flat data: none, and asking
    for it is a usage error."""
    from diffdistill.errors import UsageError

    assert DiffInstruct(_image_teacher(augment_dim=0)).augment_pipe is None
    method = DiffInstruct(_image_teacher(augment_dim=0), DIConfig(augment=0.12))
    seen = _spy(method.fake)
    method.fake_score_loss(Batch(size=8, device=torch.device("cpu")))
    assert method.augment_pipe.p == 0.12 and seen == [None]
    assert DiffInstruct(Precond_with_dropout()).augment_pipe is None
    with pytest.raises(UsageError, match="image samples"):
        DiffInstruct(Precond_with_dropout(), DIConfig(augment=0.12))


def _parse(*extra):
    from diffdistill.cli.main import build_parser

    argv = ["distill", "di", "--teacher", "t", "--out", "unused", *extra]
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args


def test_build_honours_options_and_student_dropout():

    teacher = _image_teacher(dropout=0.3)
    method = cli_method("di", teacher)
    assert method.generator.backbone._config["dropout"] == 0.3      # the teacher's (official)
    assert method.fake.backbone._config["dropout"] == 0.3
    method = cli_method("di", teacher, None, "--student-dropout", "0.0")
    assert method.generator.backbone._config["dropout"] == 0.0 and method.fake.backbone._config["dropout"] == 0.0
    assert teacher.backbone._config["dropout"] == 0.3
    method = cli_method("di", teacher, None, "--augment", "0.5", "--betas", "0.5", "0.99", "--loss-scale", "2",
                        "--fake-loss-scale", "3")
    cfg = method.cfg
    assert (cfg.betas, cfg.loss_scale, cfg.fake_loss_scale, method.augment_pipe.p) == ((0.5, 0.99), 2.0, 3.0, 0.5)
    assert method.groups()["generator"].optim.betas == (0.5, 0.99)


def test_official_ema_and_cifar10_recipe():
    from diffdistill.cli import distill as cli_distill

    assert DiffInstruct(Precond_with_dropout()).ema_default(128) == (500.0, 0.05)
    assert set(cli_distill.method_recipes("di")) >= {"cifar10", "short"}
    args = cli_distill.with_recipe(_parse("--recipe", "cifar10"), _image_teacher())
    assert (args.batch, args.gen_lr, args.fake_lr, tuple(args.betas), args.init_sigma, args.augment) == \
        (128, 1e-5, 1e-5, (0.0, 0.999), 1.0, 0.12)
    assert (args.loss_scale, args.fake_loss_scale, args.kimg, args.ema, args.fake_warmup_steps) == \
        (1.0, 1.0, 200000.0, 500.0, 0)
    assert args.teacher_dropout == "shared" and args.student_dropout is None
