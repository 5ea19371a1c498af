"""DMD2: oracles O18 (the surrogate's gradient), O19 (zero at equilibrium), the two-time-scale rule, the GAN
head, backward simulation, and O21 (ring8 keeps all eight modes). algorithms.md §6.2 and §7 C."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.errors import DiffdistillError, UsageError
from diffdistill.methods import common, dmd2
from diffdistill.methods.base import Batch
from diffdistill.networks.unet import UNet
from diffdistill.teachers.analytic import Gaussian, ring8
from tests.cli_util import cli_method, method_from_args, parse_distill

CPU = torch.device("cpu")


def test_o18_surrogate_gradient_is_g_over_numel():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    dmd2.dm_surrogate(x, g).backward()
    assert torch.allclose(x.grad, g / x.numel(), rtol=1e-12, atol=0)


def test_o18_gradient_on_x_g():
    """dL/dx_g = (D_f - D_r) / (mean|x_g - D_r| * numel), per sample, with both denoisers evaluated at x_s."""
    torch.manual_seed(0)
    teacher, fake = ring8(), Gaussian([0.2, -0.1], 0.6)
    x_g = (torch.randn(32, 2, dtype=torch.float64) * 0.8).requires_grad_(True)
    sigma = torch.exp(torch.empty(32).uniform_(-5, 4)).double()
    noise = torch.randn(32, 2, dtype=torch.float64)
    loss, grad = dmd2.dm_loss(teacher, fake, x_g, sigma, noise=noise)
    loss.backward()
    # the oracle, from the denoisers directly
    x_s = x_g.detach() + sigma[:, None] * noise
    d_r, d_f = teacher(x_s, sigma), fake(x_s, sigma)
    w = (x_g.detach() - d_r).abs().mean(1, keepdim=True)
    expected = (d_f - d_r) / (w * x_g.numel())
    assert torch.allclose(x_g.grad, expected, rtol=1e-10, atol=0)
    assert torch.allclose(grad, (d_f - d_r) / w, rtol=1e-10, atol=0)
    # the direction is Diff-Instruct's per-sample direction sg(D_f - D_r) (a positive per-sample rescaling)
    cos = torch.nn.functional.cosine_similarity(x_g.grad, d_f - d_r, dim=1)
    assert torch.allclose(cos, torch.ones(32, dtype=torch.float64))


@pytest.mark.parametrize("sigma", [0.003, 0.3, 5.0, 72.0])
def test_o19_equilibrium(sigma):
    """Generator = sampler of the teacher's distribution, fake = copy of the teacher: gradient exactly 0."""
    teacher = ring8()
    fake = copy.deepcopy(teacher)
    x_g = teacher.sample(256, torch.Generator().manual_seed(1)).double().requires_grad_(True)
    loss, grad = dmd2.dm_loss(teacher, fake, x_g, torch.full((256,), sigma, dtype=torch.float64))
    loss.backward()
    assert float(grad.abs().max()) == 0.0 and float(x_g.grad.abs().max()) == 0.0
    loss, grad = dmd2.dm_loss(teacher, Gaussian([0.0, 0.0], 1.0), x_g, torch.full((256,), sigma,
                                                                                 dtype=torch.float64))
    assert float(grad.abs().max()) > 1e-3         # away from equilibrium the same call is not zero


def test_noise_levels():
    teacher = ring8()
    sig = dmd2.dm_sigma(200_000, teacher)
    assert float(sig.min()) == pytest.approx(0.0032316, rel=1e-4)   # Karras index 20 of 1000
    assert float(sig.max()) == pytest.approx(72.054, rel=1e-4)      # Karras index 980
    allsig = dmd2.all_levels_sigma(200_000, teacher)
    assert float(allsig.min()) == pytest.approx(0.002, rel=1e-5)
    assert float(allsig.max()) == pytest.approx(80.0)


def tiny_dmd2(**kw):
    return dmd2.DMD2(ring8(), dmd2.DMD2Config(mlp_hidden=32, mlp_depth=1, **kw))


def test_two_time_scale_groups_and_gradients():
    method = tiny_dmd2()
    groups = method.groups()
    assert list(groups) == ["generator", "fake_score"]
    assert groups["generator"].every == 5 and groups["fake_score"].every == 1
    assert groups["generator"].optim.kind == "adamw" and groups["generator"].optim.grad_clip == 10.0
    batch = Batch(size=16, device=CPU, step=0)
    for name, net, other in (("fake_score", method.fake, method.generator),
                             ("generator", method.generator, method.fake)):
        method.zero_grad(set_to_none=True)
        out = groups[name].loss(batch)
        assert torch.isfinite(out["loss"])
        out["loss"].backward()
        assert all(p.grad is not None for p in net.parameters())
        assert all(p.grad is None for p in other.parameters())
    net, recipe = method.export()
    assert net is method.generator and recipe == {"sampler": "onestep", "sigmas": [80.0, 0.0]}


