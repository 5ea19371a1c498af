"""SiD: oracles O17 (expected generator gradient, closed form), O19 (zero at equilibrium), the method contract
and O21 (ring8 keeps all eight modes). algorithms.md §6.3 and §7 C."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.diffusion.denoiser import Denoiser, Precond
from diffdistill.errors import DiffdistillError, UsageError
from diffdistill.methods import sid
from diffdistill.methods.base import Batch
from diffdistill.teachers.analytic import Gaussian, ring8
from tests.cli_util import cli_method, method_from_args, parse_distill

MU, S2 = 0.3, 0.25


class Affine(Denoiser):
    """D(x) = a + c (x - a) with fixed a, c: the exact fake denoiser of the generator N(a, b^2) (O16/O17)."""

    def __init__(self, a: float, c: float):
        super().__init__((1,))
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))   # parameters: must receive no gradient
        self.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def denoise(self, x, sigma, cond):
        return self.a + self.c * (x - self.a)


def o17_closed_form(a, b, sigma, alpha):
    """algorithms.md O17 (w = 1, fake frozen at the exact values; k1 = c_r - c_f)."""
    c_r, c_f = S2 / (S2 + sigma**2), b**2 / (b**2 + sigma**2)
    k1 = c_r - c_f
    da = (MU - a) * (1 - c_r) * ((1 - 2 * alpha) * k1 - (1 - c_r))
    db = -2 * k1 * b * ((1 - c_r) + alpha * k1)
    return da, db


def expected_gradient(a, b, sigma, alpha, nodes=6):
    """E_{z,n}[dL/d(a,b)] of the real SiD loss by Gauss-Hermite quadrature (exact: L is quadratic in z, n)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    zz, nn_ = np.meshgrid(x, x, indexing="ij")
    z = torch.tensor(zz.reshape(-1, 1))
    n = torch.tensor(nn_.reshape(-1, 1))
    weights = torch.tensor(np.outer(w, w).reshape(-1))
    a_t = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    b_t = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    fake = Affine(a, b**2 / (b**2 + sigma**2))
    x_g = a_t + b_t * z                                           # the generator x_g = a + b z
    per_sample = sid.sid_generator_loss(Gaussian([MU], math.sqrt(S2)), fake, x_g,
                                        torch.full((len(z),), sigma, dtype=torch.float64), alpha=alpha,
                                        normalise=False, noise=n)
    (per_sample * weights).sum().backward()
    assert fake.a.grad is None and fake.c.grad is None            # the fake net's parameters stay fixed
    assert fake.a.requires_grad                                   # ... and are trainable again afterwards
    return float(a_t.grad), float(b_t.grad)


def test_o17_closed_form_matches_the_spec_example():
    da, db = o17_closed_form(-0.4, 1.3, 0.8, 1.2)
    assert da == pytest.approx(-0.04878, abs=1e-5) and db == pytest.approx(0.21468, abs=1e-5)


@pytest.mark.parametrize("a,b,sigma,alpha", [(-0.4, 1.3, 0.8, 1.2), (0.9, 0.2, 2.5, 1.0),
                                             (0.1, 0.7, 0.05, 0.5), (-1.0, 0.4, 10.0, 1.2)])
def test_o17_expected_gradient(a, b, sigma, alpha):
    da, db = expected_gradient(a, b, sigma, alpha)
    eda, edb = o17_closed_form(a, b, sigma, alpha)
    assert da == pytest.approx(eda, rel=1e-9, abs=1e-13)
    assert db == pytest.approx(edb, rel=1e-9, abs=1e-13)


def test_o17_monte_carlo_with_random_noise():
    """The same expectation by Monte Carlo with the loss's own noise draws (noise=None)."""
    torch.manual_seed(0)
    a, b, sigma, alpha, n = -0.4, 1.3, 0.8, 1.2, 400_000
    a_t = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    b_t = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    x_g = a_t + b_t * torch.randn(n, 1, dtype=torch.float64)
    x_g.retain_grad()
    per = sid.sid_generator_loss(Gaussian([MU], math.sqrt(S2)), Affine(a, b**2 / (b**2 + sigma**2)), x_g,
                                 torch.full((n,), sigma, dtype=torch.float64), alpha=alpha, normalise=False)
    per.mean().backward()
    g = x_g.grad[:, 0] * n
    eda, edb = o17_closed_form(a, b, sigma, alpha)
    z = (x_g.detach()[:, 0] - a) / b
    assert abs(float(a_t.grad) - eda) < 4 * float(g.std()) / math.sqrt(n)
    assert abs(float(b_t.grad) - edb) < 4 * float((g * z).std()) / math.sqrt(n)


