"""Consistency distillation: oracle O20 (algorithms.md §7 C), the teacher step against O9, the contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffdistill.diffusion.denoiser import BoundaryDenoiser, Denoiser, Precond, PrecondConfig
from diffdistill.diffusion.schedules import karras_sigmas
from diffdistill.errors import DiffdistillError, UsageError
from diffdistill.methods import cd, common
from diffdistill.methods.base import Batch
from diffdistill.teachers.analytic import Gaussian
from tests.cli_util import cli_method, method_from_args, parse_distill

MU, S2, EPS = 0.3, 0.25, 0.002


class ExactConsistency(Denoiser):
    """f*(x, t) = mu + sqrt((s^2 + eps^2)/(s^2 + t^2)) (x - mu): N(mu, s^2)'s consistency function (O20)."""

    def __init__(self):
        super().__init__((1,), sigma_min=EPS)

    def denoise(self, x, sigma, cond):
        t = sigma.reshape(-1, 1).to(x.dtype)
        return MU + ((S2 + EPS**2) / (S2 + t**2)).sqrt() * (x - MU)


def exact_ode_step(teacher, x, t, t_next, cond):
    """Exact PF-ODE map of 1-D Gaussian data (algorithms.md §7 B)."""
    t, t_next = t.reshape(-1, 1), t_next.reshape(-1, 1)
    return MU + ((S2 + t_next**2) / (S2 + t**2)).sqrt() * (x - MU)


class Tiny(nn.Module):
    """A small backbone F(x_in, c_noise, labels) with dropout (exercises preconditioning, RNG sharing)."""

    def __init__(self, dim=1, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, 32), nn.SiLU(), nn.Dropout(dropout), nn.Linear(32, dim))

    def forward(self, x, c_noise, labels=None):
        return self.net(torch.cat([x, c_noise[:, None].to(x.dtype)], 1))


def edm_teacher_net(dim=1, dropout=0.0):
    torch.manual_seed(0)
    return Precond(Tiny(dim, dropout), (dim,), 0, PrecondConfig(kind="edm"))


def test_residual_zero_for_exact_ode_step():
    f = ExactConsistency().double()
    teacher = Gaussian([MU], S2**0.5)
    torch.manual_seed(1)
    x = torch.randn(64, 1, dtype=torch.float64) * 5
    grid = karras_sigmas(18, dtype=torch.float64)[:-1]
    idx = torch.randint(17, (64,))
    a, b = cd.consistency_residual(f, f, teacher, x, grid[idx], grid[idx + 1], solver=exact_ode_step)
    assert (a - b).abs().max() < 1e-13


def test_residual_of_one_heun_step():
    """t = 5 -> 3.7, x = 2.2: the residual is the O(h^3) local error of Heun, -3.92e-5 (O20)."""
    f = ExactConsistency().double()
    teacher = Gaussian([MU], S2**0.5)
    x = torch.tensor([[2.2]], dtype=torch.float64)
    a, b = cd.consistency_residual(f, f, teacher, x, torch.tensor([5.0], dtype=torch.float64),
                                   torch.tensor([3.7], dtype=torch.float64), solver="heun")
    assert float(a - b) == pytest.approx(-3.92e-5, abs=5e-8)
    # Euler = DDIM: x' - mu = (x - mu)(s^2 + t t')/(s^2 + t^2) (algorithms.md O9, single-step check)
    a2, b2 = cd.consistency_residual(f, f, teacher, x, torch.tensor([5.0], dtype=torch.float64),
                                     torch.tensor([3.7], dtype=torch.float64), solver="euler")
    x_euler = MU + (2.2 - MU) * (S2 + 5 * 3.7) / (S2 + 25)
    expected = (MU + math.sqrt((S2 + EPS**2) / (S2 + 25)) * (2.2 - MU)
                - MU - math.sqrt((S2 + EPS**2) / (S2 + 3.7**2)) * (x_euler - MU))
    assert float(a2 - b2) == pytest.approx(expected, rel=1e-10)
    assert abs(expected) > 2 * 3.92e-5