@pytest.mark.parametrize("backbone", ["mlp", "unet"])
def test_gan_head_on_fake_features(backbone):
    if backbone == "mlp":
        teacher, x_real = ring8(), ring8().sample(8)
        method = tiny_dmd2(gan_weight=3e-3)
    else:
        torch.manual_seed(0)
        net = UNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
                   channel_mult_emb=2, num_blocks=1, attn_resolutions=[], dropout=0.0)
        teacher = Precond(net, (1, 8, 8), 0, PrecondConfig()).eval().requires_grad_(False)
        x_real = torch.rand(8, 1, 8, 8) * 2 - 1
        method = dmd2.DMD2(teacher, dmd2.DMD2Config(gan_weight=3e-3))
    groups = method.groups()
    head_ids = {id(p) for p in method.head.parameters()}
    assert head_ids <= {id(p) for p in groups["fake_score"].params} and groups["fake_score"].needs_data
    out = method.fake_score_loss(Batch(size=8, device=CPU, x=x_real, step=0))
    assert {"cls_loss", "fake_loss"} <= set(out) and torch.isfinite(out["loss"])
    method.zero_grad(set_to_none=True)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.head.parameters())
    # generator step: the GAN term reaches the generator through the fake encoder, whose weights stay fixed
    method.zero_grad(set_to_none=True)
    out = method.generator_loss(Batch(size=8, device=CPU, step=0))
    assert "gan_loss" in out
    out["loss"].backward()
    assert all(p.grad is None for p in method.fake.parameters()) and all(
        p.grad is None for p in method.head.parameters())
    assert sum(float(p.grad.abs().sum()) for p in method.generator.parameters() if p.grad is not None) > 0
    with pytest.raises(DiffdistillError, match="real data"):
        method.fake_score_loss(Batch(size=8, device=CPU, step=0))


def test_backward_simulation():
    method = tiny_dmd2(gen_sigmas=[80.0, 2.0, 0.5])
    net, recipe = method.export()
    assert recipe == {"sampler": "multistep", "sigmas": [80.0, 2.0, 0.5, 0.0]}
    calls = []
    method.generator.register_forward_pre_hook(
        lambda m, a: calls.append((torch.is_grad_enabled(), float(torch.as_tensor(a[1]).reshape(-1)[0]))))
    torch.manual_seed(0)
    for _ in range(12):
        calls.clear()
        x, _ = method.generate(4, CPU, grad=True)
        # the generator runs its own sampler (no grad) down to a random level, then once with grad there
        levels = [s for _, s in calls]
        assert levels == [80.0, 2.0, 0.5][:len(levels)]
        assert [g for g, _ in calls] == [False] * (len(calls) - 1) + [True]
        assert x.requires_grad
    with pytest.raises(UsageError, match="descending"):
        tiny_dmd2(gen_sigmas=[1.0, 2.0])


def test_bad_input_and_cli():
    from diffdistill.methods import get

    with pytest.raises(UsageError, match="--data"):
        cli_method("dmd2", ring8(), None, "--gan-weight", "3e-3")
    with pytest.raises(DiffdistillError, match="outside"):
        cli_method("dmd2", ring8(), None, "--gen-sigmas", "500")
    with pytest.raises(UsageError, match="warmup-kimg"):
        cli_method("dmd2", ring8(), None, "--warmup-kimg", "-1")
    with pytest.raises(UsageError, match="--dm-range"):
        cli_method("dmd2", ring8(), None, "--dm-range", "0.5", "0.1")
    with pytest.raises(UsageError, match="--dm-range"):
        tiny_dmd2(dm_range=(0.0, 1.5))
    method = cli_method("dmd2", ring8(), None, "--gen-every", "3")
    assert method.groups()["generator"].every == 3 and method.cfg.fake_warmup_steps == 300
    assert not get("dmd2").needs_data and get("dmd2").help
    assert math.isclose(method.gen_sigmas[0], 80.0)
    assert common.is_weightless(method.teacher)


def conditional_mlp_teacher():
    torch.manual_seed(0)
    return common.mlp_denoiser((2,), 0.5, label_dim=3, hidden=16, depth=1).eval().requires_grad_(False)