def test_o17_at_b_equal_s():
    """At b = s the b-gradient vanishes and the a-gradient is (a - mu)(1 - c_r)^2."""
    a, sigma = -0.4, 0.8
    da, db = expected_gradient(a, math.sqrt(S2), sigma, 1.2)
    c_r = S2 / (S2 + sigma**2)
    assert db == pytest.approx(0.0, abs=1e-13)
    assert da == pytest.approx((a - MU) * (1 - c_r) ** 2, rel=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.2])
@pytest.mark.parametrize("normalise", [False, True])
def test_o19_equilibrium(alpha, normalise):
    """Generator = sampler of the teacher's distribution, fake = copy of the teacher: gradient exactly 0."""
    teacher = ring8()
    fake = copy.deepcopy(teacher)
    torch.manual_seed(0)
    x_g = teacher.sample(512).double().requires_grad_(True)
    sigma = torch.exp(torch.empty(512).uniform_(math.log(0.002), math.log(80))).double()
    loss = sid.sid_generator_loss(teacher, fake, x_g, sigma, alpha=alpha, normalise=normalise)
    loss.sum().backward()
    # zero up to the summation order of autograd's accumulation (the two nets' paths cancel pairwise)
    assert float(loss.detach().abs().max()) == 0.0 and float(x_g.grad.abs().max()) < 1e-12
    # ... and away from equilibrium the same call does give a gradient (the test can fail)
    x_g.grad = None
    shifted = Gaussian([0.0, 0.0], 1.0)
    sid.sid_generator_loss(teacher, shifted, x_g, sigma, alpha=alpha, normalise=normalise).sum().backward()
    assert float(x_g.grad.abs().max()) > 1e-3


def test_sigma_range():
    sig = sid.sid_sigma(100_000, ring8())
    assert float(sig.min()) >= 0.002 and float(sig.max()) <= 24.42
    assert float(sig.max()) > 20 and float(sig.min()) < 0.003
    assert float(sid.sid_sigma(4, ring8(), t_max=1000).max()) <= 80.0


def tiny_sid(**kw):
    cfg = sid.SiDConfig(mlp_hidden=32, mlp_depth=1, **kw)
    return sid.SiD(ring8(), cfg)


def test_groups_losses_and_export():
    method = tiny_sid(init_sigma=2.5)
    groups = method.groups()
    assert list(groups) == ["generator", "fake_score"] and groups["generator"].optim.betas == (0.0, 0.999)
    batch = Batch(size=16, device=torch.device("cpu"), step=0)
    for name, net, other in (("fake_score", method.fake, method.generator),
                             ("generator", method.generator, method.fake)):
        method.zero_grad(set_to_none=True)
        out = groups[name].loss(batch)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()
        assert all(p.grad is not None for p in net.parameters())
        assert all(p.grad is None for p in other.parameters())    # the frozen partner gets no gradient
        assert all(p.requires_grad for p in other.parameters())
    net, recipe = method.export()
    assert net is method.generator and recipe == {"sampler": "onestep", "sigmas": [2.5, 0.0]}


def test_nan_samples_are_dropped():
    per = torch.tensor([1.0, float("nan"), 3.0, float("inf")], requires_grad=True)
    loss, dropped = sid.drop_nonfinite_mean(per)
    loss.backward()
    assert float(loss.detach()) == 1.0 and float(dropped) == 2
    assert per.grad.tolist() == [0.25, 0.0, 0.25, 0.0]
    # all samples non-finite: the loss stays non-finite (the loop then stops, naming the generator)
    method = tiny_sid(fake_warmup_steps=0)
    with torch.no_grad():
        method.generator.backbone.out.bias[0] = float("nan")
    out = method.generator_loss(Batch(size=8, device=torch.device("cpu"), step=1))
    assert float(out["dropped"]) == 8 and not torch.isfinite(out["loss"].detach())


def test_diverging_generator_stops_the_loop(tmp_path):
    """Bad input: a generator that turns NaN at step 3 stops the real loop with an error naming the group and
    the last good checkpoint (written at step 2), which is kept."""
    from diffdistill.train.loop import TrainConfig, train

    class Diverging(sid.SiD):
        def begin_step(self, step, nimg):
            if step == 3:
                with torch.no_grad():
                    self.generator.backbone.out.bias.fill_(float("nan"))
            super().begin_step(step, nimg)

    method = Diverging(ring8(), sid.SiDConfig(mlp_hidden=32, mlp_depth=1, fake_warmup_steps=0))   # G trains at once
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=6, batch=8, checkpoint_kimg=0.016, tick_kimg=1e9,
                      progress=False, tensorboard=False, device="cpu")
    with pytest.raises(DiffdistillError, match="'generator'.*step 3.*last good checkpoint"):
        train(method, cfg)
    assert list((tmp_path / "run").glob("checkpoints/*"))