@pytest.mark.parametrize("solver,n,expected", [("heun", 18, 0.82564604), ("heun", 8, 0.99438007),
                                               ("euler", 18, 0.72144507)])
def test_teacher_step_reproduces_edm_sampler_table(solver, n, expected):
    """Chaining `teacher_step` over the EDM grid (Euler on the last step to 0) gives the O9 table."""
    teacher = Gaussian([MU], S2**0.5)
    sig = karras_sigmas(n, dtype=torch.float64)
    x = torch.tensor([[80.0]], dtype=torch.float64)
    for i in range(n - 1):
        x = cd.teacher_step(teacher, x, sig[i:i + 1], sig[i + 1:i + 2], solver=solver)
    x = teacher(x, sig[n - 1:n])  # the final Euler step to sigma = 0 lands on D(x; sigma_{N-1})
    assert float(x) == pytest.approx(expected, abs=1e-7)


def test_boundary_condition_of_the_student():
    teacher = edm_teacher_net()
    student = common.student_from_teacher(teacher, boundary=True)
    nn.init.normal_(student.backbone.net[-1].weight, std=3.0)  # any network output
    x = torch.randn(32, 1) * 3
    assert torch.equal(student(x, EPS), x)
    assert not torch.allclose(student(x, 1.0), x)
    # the student starts as the teacher's backbone (copied, not shared)
    assert student.backbone is not teacher.backbone
    assert torch.equal(student.backbone.net[0].weight, teacher.backbone.net[0].weight)


def test_shared_dropout_between_the_two_evaluations():
    """With dropout, f(x_t, t) and the stop-grad target at the same point agree iff the masks are shared."""
    student = common.student_from_teacher(edm_teacher_net(dropout=0.5), boundary=True).train()
    identity = lambda te, x, a, b, c: x  # noqa: E731  (target evaluated at the same point and level)
    x = torch.randn(16, 1)
    t = torch.full((16,), 2.0)
    a, b = cd.consistency_residual(student, student, None, x, t, t, solver=identity)
    assert torch.allclose(a, b)
    a, b = cd.consistency_residual(student, student, None, x, t, t, solver=identity, same_dropout=False)
    assert not torch.allclose(a, b)


def make_method(**kw):
    teacher = Gaussian([MU], S2**0.5)
    student = common.student_from_teacher(edm_teacher_net(), boundary=True)
    return cd.ConsistencyDistillation(teacher, cd.CDConfig(**kw), student), teacher


@pytest.mark.parametrize("target", ["stopgrad", "ema"])
@pytest.mark.parametrize("distance", ["l2", "l1"])
def test_loss_trains_only_the_student(target, distance):
    method, teacher = make_method(target=target, distance=distance)
    assert list(method.groups()) == ["student"]
    batch = Batch(size=64, device=torch.device("cpu"), x=teacher.sample(64, torch.Generator().manual_seed(0)))
    out = method.student_loss(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in method.student.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    if method.target_net is not None:
        assert all(p.grad is None for p in method.target_net.parameters())


def test_ema_target_update():
    method, _ = make_method(target="ema", target_ema=0.9)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_net.parameters()]
    method.begin_step(1, 64)
    for p_t, p0, p in zip(method.target_net.parameters(), before, method.student.parameters()):
        assert torch.allclose(p_t, 0.9 * p0 + 0.1 * p)


def test_export_recipes():
    method, _ = make_method()
    net, rec = method.export()
    assert net is method.student and rec == {"sampler": "onestep", "sigmas": [80.0, 0.0]}
    method, _ = make_method(sample_sigmas=[80.0, 0.8])
    ema = common.student_from_teacher(edm_teacher_net(), boundary=True)
    net, rec = method.export({"student": ema})
    assert net is ema and rec == {"sampler": "multistep", "sigmas": [80.0, 0.8, 0.0]}