def test_fake_score_trains_on_the_generator_turns_samples(tmp_path, monkeypatch):
    """EDMUniModel: on generator steps the fake score trains on exactly the samples (and labels) the generator
    loss produced in that step, micro-batch by micro-batch, made before the generator's update; on the other
    steps the generator makes them without gradients. Checked on the real loop with gradient accumulation.
    DMD2 keeps no EMA: the exported generator is the trained one."""
    from diffdistill.io import load_snapshot
    from diffdistill.train.loop import TrainConfig, train

    events = []

    class Spy(dmd2.DMD2):
        def begin_step(self, step, nimg):
            self.now = step
            super().begin_step(step, nimg)

        def generate(self, n, device, grad):
            x, cond = super().generate(n, device, grad)
            events.append(("gen" if grad else "nograd", self.now, x.detach().clone(), cond.clone()))
            return x, cond

    edm_loss = common.edm_loss

    def spy_edm_loss(denoiser, x, sigma, cond=None, sigma_data=None):
        if denoiser is method.fake:
            events.append(("fake", method.now, x.detach().clone(), cond.clone()))
        return edm_loss(denoiser, x, sigma, cond, sigma_data)

    monkeypatch.setattr(common, "edm_loss", spy_edm_loss)
    method = Spy(conditional_mlp_teacher(), dmd2.DMD2Config(gen_every=5, lr=1e-3, weight_decay=0.0))
    assert method.ema_default(256) == (0.0, None)
    loop = TrainConfig(out=str(tmp_path / "run"), max_steps=7, batch=8, batch_gpu=4, tick_kimg=1e9,
                       checkpoint_kimg=0, progress=False, tensorboard=False, device="cpu")
    result = train(method, loop)
    for step in range(7):
        ev = [e for e in events if e[1] == step]
        if step % 5 == 0:      # the generator turn's two micro-batches, then the fake score's, in order
            assert [e[0] for e in ev] == ["gen", "gen", "fake", "fake"], step
            pairs = [(ev[0], ev[2]), (ev[1], ev[3])]
        else:                  # no generator update: fresh samples without gradients
            assert [e[0] for e in ev] == ["nograd", "fake", "nograd", "fake"], step
            pairs = [(ev[0], ev[1]), (ev[2], ev[3])]
        for made, used in pairs:
            assert torch.equal(made[2], used[2]) and torch.equal(made[3], used[3])
        assert not torch.equal(pairs[0][0][2], pairs[1][0][2])   # each micro-batch its own samples
    assert len({e[1] for e in events}) == 7
    generator, _, _ = load_snapshot(result["model"])     # no EMA: the exported generator is the trained one
    for p, q in zip(generator.parameters(), method.generator.parameters()):
        assert torch.equal(p.detach().cpu(), q.detach().cpu())


def test_lr_warmup_is_500_steps_of_the_batch():
    """train_edm.py --warmup_step 500 (both networks): 500 steps of --batch unless --warmup-kimg is given."""
    method = cli_method("dmd2", ring8(), None, "--batch", "64")
    for group in method.groups().values():
        assert group.optim.warmup_kimg == pytest.approx(500 * 64 / 1000)
        assert group.optim.kind == "adamw" and group.optim.betas == (0.9, 0.999)
        assert group.optim.weight_decay == 0.01 and group.optim.grad_clip == 10.0
    method = cli_method("dmd2", ring8(), None, "--warmup-kimg", "20", "--betas", "0.5", "0.99", "--weight-decay",
                        "0", "--grad-clip", "1", "--dm-range", "0.1", "0.5")
    for group in method.groups().values():
        assert group.optim.warmup_kimg == 20.0 and group.optim.betas == (0.5, 0.99)
        assert group.optim.weight_decay == 0.0 and group.optim.grad_clip == 1.0
    assert method.cfg.dm_range == (0.1, 0.5)
    # outside a run (the Python class without a loop) there is no batch to count steps of: no warm-up
    assert dmd2.DMD2(ring8()).cfg.warmup_kimg == 0.0