def test_fake_warmup_is_the_generator_groups_start():
    """The warm-up is the generator group's `start` (the loop skips it before then), not a zero loss."""
    method = tiny_sid(fake_warmup_steps=10)
    groups = method.groups()
    assert groups["generator"].start == 10 and groups["fake_score"].start == 0


def test_bad_options_and_cli():
    with pytest.raises(DiffdistillError, match="init sigma"):
        tiny_sid(init_sigma=500.0)
    with pytest.raises(DiffdistillError, match="t_max"):
        tiny_sid(t_max=0.0)
    with pytest.raises(UsageError, match="--t-max"):
        cli_method("sid", ring8(), None, "--t-max", "1001")
    method = cli_method("sid", ring8(), None, "--alpha", "1.0", "--init-sigma", "1.5")
    assert method.cfg.alpha == 1.0 and method.init_sigma == 1.5 and method.cfg.fake_warmup_steps == 300
    spec = get_spec("sid")
    assert isinstance(method.generator, Precond) and not spec.needs_data and spec.help


def get_spec(name):
    from diffdistill.methods import get

    return get(name)


def dropout_unet_teacher(p=0.1, label_dim=0):
    from diffdistill.diffusion.denoiser import PrecondConfig
    from diffdistill.networks.unet import UNet

    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=label_dim, model_channels=8,
               channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[], dropout=p)
    return Precond(net, (1, 8, 8), label_dim, PrecondConfig()).eval().requires_grad_(False)


def test_generator_and_fake_score_keep_the_teachers_dropout():
    """sid_train.py builds every network with the EDM teacher's --dropout; --student-dropout overrides it."""
    from diffdistill.methods import common

    teacher = dropout_unet_teacher(0.1)
    method = cli_method("sid", teacher)
    assert common.dropout_of(method.generator) == pytest.approx(0.1)
    assert common.dropout_of(method.fake) == pytest.approx(0.1)
    method = cli_method("sid", teacher, None, "--student-dropout", "0")
    assert common.dropout_of(method.generator) == 0.0 and common.dropout_of(method.fake) == 0.0
    assert common.dropout_of(teacher) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["ring8", "network"])
def test_python_api_defaults_are_the_command_lines(kind):
    """SiDConfig() and `distill sid` without options resolve to the same settings for the same teacher and run
    (idempotently); the analytic teacher's fresh fake score gets its 300-step warm-up in both (the Python
    dataclass used to say 0)."""
    from diffdistill.api import distill_loop
    from diffdistill.methods.options import config_from_namespace

    teacher = ring8() if kind == "ring8" else dropout_unet_teacher(0.1)
    spec = get_spec("sid")
    for loop, options in ((distill_loop("unused"), ()), (distill_loop("unused", total_kimg=3, batch=32),
                                                         ("--kimg", "3", "--batch", "32")), (None, ())):
        api = spec.config().resolve(teacher, loop)
        cli = config_from_namespace(spec.config, parse_distill("sid", *options)).resolve(teacher, loop)
        assert api == cli
        assert api.resolve(teacher, None) == api
    assert api.fake_warmup_steps == (300 if kind == "ring8" else 0) and api.student_dropout is None
    assert sid.SiD(teacher).cfg == api
    assert sid.SiD(teacher).groups()["generator"].start == api.fake_warmup_steps


def test_adam_betas_and_ema():
    """Fake score Adam(0, 0.999) always; the generator's beta1 is --g_beta1 (default 0; FFHQ 0.9). The EMA is
    sid_train.py's --ema 0.5 Mimg with the loop's ramp-up 0.05."""
    method = cli_method("sid", ring8(), None, "--gen-beta1", "0.9")
    groups = method.groups()
    assert groups["generator"].optim.betas == (0.9, 0.999) and groups["fake_score"].optim.betas == (0.0, 0.999)
    assert groups["generator"].optim.kind == "adam" and groups["fake_score"].optim.kind == "adam"
    assert cli_method("sid", ring8()).groups()["generator"].optim.betas == (0.0, 0.999)
    assert method.ema_default(256) == (500.0, 0.05)