def test_bad_input():
    with pytest.raises(UsageError, match="lpips"):
        make_method(distance="lpips")
    with pytest.raises(UsageError, match="descending"):
        make_method(sample_sigmas=[0.8, 80.0])
    method, _ = make_method()
    with pytest.raises(DiffdistillError, match="real data"):
        method.student_loss(Batch(size=4, device=torch.device("cpu")))
    with pytest.raises(DiffdistillError, match="boundary"):
        cd.ConsistencyDistillation(Gaussian([MU], 0.5), student=edm_teacher_net())
    with pytest.raises(UsageError, match="positive"):
        make_method(lr=0.0)
    with pytest.raises(UsageError, match="target EMA"):
        make_method(target="ema", target_ema=1.0)
    with pytest.raises(UsageError, match="EMA decay"):
        make_method(ema_decay=1.0)
    with pytest.raises(UsageError, match="pooling"):
        make_method(lpips_pooling="l2")
    with pytest.raises(DiffdistillError, match="sample sigma"):
        make_method(sample_sigmas=[200.0, 1.0])


def test_lpips_from_weights(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(DiffdistillError, match="not a readable"):
        (tmp_path / "bad.safetensors").write_text("nope")
        cd.LPIPS(tmp_path / "bad.safetensors")
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "part.safetensors"))
    with pytest.raises(DiffdistillError, match="not LPIPS-VGG"):
        cd.LPIPS(tmp_path / "part.safetensors")
    # random weights of the right layout: a distance with d(a, a) = 0 and d(a, b) > 0
    lp = cd.LPIPS(random_lpips_weights(tmp_path), resize=32)
    assert lp.resize_below == 256 and lp.pooling == "avg"
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(lp(a, a), torch.zeros(2))
    assert bool((lp(a, b) > 0).all())
    assert torch.allclose(cd.distance(a, b, "lpips", lp), lp(a, b))


def _vgg_layout():
    out = []
    for v in cd._VGG16:
        out += ["pool"] if v == "M" else ["conv", "relu"]
    return out