@pytest.mark.parametrize("kind", ["ring8", "network"])
def test_python_api_defaults_are_the_command_lines(kind):
    """DMD2Config() and `distill dmd2` without options resolve to the same settings for the same teacher and run
    (idempotently): the LR warm-up is 500 steps of the run's batch in both (0 without a run), the fake-score
    warm-up 300 steps for the analytic teacher's fresh fake score, dropout 0."""
    from diffdistill.api import distill_loop
    from diffdistill.methods import get
    from diffdistill.methods.options import config_from_namespace

    teacher = ring8() if kind == "ring8" else dropout_unet_teacher(0.1)
    spec = get("dmd2")
    for loop, options, warmup in ((distill_loop("unused"), (), 64.0),
                                  (distill_loop("unused", total_kimg=3, batch=32), ("--kimg", "3", "--batch", "32"),
                                   16.0), (None, (), 0.0)):
        api = spec.config().resolve(teacher, loop)
        cli = config_from_namespace(spec.config, parse_distill("dmd2", *options)).resolve(teacher, loop)
        assert api == cli
        assert api.resolve(teacher, None) == api
        assert api.warmup_kimg == warmup
    assert api.fake_warmup_steps == (300 if kind == "ring8" else 0) and api.student_dropout == 0.0
    assert api.dm_range == (0.02, 0.98) and api.gen_sigmas == []
    assert dmd2.DMD2(teacher).cfg == api


def dropout_unet_teacher(p=0.1):
    torch.manual_seed(0)
    net = UNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1, 2],
               channel_mult_emb=2, num_blocks=1, attn_resolutions=[], dropout=p)
    return Precond(net, (1, 8, 8), 0, PrecondConfig()).eval().requires_grad_(False)


def test_generator_and_fake_score_train_without_dropout():
    """train_edm.py builds every network with dropout 0; --student-dropout teacher keeps the teacher's."""
    teacher = dropout_unet_teacher(0.1)
    method = cli_method("dmd2", teacher)
    assert common.dropout_of(method.generator) == 0.0 and common.dropout_of(method.fake) == 0.0
    assert common.dropout_of(teacher) == pytest.approx(0.1)
    method = cli_method("dmd2", teacher, None, "--student-dropout", "teacher")
    assert common.dropout_of(method.generator) == pytest.approx(0.1)
    assert common.dropout_of(method.fake) == pytest.approx(0.1)


class _Data:
    shape, label_dim = (2,), 0


def test_imagenet64_recipe():
    """The official ImageNet-64 run (GAN from scratch, FID 1.51): every setting reaches the built method."""
    from diffdistill.cli import distill as cli_distill

    assert "imagenet64" in cli_distill.method_recipes("dmd2")
    args = cli_distill.with_recipe(parse_distill("dmd2", "--recipe", "imagenet64", "--data", "toy:ring8"), ring8())
    assert (args.batch, args.kimg, args.ema) == (280, 56000.0, 0.0)
    method = method_from_args("dmd2", args, ring8(), _Data())
    cfg = method.cfg
    assert (cfg.lr, cfg.betas, cfg.weight_decay, cfg.grad_clip) == (2e-6, (0.9, 0.999), 0.01, 10.0)
    assert cfg.warmup_kimg == 20.0 and cfg.gen_every == 5 and cfg.dm_range == (0.02, 0.98)
    assert cfg.gan_weight == 3e-3 and cfg.cls_weight == 1e-2 and cfg.teacher_dropout == "eval"
    assert cfg.student_dropout == 0.0 and method.head is not None and method.gen_sigmas == [80.0]


def test_ring8_keeps_every_mode(tmp_path):
    """O21 end to end on the real loop: fresh Precond(MLP) generator and fake score, data-free, against the
    exact ring8 denoiser; the (EMA) one-step generator keeps all eight modes (every share within 0.4/8 of 1/8
    on 10k samples: a lost mode is 1/8 off, a halved one 1/16)."""
    from diffdistill.io import load_snapshot
    from diffdistill.metrics.toy import mode_shares, within_nstd
    from diffdistill.samplers import sample
    from diffdistill.train.loop import TrainConfig, train

    teacher = ring8()
    torch.manual_seed(0)
    cfg = dmd2.DMD2Config(lr=1e-3, weight_decay=0.0, fake_warmup_steps=100)   # generator every 5th step
    method = dmd2.DMD2(teacher, cfg)
    loop = TrainConfig(out=str(tmp_path / "run"), max_steps=1500, batch=256, ema_halflife_kimg=5,
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
    print(f"dmd2 ring8: shares {shares.round(4).tolist()}, within 3 std {within:.4f}")
    # Largest share error, loop seeds 0/1/2: 0.039/0.041/0.029 with the official sample handoff (the fake score
    # trains on the generator turn's samples); 0.028/0.027 when it drew fresh ones after the generator's update.
    assert abs(shares - 1 / 8).max() < 0.4 / 8, shares
    assert within > 0.65         # measured 0.86 (seeds 1/2: 0.83/0.84; 0.80 before the sample handoff)