@pytest.mark.parametrize("label_dim,kimg", [(0, 500_000.0), (10, 800_000.0)])
def test_cifar10_recipe(label_dim, kimg):
    """run_sid.sh cifar10-uncond / cifar10-cond (the conditional one trains 800 Mimg)."""
    from diffdistill.cli import distill as cli_distill

    teacher = dropout_unet_teacher(0.13, label_dim)
    args = cli_distill.with_recipe(parse_distill("sid", "--recipe", "cifar10"), teacher)
    assert (args.batch, args.kimg, args.ema, args.student_dropout) == (256, kimg, 500.0, None)
    cfg = method_from_args("sid", args, teacher).cfg
    assert (cfg.gen_lr, cfg.fake_lr, cfg.alpha, cfg.t_max, cfg.init_sigma) == (1e-5, 1e-5, 1.2, 800.0, 2.5)
    assert cfg.loss_scale == 100.0 and cfg.gen_beta1 == 0.0 and cfg.gen_every == 1 and cfg.teacher_dropout == "eval"


def test_imagenet64_recipe():
    """run_sid.sh imagenet64-cond: batch 8192, lr 4e-6, EMA 2 Mimg, 1000 Mimg."""
    from diffdistill.cli import distill as cli_distill

    teacher = dropout_unet_teacher(0.1, 10)
    args = cli_distill.with_recipe(parse_distill("sid", "--recipe", "imagenet64"), teacher)
    assert (args.batch, args.kimg, args.ema) == (8192, 1_000_000.0, 2000.0)
    cfg = method_from_args("sid", args, teacher).cfg
    assert (cfg.gen_lr, cfg.fake_lr, cfg.alpha, cfg.t_max, cfg.init_sigma) == (4e-6, 4e-6, 1.2, 800.0, 2.5)
    assert cfg.loss_scale == 100.0 and cfg.gen_beta1 == 0.0


def test_ring8_keeps_every_mode(tmp_path):
    """O21 end to end on the real loop: fresh Precond(MLP) generator and fake score, data-free, against the
    exact ring8 denoiser; the (EMA) one-step generator keeps all eight modes (every share within 0.25/8 of
    1/8 on 10k samples)."""
    from diffdistill.io import load_snapshot
    from diffdistill.metrics.toy import mode_shares, within_nstd
    from diffdistill.samplers import sample
    from diffdistill.train.loop import TrainConfig, train

    teacher = ring8()
    torch.manual_seed(0)
    cfg = sid.SiDConfig(gen_lr=3e-4, fake_lr=1e-3, loss_scale=1.0, fake_warmup_steps=100)
    method = sid.SiD(teacher, cfg)
    loop = TrainConfig(out=str(tmp_path / "run"), max_steps=1200, batch=256, ema_halflife_kimg=5,
                       ema_rampup=None, tick_kimg=1e9, checkpoint_kimg=0, progress=False, tensorboard=False,
                       device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny MLPs: one thread is fastest (and kind to a shared CPU)
    try:
        result = train(method, loop)
    finally:
        torch.set_num_threads(threads)
    generator, recipe, _ = load_snapshot(result["model"])
    x = sample(generator, 10_000, sampler=recipe["sampler"], sigmas=recipe["sigmas"])
    shares = mode_shares(teacher, x)
    within = within_nstd(teacher, x)
    print(f"sid ring8: shares {shares.round(4).tolist()}, within 3 std {within:.4f}")
    assert abs(shares - 1 / 8).max() < 0.25 / 8, shares
    assert within > 0.7          # measured 0.84 (0.71 before the MLP's input Fourier features)


def test_fake_score_trains_on_augmented_samples_like_sid_cifar10():
    """sid_train.py's --augment 0.12 (kept by run_sid.sh for CIFAR-10): for a teacher whose network takes EDM's 9
    augment labels the fake score trains on augmented generator samples with their labels; the generator loss
    passes none. DMD2 trains its fake score unaugmented; --augment 0 turns it off."""
    from tests.test_di import _image_teacher, _spy

    method = sid.SiD(_image_teacher())
    assert method.augment_pipe is not None and method.augment_pipe.p == 0.12
    seen = _spy(method.fake)
    method.fake_score_loss(Batch(size=16, device=torch.device("cpu")))
    assert len(seen) == 1 and seen[0].shape == (16, 9)
    seen.clear()
    method.generator_loss(Batch(size=4, device=torch.device("cpu")))
    assert seen == [None]
    assert sid.SiD(_image_teacher(), sid.SiDConfig(augment=0.0)).augment_pipe is None
    assert sid.SiD(_image_teacher(augment_dim=0)).augment_pipe is None      # a teacher trained without it
    from diffdistill.methods import dmd2
    assert dmd2.DMD2(_image_teacher()).augment_pipe is None