def random_lpips_weights(tmp_path, seed=0):
    """LPIPS-VGG weights of the real layout (torchvision vgg16 `features.*`, lpips `lin*`), random values."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    state, ch = {}, 3
    convs = [v for v in cd._VGG16 if v != "M"]
    idx = [i for i, layer in enumerate(_vgg_layout()) if layer == "conv"]
    for i, c in zip(idx, convs):
        state[f"features.{i}.weight"] = torch.randn(c, ch, 3, 3) * math.sqrt(2 / (9 * ch))
        state[f"features.{i}.bias"] = torch.randn(c) * 0.1
        ch = c
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1)
    path = tmp_path / f"lpips{seed}.safetensors"
    save_file(state, str(path))
    return path


def reference_lpips(state, a, b, size):
    """piq's LPIPS(replace_pooling=True, reduction='none') as openai/consistency_models calls it, written out:
    images (x + 1)/2 upsampled to size x size, ImageNet mean/std, VGG16 with 2x2 average pooling, channel-unit
    features at relu1_2 ... relu5_3, ((fa - fb)^2 * w) averaged over space, summed over channels and taps."""
    f = torch.nn.functional
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(x):
        x = f.interpolate((x + 1) / 2, size=size, mode="bilinear")
        x, out, i = (x - mean) / std, [], 0
        for v in cd._VGG16:
            if v == "M":
                x = f.avg_pool2d(x, 2, 2)
                i += 1
                continue
            x = f.relu(f.conv2d(x, state[f"features.{i}.weight"], state[f"features.{i}.bias"], padding=1))
            i += 2
            if i - 1 in cd._TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    total = 0
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        w = state[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total = total + ((fa - fb) ** 2 * w).mean((2, 3)).sum(1)
    return total


def test_lpips_pooling_and_resize_follow_the_official_code(tmp_path):
    """openai/consistency_models: piq LPIPS with average pooling, images under 256 wide upsampled to 224; the
    CIFAR-10 JAX code's lpips-j keeps VGG's max pooling."""
    from safetensors.torch import load_file
    path = random_lpips_weights(tmp_path)
    lp = cd.LPIPS(path)
    assert (lp.resize, lp.resize_below, lp.pooling) == (224, 256, "avg")
    pools = [m for m in lp.features if not isinstance(m, (nn.Conv2d, nn.ReLU))]
    assert len(pools) == 4 and all(type(m) is nn.AvgPool2d and m.kernel_size == m.stride == 2 for m in pools)
    lp_max = cd.LPIPS(path, pooling="max")
    assert sum(type(m) is nn.MaxPool2d for m in lp_max.features) == 4
    assert not any(isinstance(m, nn.AvgPool2d) for m in lp_max.features)
    # the whole distance against piq's recipe written out (small sizes instead of 224 / 256: same code path)
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    small = cd.LPIPS(path, resize=32, resize_below=24)
    ref = reference_lpips(load_file(str(path)), a, b, 32)
    torch.testing.assert_close(small(a, b), ref, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(cd.LPIPS(path, resize=32, resize_below=24, pooling="max")(a, b), ref, rtol=1e-2)
    # resize rule: images narrower than resize_below are upsampled, the others are compared as they are
    seen = []
    small.features[0].register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
    small(a, b)
    small(torch.zeros(1, 3, 24, 24), torch.zeros(1, 3, 24, 24))
    assert seen == [(32, 32), (32, 32), (24, 24), (24, 24)]


def test_build_from_cli_args():
    method = cli_method("cd", edm_teacher_net(), None, "--solver", "euler", "--target", "ema", "--sample-sigmas",
                        "80", "0.8")
    assert method.cfg.solver == "euler" and method.target_net is not None
    assert method.cfg.sample_sigmas == [80.0, 0.8]
    assert method.student.precond.kind == "boundary"
    with pytest.raises(DiffdistillError, match="/nonexistent.safetensors: LPIPS weights file not found"):
        cli_method("cd", edm_teacher_net(), None, "--distance", "lpips", "--lpips-weights", "/nonexistent.safetensors")
    from diffdistill import methods
    assert methods.get("cd") is cd.SPEC and cd.SPEC.needs_data and isinstance(cd.SPEC.help, str)


def test_ring8_keeps_every_mode(tmp_path):
    """O21 end to end on the real loop: a fresh boundary-preconditioned MLP distilled from the exact ring8
    denoiser keeps all eight modes (every share within 0.25/8 of 1/8 on 10k one-step samples)."""
    from diffdistill.data import open_dataset
    from diffdistill.io import load_snapshot
    from diffdistill.metrics.toy import mode_shares, within_nstd
    from diffdistill.samplers import sample
    from diffdistill.teachers.analytic import ring8
    from diffdistill.train.loop import TrainConfig, train

    teacher = ring8()
    torch.manual_seed(0)
    method = cli_method("cd", teacher, None, "--lr", "1e-3")     # the CLI's analytic defaults (seeded with 0)
    assert method.cfg.target == cd.ANALYTIC_TARGET == "ema"
    assert method.groups()["student"].optim == cd.OptimConfig(lr=1e-3, kind="radam")
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=RING8_STEPS, batch=256, ema_halflife_kimg=5,
                      ema_rampup=None, tick_kimg=1e9, checkpoint_kimg=0, progress=False, tensorboard=False,
                      device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny MLPs: one thread is fastest (and kind to a shared CPU)
    try:
        result = train(method, cfg, data=open_dataset("toy:ring8"))
    finally:
        torch.set_num_threads(threads)
    student, recipe, _ = load_snapshot(result["model"])        # the EMA student, as exported
    assert recipe == {"sampler": "onestep", "sigmas": [80.0, 0.0]}
    x = sample(student, 10_000, sampler=recipe["sampler"], sigmas=recipe["sigmas"])
    shares = mode_shares(teacher, x)
    within = within_nstd(teacher, x)
    print(f"cd ring8: shares {shares.round(4).tolist()}, within 3 std {within:.4f}")
    assert abs(shares - 1 / 8).max() < 0.25 / 8, shares
    # measured 0.83 (seeds 1, 2: 0.83; stop-grad target 0.63; 0.33 before the MLP's input Fourier features)
    assert within > 0.7


RING8_STEPS = 1500


# --------------------------------------------------------------------------------------------------
# The boundary condition on every student (issue 15), dropout, EMA and the papers' recipes


class Constant(Denoiser):
    """D(x, sigma) = c: no boundary condition of its own."""

    def __init__(self):
        super().__init__((1,), sigma_min=EPS)
        self.c = nn.Parameter(torch.full((1,), 0.3))

    def denoise(self, x, sigma, cond):
        return self.c.expand_as(x)


def tiny_ddpm_teacher(dropout=0.0):
    """A tiny random diffusers UNet2DModel on the default DDPM schedule (the layout of test_diffusers_teacher)."""
    diffusers = pytest.importorskip("diffusers")
    from diffdistill.teachers.diffusers import DiffusersDenoiser, SchedulerConfig
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8, dropout=dropout)
    return DiffusersDenoiser(unet, SchedulerConfig()).eval().requires_grad_(False)


def test_boundary_wrapper_is_the_official_parameterisation_on_an_edm_denoiser():
    """BoundaryDenoiser(D) with D = c_skip_edm x + c_out_edm F is c_skip_cm x + c_out_cm F (Precond 'boundary')."""
    edm = edm_teacher_net().double()
    nn.init.normal_(edm.backbone.net[-1].weight, std=3.0)
    official = common.copy_denoiser(edm, boundary=True)
    wrapped = BoundaryDenoiser(edm)
    torch.manual_seed(0)
    x = torch.randn(64, 1, dtype=torch.float64) * 5
    sigma = karras_sigmas(64, dtype=torch.float64)[:-1]
    torch.testing.assert_close(wrapped(x, sigma), official(x, sigma), rtol=1e-12, atol=1e-12)
    assert torch.equal(wrapped(x, EPS), x) and torch.equal(official(x, EPS), x)
    c_skip, c_out = wrapped.scalings(sigma)
    assert bool((c_skip >= 0).all()) and float(c_out[0]) == pytest.approx(1 - EPS / 80)   # -> D at large sigma
    assert float(c_skip[0]) < 1e-7


def test_cd_student_of_a_diffusers_teacher_keeps_the_boundary_condition(tmp_path):
    """Issue 15: a copy of a diffusers DDPM teacher used to train with f(x, sigma_min) != x."""
    from diffdistill.io import load_snapshot, save_snapshot
    teacher = tiny_ddpm_teacher(dropout=0.2)
    method = cd.ConsistencyDistillation(teacher)
    student = method.student
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * 2
    assert torch.equal(student(x, student.sigma_min), x)
    assert isinstance(student, BoundaryDenoiser) and cd.has_boundary(student)
    assert student.sigma_min == teacher.sigma_min and student.sigma_max == teacher.sigma_max
    assert student.denoiser is not teacher and student.denoiser.model is not teacher.model
    assert torch.equal(student(x, method.grid[-1:].expand(4)), x)     # the last grid level is sigma_min itself
    assert not torch.allclose(student(x, 1.0), x, atol=1e-2)
    # dropout 0 by default (official --dropout 0.0); the teacher keeps its own
    assert common.dropout_of(student) == 0.0 and common.dropout_of(teacher) == pytest.approx(0.2)
    # one training step of the loss reaches the copied UNet
    batch = Batch(size=4, device=torch.device("cpu"), x=torch.rand(4, 3, 8, 8) * 2 - 1)
    out = method.student_loss(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and any(p.grad is not None for p in student.denoiser.model.parameters())
    # the wrapper saves and loads as a snapshot
    save_snapshot(tmp_path / "snap", student.eval(), {"sampler": "onestep", "sigmas": [student.sigma_max, 0.0]})
    loaded, recipe, _ = load_snapshot(tmp_path / "snap")
    assert isinstance(loaded, BoundaryDenoiser) and loaded.sigma_min == student.sigma_min
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 3.0), student(x, 3.0))


def test_students_without_the_boundary_condition_are_refused():
    """A student that is neither a boundary Precond nor a BoundaryDenoiser is refused, whatever its type; a
    constant one used to pass and have CD loss exactly 0."""
    teacher = Gaussian([MU], S2**0.5)
    for bad in (Constant(), tiny_ddpm_teacher(), Precond(Tiny(), (1,), 0, PrecondConfig(kind="vp"))):
        with pytest.raises(DiffdistillError, match="boundary condition"):
            cd.ConsistencyDistillation(teacher, student=bad)
    # wrapped, D = -1 is no longer a fixed point of the loss: on the 2-level grid [80, sigma_min] the target is
    # f(x_next, sigma_min) = x_next, the teacher's Euler step to sigma_min (~ MU), and f(x_t, 80) ~ -1
    student = cd.with_boundary(Constant())
    nn.init.constant_(student.denoiser.c, -1.0)
    method = cd.ConsistencyDistillation(teacher, cd.CDConfig(num_scales=2, solver="euler"), student=student)
    batch = Batch(size=256, device=torch.device("cpu"), x=teacher.sample(256, torch.Generator().manual_seed(0)))
    assert float(method.student_loss(batch)["loss"].detach()) == pytest.approx((MU + 1) ** 2, rel=0.01)


def test_student_dropout_defaults_to_zero():
    teacher = edm_teacher_net(dropout=0.3)
    assert common.dropout_of(cd.ConsistencyDistillation(Gaussian([MU], 0.5)).student) is None  # fresh MLP
    method = cd.ConsistencyDistillation(teacher)
    assert common.dropout_of(method.student) == 0.0 and common.dropout_of(teacher) == pytest.approx(0.3)
    keep = cd.ConsistencyDistillation(teacher, cd.CDConfig(student_dropout=None))
    assert common.dropout_of(keep.student) == pytest.approx(0.3)
    assert common.dropout_of(cli_method("cd", teacher).student) == 0.0
    keep = cli_method("cd", teacher, None, "--student-dropout", "teacher")
    assert keep.cfg.student_dropout is None and common.dropout_of(keep.student) == pytest.approx(0.3)
    assert common.dropout_of(cli_method("cd", teacher, None, "--student-dropout", "0.2").student) == pytest.approx(0.2)


def test_ema_default_is_the_official_per_step_decay():
    method = cli_method("cd", edm_teacher_net())
    halflife, rampup = method.ema_default(512)
    assert rampup is None and halflife == pytest.approx(512 * math.log(0.5) / math.log(0.9999) / 1000)
    assert 0.5 ** (512 / (halflife * 1000)) == pytest.approx(0.9999, abs=1e-12)     # decay per step of 512
    imagenet = cli_method("cd", edm_teacher_net(), None, "--ema-decay", "0.9999432189950708")
    assert imagenet.ema_default(2048) == (pytest.approx(25000.0), None)
    # analytic teachers (short runs of a fresh MLP): EDM's 500 kimg with ramp-up, as before
    assert cli_method("cd", Gaussian([MU], 0.5)).ema_default(256) == (500.0, 0.05)


def test_paper_recipes(tmp_path):
    from diffdistill.cli import distill as cli_distill

    weights = str(random_lpips_weights(tmp_path))
    teacher = edm_teacher_net()

    def recipe(name, *extra):
        args = cli_distill.with_recipe(parse_distill("cd", "--data", "d", "--recipe", name, *extra), teacher)
        return args, method_from_args("cd", args, teacher)

    args, m = recipe("cifar10", "--lpips-weights", weights)
    assert (args.batch, args.kimg, args.xflip, args.ema) == (512, 409600, True, None)   # 800k steps of 512
    c = m.cfg
    assert (c.num_scales, c.rho, c.solver, c.target, c.distance, c.lpips_pooling) == (
        18, 7.0, "heun", "stopgrad", "lpips", "max")
    optim = m.groups()["student"].optim
    assert c.lr == 4e-4 and optim == cd.OptimConfig(lr=4e-4, kind="radam") and optim.warmup_kimg == 0
    assert c.ema_decay == 0.9999 and c.student_dropout == 0.0 and m._lpips[0].pooling == "max"
    args, m = recipe("imagenet64", "--lpips-weights", weights, "--lr", "1e-5")       # the user's options win
    assert (args.batch, args.kimg) == (2048, 1228800)                                   # 600k steps of 2048
    c = m.cfg
    assert (c.num_scales, c.target, c.target_ema, c.distance, c.lpips_pooling) == (40, "ema", 0.95, "lpips", "avg")
    optim = m.groups()["student"].optim
    assert optim.lr == c.lr == 1e-5 and optim.kind == "radam" and m.ema_default(2048) == (pytest.approx(25000.0), None)
    with pytest.raises(UsageError, match="--lpips-weights"):
        recipe("cifar10")
    with pytest.raises(UsageError, match="positive"):
        recipe("cifar10", "--lpips-weights", weights, "--lr", "0")


# --------------------------------------------------------------------------------------------------
# One set of defaults (issue 16): the Python API's CDConfig() and the command line's resolve alike


@pytest.mark.parametrize("kind", ["ring8", "network"])
def test_python_defaults_equal_the_command_lines(kind):
    from diffdistill.api import distill_loop
    from diffdistill.methods.options import config_from_namespace
    from diffdistill.teachers.analytic import ring8

    teacher = ring8() if kind == "ring8" else edm_teacher_net()
    loop = distill_loop(out="unused", device="cpu")
    api = cd.SPEC.config().resolve(teacher, loop)
    cli = config_from_namespace(cd.SPEC.config, parse_distill("cd")).resolve(teacher, loop)
    assert api == cli
    assert api.resolve(teacher, loop) == api == cd.CDConfig().resolve(teacher, None)     # idempotent, run-free
    analytic = kind == "ring8"
    assert (api.target, api.ema_decay) == (("ema", None) if analytic else ("stopgrad", 0.9999))
    assert (api.lr, api.num_scales, api.student_dropout, api.sample_sigmas) == (4e-4, 18, 0.0, [])
    # a method built in Python gets them too (before: stop-grad and 0.9999 for every teacher)
    method = cd.ConsistencyDistillation(teacher)
    assert method.cfg == api and (method.target_net is not None) == analytic
    assert method.ema_default(256) == ((500.0, 0.05) if analytic else cli_method("cd", teacher).ema_default(256))
    # the user's choice is kept whatever the teacher
    mine = cd.CDConfig(target="stopgrad", ema_decay=0.999).resolve(teacher, loop)
    assert (mine.target, mine.ema_decay) == ("stopgrad", 0.999)


@pytest.mark.parametrize("name", ["cifar10", "imagenet64"])
def test_recipe_in_python_equals_the_command_lines(name, tmp_path):
    """`distill cd --recipe NAME` and the recipe's dict given to the Python API give the same settings (every
    digit of the ImageNet-64 EMA decay included) and the same loop settings."""
    from diffdistill.api import LOOP_RECIPE_KEYS, recipe_settings
    from diffdistill.cli import distill as cli_distill
    from diffdistill.methods.options import config_from_namespace, make_config

    weights = str(random_lpips_weights(tmp_path))
    teacher = edm_teacher_net()
    args = cli_distill.with_recipe(parse_distill("cd", "--recipe", name, "--lpips-weights", weights), teacher)
    cli = config_from_namespace(cd.CDConfig, args).resolve(teacher, None)
    settings = recipe_settings(cd.SPEC, name)
    assert (settings.pop("total_kimg"), settings.pop("batch"), settings.pop("xflip")) == (args.kimg, args.batch,
                                                                                          args.xflip)
    assert not set(settings) & set(LOOP_RECIPE_KEYS)
    api = make_config(cd.CDConfig, {**settings, "lpips_weights": weights}).resolve(teacher, None)
    assert api == cli
    assert cli.ema_decay == {"cifar10": 0.9999, "imagenet64": 0.9999432189950708}[name]


def test_bad_settings_name_the_option():
    from diffdistill.methods.options import make_config

    teacher = edm_teacher_net()
    for field_name, value, flag in (("num_scales", 1, "--num-scales"), ("rho", 0.0, "--rho"), ("lr", -1.0, "--lr"),
                                    ("target_ema", 1.5, "--target-ema"), ("ema_decay", 0.0, "--ema-decay"),
                                    ("solver", "rk4", "--solver"), ("sample_sigmas", [1.0, 2.0], "--sample-sigmas")):
        with pytest.raises(UsageError, match=flag) as e:
            make_config(cd.CDConfig, {field_name: value}).resolve(teacher, None)
        assert "\n" not in str(e.value)
    code = pytest.raises(SystemExit, parse_distill, "cd", "--student-dropout", "1.5").value.code
    assert code == 2
