"""Progressive distillation (diffdistill.methods.pd; algorithms.md §3, oracles O10, O14)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffdistill import io
from diffdistill.diffusion import param
from diffdistill.diffusion.denoiser import Denoiser, Precond, PrecondConfig
from diffdistill.errors import DiffdistillError, UsageError
from diffdistill.methods import pd
from diffdistill.methods.base import Batch
from diffdistill.networks.mlp import mlp_preset
from diffdistill.samplers import sample, sample_euler
from diffdistill.samplers.ode import ddim_step
from diffdistill.teachers.analytic import Gaussian, ring8
from tests.cli_util import cli_method, method_from_args, parse_distill

MU, VAR = 0.3, 0.25


def _cfg(**kw) -> pd.PDConfig:
    """A PDConfig for a method built outside a run, which must give its round length."""
    return pd.PDConfig(**{"round_kimg": 1.0, **kw})


# --------------------------------------------------------------------------------------------------
# Independent oracle: PD's target in VP coordinates (§3.1, §3.3) with the exact Gaussian posterior mean


def cos_alpha_sigma(t, lmin=-20.0, lmax=20.0):
    b = math.atan(math.exp(-lmax / 2))
    a = math.atan(math.exp(-lmin / 2)) - b
    lam = -2 * np.log(np.tan(a * t + b))
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def vp_x_hat(z, t):
    al, sg = cos_alpha_sigma(t)
    return MU + al * VAR / (al**2 * VAR + sg**2) * (z - al * MU)


def vp_ddim(z, t, s):
    """z_s = alpha_s x_hat + sigma_s eps_hat (§1.5, alpha/sigma form)."""
    x = vp_x_hat(z, t)
    al_t, sg_t = cos_alpha_sigma(t)
    al_s, sg_s = cos_alpha_sigma(s)
    return al_s * x + sg_s * (z - al_t * x) / sg_t


def test_o14_student_step_with_the_target_lands_on_the_teachers_two_steps():
    teacher = Gaussian([MU], math.sqrt(VAR))
    n = 4
    t_grid = pd.pd_sigmas(2 * n, "cosine")
    s_grid = t_grid[::2]
    torch.testing.assert_close(s_grid, pd.pd_sigmas(n, "cosine"), rtol=1e-12, atol=0)
    gen = torch.Generator().manual_seed(0)
    for k in range(n - 1):                                      # every step but the final one (t'' > 0)
        i = n - 1 - k                                           # code index: t = (i+1)/N
        t, t_mid, t_next = (i + 1) / n, (i + 0.5) / n, i / n
        z_t = torch.randn(5, 1, generator=gen, dtype=torch.float64)
        al_t, _ = cos_alpha_sigma(t)
        x_t = z_t / al_t                                        # EDM coordinates
        sig = [torch.full((5,), float(t_grid[2 * k + j]), dtype=torch.float64) for j in range(3)]
        x_tilde = pd.pd_target(teacher, x_t, *sig)
        # One student DDIM step from z_t with x~, in VP form ...
        al_n, sg_n = cos_alpha_sigma(t_next)
        _, sg_t = cos_alpha_sigma(t)
        z_student = al_n * x_tilde + sg_n * (z_t - al_t * x_tilde) / sg_t
        # ... equals the teacher's two half-steps, computed independently in VP form.
        z_teacher = vp_ddim(vp_ddim(z_t.numpy(), t, t_mid), t_mid, t_next)
        np.testing.assert_allclose(z_student.numpy(), z_teacher, rtol=0, atol=1e-10)
        # And in EDM form: the same Euler step lands on the teacher's two Euler half-steps.
        x_mid = ddim_step(x_t, teacher(x_t, sig[0]), sig[0], sig[1])
        x_two = ddim_step(x_mid, teacher(x_mid, sig[1]), sig[1], sig[2])
        torch.testing.assert_close(ddim_step(x_t, x_tilde, sig[0], sig[2]), x_two, rtol=0, atol=1e-10)
    # Final step (t'' = 0): x~ is the teacher's midpoint prediction; the official VP two-step result at
    # sigma(0) = 4.5e-5 differs from the student's step only by O(1e-5).
    z_t = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    al_t, _ = cos_alpha_sigma(1 / n)
    sig = [torch.full((5,), float(t_grid[2 * (n - 1) + j]), dtype=torch.float64) for j in range(3)]
    assert float(sig[2][0]) == 0.0
    x_tilde = pd.pd_target(teacher, z_t / al_t, *sig)
    z_mid = vp_ddim(z_t.numpy(), 1 / n, 0.5 / n)
    np.testing.assert_allclose(x_tilde.numpy(), vp_x_hat(z_mid, 0.5 / n), rtol=0, atol=1e-10)
    diff = np.abs(x_tilde.numpy() - vp_ddim(z_mid, 0.5 / n, 0.0)).max()
    assert 1e-7 < diff < 1e-4


def test_o14_dirac_data_target_is_the_point():
    x0 = torch.tensor([[0.7, -0.2]], dtype=torch.float64)
    teacher = Gaussian(x0[0], 1e-9)
    grid = pd.pd_sigmas(16, "karras")
    x_t = x0 + 3.0 * torch.randn(16, 2, dtype=torch.float64)
    for k in range(8):
        sig = [torch.full((16,), float(grid[2 * k + j]), dtype=torch.float64) for j in range(3)]
        torch.testing.assert_close(pd.pd_target(teacher, x_t, *sig), x0.expand(16, 2), rtol=0, atol=1e-7)


def test_o10_grids_and_the_halving_chain():
    # O10: for N(0,1) data on the ±20 cosine schedule DDIM multiplies z_1 by 0.500023 (N=2), 0.728567 (N=4).
    teacher = Gaussian([0.0], 1.0)
    z = torch.ones(1, 1, dtype=torch.float64)
    for n, factor in ((2, 0.500023), (4, 0.728567)):
        out = sample_euler(teacher, z, pd.pd_sigmas(n, "cosine"))
        assert float(out) == pytest.approx(factor, abs=2e-6)
    # The 1-step target from the 2-step teacher reproduces the teacher's 2-step map exactly.
    grid = pd.pd_sigmas(2, "cosine")
    sig = [grid[j].reshape(1) for j in range(3)]
    x_tilde = pd.pd_target(teacher, z * grid[0], *sig)
    assert float(x_tilde) == pytest.approx(float(sample_euler(teacher, z, grid)), abs=1e-12)
    # Karras grids are nested: the student's grid is every other level of the teacher's.
    for n in (1, 2, 8):
        k = pd.pd_sigmas(n, "karras")
        assert len(k) == n + 1 and k[0] == 80.0 and k[-1] == 0 and bool((k[1:] < k[:-1]).all())
        torch.testing.assert_close(pd.pd_sigmas(2 * n, "karras")[::2], k, rtol=1e-12, atol=0)
    # Level u = 1/64 of a 64-step grid: Karras et al.'s interpolation 63/64 of the way to sigma_min.
    expected = (80 ** (1 / 7) + (63 / 64) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(pd.pd_sigmas(64, "karras")[-2]) == pytest.approx(expected, rel=1e-12)


class TableStudent(Denoiser):
    """An affine-per-level denoiser D(x; sigma_k) = a_k x + b_k (the exact PD student for Gaussian data)."""

    def __init__(self, sigmas, a, b):
        super().__init__((1,))
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float64))
        self.a = torch.nn.Parameter(torch.as_tensor(a, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.as_tensor(b, dtype=torch.float64))

    def denoise(self, x, sigma, cond):
        k = (self.sigmas[None] - sigma.double()[:, None]).abs().argmin(1)
        return (self.a[k][:, None] * x + self.b[k][:, None]).to(x.dtype)


def test_o14_the_exact_affine_student_has_zero_loss():
    teacher = Gaussian([MU], math.sqrt(VAR))
    method = pd.ProgressiveDistillation(teacher, _cfg(start_steps=8, end_steps=1),
                                        student=TableStudent([1.0], [0.0], [0.0]))
    t_grid, s_grid = method.grids()
    a, b = [], []
    for k in range(4):
        sig = [t_grid[2 * k + j].reshape(1) for j in range(3)]
        f0 = pd.pd_target(teacher, torch.zeros(1, 1, dtype=torch.float64), *sig)
        f1 = pd.pd_target(teacher, torch.ones(1, 1, dtype=torch.float64), *sig)
        a.append(float(f1 - f0))
        b.append(float(f0))
    exact = TableStudent(s_grid[:-1], a, b)
    method.student = exact
    torch.manual_seed(0)
    x = teacher.sample(256).double()
    out = method.student_loss(Batch(size=256, device=torch.device("cpu"), x=x))
    assert float(out["loss"].detach()) < 1e-20
    with torch.no_grad():
        exact.b += 0.01
    perturbed = method.student_loss(Batch(size=256, device=torch.device("cpu"), x=x))["loss"]
    assert float(perturbed.detach()) > 1e-5
    # The weighting is max(SNR, 1) per example (snr_trunc).
    s = torch.tensor([0.1, 1.0, 3.0])
    torch.testing.assert_close(param.snr_weight(s), torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64))


def test_round_start_copy_and_boundaries():
    teacher = ring8()
    method = pd.ProgressiveDistillation(teacher, pd.PDConfig(start_steps=8, end_steps=2, round_kimg=1.0))
    assert method.n_rounds == 2 and method.student_steps() == 4 and method.round_teacher() is teacher
    assert method.groups()["student"].optim.decay_kimg == 1.0       # the linear decay ends with the round
    # round r starts at the first step whose image count reaches r * 1000: ceil(1000 r / batch)
    assert method.round_starts(64) == [16, 32] and method.round_starts(100) == [10, 20]
    assert method.round_starts(3000) == [1, 1]                       # a round shorter than a batch: no step
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.1)
    method.loss_sum += torch.tensor([3.0, 2.0], dtype=torch.float64)
    method.start_round(1)
    assert method.round == 1 and method.student_steps() == 2 and method.round_teacher() is method.prev
    assert method.loss_sum.tolist() == [0.0, 0.0]
    for p, q in zip(method.prev.parameters(), method.student.parameters()):
        assert torch.equal(p, q) and p is not q and not p.requires_grad
    net, recipe = method.export()
    assert recipe == {"sampler": "euler", "sigmas": pd.pd_sigmas(2, "karras").tolist()}


def _two_rounds(out, **kw):
    """A PD method of two rounds of 4 steps (8 -> 4 -> 2 on the ring, batch 64) and its loop settings."""
    from diffdistill.train.loop import TrainConfig

    torch.manual_seed(0)
    method = pd.ProgressiveDistillation(ring8(), pd.PDConfig(start_steps=8, end_steps=2, round_kimg=0.25, lr=2e-3,
                                                             student_preset="mlp-tiny"))
    cfg = TrainConfig(**{**dict(out=str(out), total_kimg=0.5, batch=64, ema_halflife_kimg=0, checkpoint_kimg=0.128,
                                tick_kimg=0.064, progress=False, tensorboard=False, device="cpu"), **kw})
    return method, cfg


def _same_run(a, b, table=True):
    """The two runs' final checkpoints (weights, optimiser), snapshots and round tables are identical."""
    from diffdistill.train import checkpoint as ckpt

    ta, tb = ckpt.load_latest(a)[0], ckpt.load_latest(b)[0]
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    for name in ("round-04steps", "model"):
        sa, sb = io.load_snapshot(a / name)[0].state_dict(), io.load_snapshot(b / name)[0].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert not table or (a / "rounds.json").read_text() == (b / "rounds.json").read_text()


def test_the_driver_is_one_loop_call_per_round(tmp_path):
    """pd.run equals round 1 alone, then round 2 on a new method whose student is round 1's snapshot, continuing
    the run's step and image counts (`Stage`): bit-identical weights and optimiser state. The round table: a row
    per round, its mean loss the mean of the per-step losses in stats.jsonl (a tick every step)."""
    from diffdistill.data import open_dataset
    from diffdistill.train.loop import Stage, train

    data = open_dataset("toy:ring8")
    method, cfg = _two_rounds(tmp_path / "driver")
    result = pd.run(method, cfg, data)
    assert result["step"] == 8 and result["model"] and method.round == 1
    first, cfg2 = _two_rounds(tmp_path / "parts")
    first.start_round(0)
    stage = Stage(end=4, export="round-04steps")
    train(first, cfg2, data, stage=stage)
    student = io.load_snapshot(tmp_path / "parts" / "round-04steps")[0]
    second = pd.ProgressiveDistillation(ring8(), first.cfg, student=student)
    second.start_round(1)
    train(second, cfg2, data, stage=Stage(after=stage))
    _same_run(tmp_path / "driver", tmp_path / "parts", table=False)
    rows = json.loads((tmp_path / "driver" / "rounds.json").read_text())
    stats = (tmp_path / "driver" / "stats.jsonl").read_text().splitlines()
    losses = [json.loads(line)["student/loss"] for line in stats]
    assert len(losses) == 8
    assert [{k: v for k, v in r.items() if k != "mean_loss"} for r in rows] == [
        dict(round=1, teacher_steps=8, student_steps=4, start_kimg=0.0, end_kimg=0.256, snapshot="round-04steps"),
        dict(round=2, teacher_steps=4, student_steps=2, start_kimg=0.256, end_kimg=0.512, snapshot="round-02steps")]
    assert [r["mean_loss"] for r in rows] == pytest.approx([np.mean(losses[:4]), np.mean(losses[4:])], rel=1e-12)
    assert "| 2 | 4 | 2 | 0.256-0.512 |" in (tmp_path / "driver" / "rounds.md").read_text()


def test_export_writes_nothing(tmp_path, monkeypatch):
    """export() has no side effects (it used to write the last round's row of the table, which then stayed as the
    first evaluation or grid of that round left it): the run directory and the working directory are unchanged."""
    from diffdistill.data import open_dataset

    method, cfg = _two_rounds(tmp_path / "run")
    pd.run(method, cfg, open_dataset("toy:ring8"))
    monkeypatch.chdir(tmp_path)

    def tree():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")}

    before = tree()
    for _ in range(2):
        assert method.export()[1]["sampler"] == "euler"
    assert tree() == before


def test_a_run_stopped_in_round_2_resumes_bit_identically(tmp_path, monkeypatch):
    """Stopped by SIGINT inside round 2 (RUN/latest, the run's result says interrupted), or killed after round 1's
    last checkpoint but before its snapshot: the same call again ends as the uninterrupted run, bit for bit."""
    import os
    import signal

    from diffdistill.data import open_dataset

    data = open_dataset("toy:ring8")
    pd.run(*_two_rounds(tmp_path / "ref"), data)
    loss = pd.ProgressiveDistillation.student_loss

    def sigint_at_step_5(self, batch):
        if batch.step == 5 and not sigint_at_step_5.sent:
            sigint_at_step_5.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, batch)

    sigint_at_step_5.sent = False
    monkeypatch.setattr(pd.ProgressiveDistillation, "student_loss", sigint_at_step_5)
    result = pd.run(*_two_rounds(tmp_path / "int"), data)
    assert result["interrupted"] and result["step"] == 6 and (tmp_path / "int" / "latest" / "model.json").is_file()
    assert [r["round"] for r in json.loads((tmp_path / "int" / "rounds.json").read_text())] == [1]
    assert not pd.run(*_two_rounds(tmp_path / "int"), data)["interrupted"]
    _same_run(tmp_path / "ref", tmp_path / "int")
    assert not (tmp_path / "int" / "latest").exists()

    class Killed(Exception):
        pass

    save = io.save_snapshot

    def killed_at_round_1s_snapshot(path, *args, **kw):
        if path.name == "round-04steps":
            raise Killed
        return save(path, *args, **kw)

    monkeypatch.setattr(io, "save_snapshot", killed_at_round_1s_snapshot)
    with pytest.raises(Killed):
        pd.run(*_two_rounds(tmp_path / "kill"), data)
    monkeypatch.setattr(io, "save_snapshot", save)
    assert not (tmp_path / "kill" / "round-04steps").exists()
    pd.run(*_two_rounds(tmp_path / "kill"), data)
    _same_run(tmp_path / "ref", tmp_path / "kill")


class _TwoHeads(torch.nn.Module):
    """A 'both'-output backbone: x head and eps head concatenated along the channel axis (PD's ImageNet model)."""

    def __init__(self):
        super().__init__()
        self.x_head, self.eps_head = mlp_preset("tiny", 2), mlp_preset("tiny", 2)

    def forward(self, z, t, labels):
        return torch.cat([self.x_head(z, t, labels), self.eps_head(z, t, labels)], dim=1)


def test_vp_cosine_teachers_x_v_and_both():
    torch.manual_seed(0)
    x = ring8().sample(32)
    for prediction in ("x", "v", "both"):
        backbone = _TwoHeads() if prediction == "both" else mlp_preset("tiny", 2)
        teacher = Precond(backbone, (2,), 0, PrecondConfig(kind="cosine", prediction=prediction))
        teacher.eval()
        method = pd.ProgressiveDistillation(teacher, _cfg(start_steps=4, end_steps=1))
        assert method.grid == "cosine"
        assert float(method.grids()[0][0]) == pytest.approx(math.exp(10), rel=1e-9)  # alpha_1 = e^-10
        for p, q in zip(method.student.parameters(), teacher.parameters()):
            assert torch.equal(p, q) and p is not q        # a copy of the teacher
        loss = method.student_loss(Batch(size=32, device=torch.device("cpu"), x=x))["loss"]
        loss.backward()
        assert math.isfinite(float(loss.detach()))
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in method.student.parameters())
    eps_teacher = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig(kind="cosine", prediction="eps")).eval()
    with pytest.raises(DiffdistillError, match="alpha_1"):
        pd.ProgressiveDistillation(eps_teacher, _cfg(start_steps=4))


def test_every_eps_teacher_is_refused():
    """§3.1/§3.8: not only cosine-eps; EDM's VP (and VE) preconditioning and DDPM eps checkpoints predict eps too.
    x, v, 'both' and EDM-preconditioned teachers pass."""
    from diffdistill.diffusion.schedules import ddpm_alphas_cumprod
    from diffdistill.teachers.discrete import DiscreteVPDenoiser
    from diffdistill.teachers.guidance import CFGDenoiser

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, z, t, cond):
            return self.lin(z)

    def precond(kind, prediction="eps", label_dim=0):
        return Precond(mlp_preset("tiny", 2, label_dim=label_dim) if label_dim else mlp_preset("tiny", 2), (2,),
                       label_dim, PrecondConfig(kind=kind, prediction=prediction, sigma_max=80.0)).eval()

    refused = {"EDM's VP": precond("vp"), "EDM's VE": precond("ve"), "cosine-schedule eps": precond("cosine"),
               "DDPM eps": DiscreteVPDenoiser(Net(), (2,), ddpm_alphas_cumprod()).eval(),
               "EDM's VP ": CFGDenoiser(precond("vp", label_dim=3), 2.0).eval()}
    for what, teacher in refused.items():
        with pytest.raises(DiffdistillError, match=f"refuses this teacher, .*{what.strip()}.*use such a teacher"):
            pd.ProgressiveDistillation(teacher, _cfg(start_steps=4))
    for teacher in (precond("edm"), precond("cosine", "x"), precond("cosine", "v"),
                    DiscreteVPDenoiser(Net(), (2,), ddpm_alphas_cumprod(), prediction="v_prediction").eval(),
                    DiscreteVPDenoiser(Net(), (2,), ddpm_alphas_cumprod(), prediction="sample").eval()):
        pd.ProgressiveDistillation(teacher, _cfg(start_steps=4))


class _Images:
    """A stand-in for an image data set: building PD reads only its shape."""

    shape, label_dim, name = (3, 8, 8), 0, "images"


def _image_teacher(dropout=0.3):
    from diffdistill.networks.unet import unet_preset

    torch.manual_seed(0)
    net = unet_preset("tiny", 8, 3, dropout=dropout)
    return Precond(net, (3, 8, 8), 0, PrecondConfig(kind="cosine", prediction="x")).eval().requires_grad_(False)


def test_student_dropout_is_zero_unless_asked():
    """The official student is 'same as teacher but with 0 dropout' (cifar_distill.py)."""
    from diffdistill.methods import common

    teacher = _image_teacher(0.3)
    steps = ("--start-steps", "4", "--end-steps", "1")
    method = cli_method("pd", teacher, _Images(), *steps)
    assert common.dropout_of(method.student) == 0.0 and common.dropout_of(method.prev) == 0.0
    assert common.dropout_of(teacher) == pytest.approx(0.3)
    kept = cli_method("pd", teacher, _Images(), *steps, "--student-dropout", "teacher")
    assert common.dropout_of(kept.student) == pytest.approx(0.3)
    assert common.dropout_of(cli_method("pd", teacher, _Images(), *steps, "--student-dropout", "0.1").student) == \
        pytest.approx(0.1)
    # the Python API: the same official 0, and 'teacher' as on the command line
    assert common.dropout_of(pd.ProgressiveDistillation(teacher, _cfg(start_steps=4)).student) == 0.0
    api_kept = pd.ProgressiveDistillation(teacher, _cfg(start_steps=4, student_dropout="teacher"))
    assert common.dropout_of(api_kept.student) == pytest.approx(0.3)


def test_clip_denoised_recipe_is_honoured_by_the_sampler():
    """Images: the exported recipe clips x-hat to [-1, 1] (official eval_clip_denoised=True) and `sample` with it
    equals DDIM with the clipped x-hat and eps recomputed from it (dpm.py: _run_model(clip_x=True))."""
    from diffdistill.samplers import make_noise

    teacher = _image_teacher(0.0)
    with torch.no_grad():                                    # a network whose x-hat leaves [-1, 1]
        w = teacher.backbone.dec["8x8_aux_conv"].weight    # (EDM's init makes the last layer ~1e-5)
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    method = cli_method("pd", teacher, _Images(), "--start-steps", "4", "--end-steps", "1")
    net, recipe = method.export()
    assert recipe["clip_denoised"] is True and recipe["sampler"] == "euler"
    assert "clip_denoised" not in cli_method("pd", teacher, _Images(), "--start-steps", "4", "--end-steps", "1",
                                             "--no-clip-denoised").export()[1]
    assert "clip_denoised" not in pd.ProgressiveDistillation(ring8(), _cfg(start_steps=4)).export()[1]
    assert pd.ProgressiveDistillation(ring8(), _cfg(start_steps=4, clip_denoised=True)).export()[1]["clip_denoised"]
    got = sample(net, [0, 1, 2], sampler=recipe["sampler"], sigmas=recipe["sigmas"],
                 clip_denoised=recipe["clip_denoised"])
    grid = torch.tensor(recipe["sigmas"], dtype=torch.float64)
    x = make_noise([0, 1, 2], (3, 8, 8)).double() * grid[0]
    unclipped_range = 0.0
    for i in range(len(grid) - 1):
        with torch.no_grad():
            d = net(x.float(), float(grid[i])).double()
        unclipped_range = max(unclipped_range, float(d.abs().max()))
        d = d.clamp(-1, 1)
        x = d + grid[i + 1] / grid[i] * (x - d)
    assert unclipped_range > 1.5                             # the clipping acts
    torch.testing.assert_close(got, x.float(), atol=1e-5, rtol=1e-5)
    unclipped = sample(net, [0, 1, 2], sampler="euler", sigmas=recipe["sigmas"])
    assert float((unclipped - got).abs().max()) > 1e-2


def test_pd_ema_restarts_every_round_through_the_loop(tmp_path):
    """--pd-ema with a huge half-life: the EMA exported at the end of a round equals the student's weights at
    that round's start, i.e. it holds nothing of earlier rounds (before the loop restarted the EMA at a group
    reset, every round's EMA was the round-0 initialisation)."""
    from diffdistill.data import open_dataset
    from diffdistill.train.loop import TrainConfig

    torch.manual_seed(0)
    args = parse_distill("pd", "--start-steps", "8", "--end-steps", "2", "--round-kimg", "0.256", "--pd-ema",
                         "--lr", "2e-3", out=str(tmp_path))
    method = method_from_args("pd", args, ring8(), open_dataset("toy:ring8"))
    assert method.ema_targets() == {"student": method.student} and method.cfg.lr == 2e-3
    init = {k: v.clone() for k, v in method.student.state_dict().items()}
    cfg = TrainConfig(out=str(tmp_path), total_kimg=0.512, batch=64, ema_halflife_kimg=1e9, ema_rampup=None,
                      checkpoint_kimg=0, tick_kimg=0.256, progress=False, tensorboard=False, device="cpu")
    pd.run(method, cfg, open_dataset("toy:ring8"))
    round1, _, _ = io.load_snapshot(tmp_path / "round-04steps")
    round2, recipe, _ = io.load_snapshot(tmp_path / "model")
    assert len(recipe["sigmas"]) == 3
    start2 = method.prev.state_dict()                        # the student at the end of round 1
    moved = max(float((start2[k] - init[k]).abs().max()) for k in init)
    assert moved > 1e-3
    for k, v in round1.state_dict().items():
        torch.testing.assert_close(v, init[k], atol=1e-7, rtol=0)        # round 1: its own start
    for k, v in round2.state_dict().items():
        torch.testing.assert_close(v, start2[k], atol=1e-7, rtol=0)      # round 2: round 2's start only


def test_bad_input():
    for start, end in ((6, 1), (4, 8), (4, 4), (0, 1)):
        with pytest.raises(UsageError):
            pd.check_steps(start, end)
    from diffdistill.data import open_dataset

    data = open_dataset("toy:ring8")
    with pytest.raises(UsageError, match="power"):
        cli_method("pd", ring8(), data, "--start-steps", "12", "--kimg", "3")
    with pytest.raises(UsageError, match="needs real training data"):
        cli_method("pd", ring8(), None, "--kimg", "3")
    boundary = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig(kind="boundary"))
    with pytest.raises(DiffdistillError, match="consistency-style"):
        pd.ProgressiveDistillation(boundary, _cfg(start_steps=4))
    method = cli_method("pd", ring8(), data, "--start-steps", "8", "--end-steps", "1", "--kimg", "3")
    assert method.n_rounds == 3 and method.cfg.round_kimg == pytest.approx(1.0)
    with pytest.raises(DiffdistillError, match="needs real data"):
        method.student_loss(Batch(size=4, device=torch.device("cpu")))
    # the settings' own checks (resolve), beside the command line's generic ones: --lr 0 is refused (`build` used to
    # replace it silently by the default 5e-5), as are a non-positive round and a negative clipping norm (which
    # clip_grad_norm_ would turn into a sign flip); --grad-clip 0 turns clipping off
    for options, match in ((("--lr", "0"), "--lr must be positive"), (("--lr=-1e-4",), "--lr must be positive"),
                           (("--round-kimg", "0"), "--round-kimg must be positive"),
                           (("--grad-clip=-1",), "--grad-clip must be positive")):
        with pytest.raises(UsageError, match=match):
            cli_method("pd", ring8(), data, "--start-steps", "4", *options)
    unclipped = cli_method("pd", ring8(), data, "--start-steps", "4", "--grad-clip", "0")
    assert unclipped.cfg.grad_clip is None and unclipped.groups()["student"].optim.grad_clip is None
    # the Python API: the same checks; outside a run the round length must be given
    with pytest.raises(UsageError, match="give round_kimg"):
        pd.ProgressiveDistillation(ring8(), pd.PDConfig(start_steps=4))
    for bad, match in ((dict(weighting="snr2"), "--weighting 'snr2'"), (dict(grid="linear"), "--grid 'linear'"),
                       (dict(student_dropout=1.0), "--student-dropout"), (dict(lr=0.0), "--lr"),
                       (dict(lr=float("nan")), "--lr")):
        with pytest.raises(UsageError, match=match):
            pd.ProgressiveDistillation(ring8(), _cfg(start_steps=4, **bad))


def test_end_to_end_ring8_one_step_student(tmp_path):
    """16 -> 8 -> 4 -> 2 -> 1 steps on the analytic ring: every mode kept (|share - 1/8| < 0.25/8 on 10k).

    A PD student is at best as sharp as the 2N-step DDIM teacher it copies: on ring8 (within 3 std of a mode)
    8-step DDIM gives 0.82, 16-step 0.93, so the chain starts at 16 steps (four rounds of 22.5 kimg: the same
    90 kimg as three rounds from 8)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # tiny ops: threads only add overhead on a shared machine
    try:
        _end_to_end(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _end_to_end(tmp_path):
    from diffdistill.data import open_dataset
    from diffdistill.methods.kd import make_student
    from diffdistill.train.loop import TrainConfig

    torch.manual_seed(0)
    teacher = ring8()
    pcfg = pd.PDConfig(start_steps=16, end_steps=1, round_kimg=22.5, lr=2e-3)
    method = pd.ProgressiveDistillation(teacher, pcfg, make_student(teacher, "mlp-toy"))
    cfg = TrainConfig(out=str(tmp_path), total_kimg=90, batch=64, ema_halflife_kimg=0, checkpoint_kimg=0,
                      tick_kimg=22.5, progress=False, tensorboard=False, device="cpu")
    result = pd.run(method, cfg, open_dataset("toy:ring8"))
    rows = json.loads((tmp_path / "rounds.json").read_text())
    assert [r["student_steps"] for r in rows] == [8, 4, 2, 1]
    fractions = {}
    for name, steps in (("round-08steps", 8), ("round-04steps", 4), ("round-02steps", 2), ("model", 1)):
        den, recipe, _ = io.load_snapshot(tmp_path / name)
        assert recipe["sampler"] == "euler" and len(recipe["sigmas"]) == steps + 1
        x = sample(den, 10_000, sampler=recipe["sampler"], sigmas=recipe["sigmas"], batch=5000)
        mode = teacher.mode_of(x)
        share = torch.bincount(mode, minlength=8).double() / len(x)
        assert float((share - 1 / 8).abs().max()) < 0.25 / 8, (name, share)
        fractions[name] = float((((x.double() - teacher.means[mode]) ** 2).sum(1).sqrt() < 0.3).double().mean())
    x = sample(teacher, 10_000, steps=18, sampler="heun", batch=5000)
    mode = teacher.mode_of(x)
    within = float((((x.double() - teacher.means[mode]) ** 2).sum(1).sqrt() < 0.3).double().mean())
    print(f"\nring8 within 3 std of a mode: teacher heun-35NFE {within:.4f}, PD students {fractions}")
    assert result["model"] is not None
    assert fractions["model"] > 0.7     # measured 0.82 (0.59 from 8 steps without input Fourier features)


@pytest.mark.parametrize("name,start,batch,lr,round_kimg", [("cifar10", 8192, 128, 5e-5, 6400.0),
                                                             ("imagenet64", 1024, 2048, 1e-4, 102400.0)])
def test_official_recipes(name, start, batch, lr, round_kimg):
    """cifar_distill.py / imagenet64_distill.py: 50k Adam steps per halving down to 1 step, linear LR decay to 0
    per round, betas (0.9, 0.999), grad clip 1, no EMA, dropout 0, snr_trunc, random flips, x-hat clipped."""
    from diffdistill.cli import distill as cli_distill
    from diffdistill.cli.main import build_parser
    from diffdistill.methods import common

    teacher = _image_teacher(0.3)
    argv = ["distill", "pd", "--teacher", "t", "--out", "unused", "--data", "d", "--recipe", name]
    args = build_parser().parse_args(argv)
    args.argv = argv
    args = cli_distill.with_recipe(args, teacher)
    assert (args.batch, args.lr, args.kimg, args.round_kimg) == (batch, lr, round_kimg * math.log2(start), round_kimg)
    assert round_kimg == 50_000 * batch / 1000 and args.xflip and args.ema is None and not args.pd_ema
    method = method_from_args("pd", args, teacher, _Images())
    c = method.cfg
    assert (c.start_steps, c.end_steps, c.betas, c.grad_clip, c.weighting) == (start, 1, (0.9, 0.999), 1.0,
                                                                             "snr_trunc")
    assert method.grid == "cosine" and method.ema_targets() == {} and common.dropout_of(method.student) == 0.0
    assert method.export()[1]["clip_denoised"] is True
    optim = method.groups()["student"].optim
    assert (optim.lr, optim.decay, optim.warmup_kimg, optim.weight_decay) == (lr, "linear", 0.0, 0.0)
    assert optim.decay_kimg == round_kimg


class _VNet(torch.nn.Module):
    """A tiny network on DDPM's discrete timesteps: model(z, t, cond) -> v."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def forward(self, z, t, cond=None):
        return self.net(torch.cat([z, t.reshape(-1, 1).to(z.dtype) / 1000], dim=1))


def test_cosine_grid_for_discrete_cosine_teachers():
    """A diffusers/DDPM v-teacher with the iDDPM cosine schedule (squaredcos_cap_v2) gets the cosine grid over its
    own logSNR range, which visits its timesteps uniformly; other schedules keep Karras and refuse 'cosine'."""
    from diffdistill.diffusion.schedules import ddpm_alphas_cumprod
    from diffdistill.teachers.discrete import DiscreteVPDenoiser

    torch.manual_seed(0)
    abar = ddpm_alphas_cumprod(1000, kind="squaredcos_cap_v2")
    teacher = DiscreteVPDenoiser(_VNet(), (2,), abar, prediction="v_prediction").eval()
    lo, hi = math.log(abar[-1] / (1 - abar[-1])), math.log(abar[0] / (1 - abar[0]))
    for grid in ("auto", "cosine"):
        method = pd.ProgressiveDistillation(teacher, _cfg(start_steps=8, end_steps=1, grid=grid))
        assert method.grid == "cosine"
        t_grid, s_grid = method.grids()
        # closed form: sigma(u) = tan(a u + b), the angle affine from atan(sigma_0) (u = 0) to atan(sigma_999) (u = 1)
        b, a = math.atan(math.exp(-hi / 2)), math.atan(math.exp(-lo / 2)) - math.atan(math.exp(-hi / 2))
        u = torch.arange(8, 0, -1, dtype=torch.float64) / 8
        torch.testing.assert_close(t_grid[:-1], torch.tan(a * u + b), rtol=1e-9, atol=0)
        assert float(t_grid[0]) == pytest.approx(teacher.sigma_max, rel=1e-9)
        # the teacher's own timesteps, uniformly: 999 u within 1% of T (the cap on beta and abar_0 < 1 aside)
        ts = teacher.timestep(t_grid[:-1])
        assert float((ts - 999 * u).abs().max()) < 10
        loss = method.student_loss(Batch(size=16, device=torch.device("cpu"), x=ring8().sample(16)))["loss"]
        assert math.isfinite(float(loss.detach()))
    # Karras on the same teacher would put most of the grid at low timesteps
    karras = pd.pd_sigmas(8, "karras", teacher.sigma_min, teacher.sigma_max)
    assert float((teacher.timestep(karras[:-1]) - 999 * u).abs().max()) > 100
    linear = DiscreteVPDenoiser(_VNet(), (2,), ddpm_alphas_cumprod(1000), prediction="v_prediction").eval()
    assert pd.ProgressiveDistillation(linear, _cfg(start_steps=4, end_steps=1)).grid == "karras"
    with pytest.raises(DiffdistillError, match="squaredcos_cap_v2"):
        pd.ProgressiveDistillation(linear, _cfg(start_steps=4, end_steps=1, grid="cosine"))


def test_cosine_grid_for_a_diffusers_cosine_teacher(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from diffdistill.teachers import load_teacher

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8)
    unet.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    sched.save_pretrained(tmp_path / "scheduler")
    teacher = load_teacher(tmp_path)
    method = pd.ProgressiveDistillation(teacher, _cfg(start_steps=4, end_steps=1))
    abar = sched.alphas_cumprod.double()         # diffusers' own table
    lo, hi = (float(torch.log(abar[i] / (1 - abar[i]))) for i in (-1, 0))
    assert method.grid == "cosine"
    torch.testing.assert_close(method.grids()[0], pd.pd_sigmas(4, "cosine", logsnr_range=(lo, hi)), rtol=1e-5, atol=0)


def test_python_api_defaults_are_the_command_lines():
    """PDConfig() resolved for a run equals the parsed `distill pd` defaults resolved for it, for an analytic and a
    network teacher: the round length is the run's --kimg split over the rounds (before, the Python default was
    6400 kimg whatever the run), x-hat clipping is on for images only; resolving again changes nothing."""
    from diffdistill.api import distill_loop
    from diffdistill.methods import get
    from diffdistill.methods.options import config_from_namespace

    spec = get("pd")
    assert spec.config is pd.PDConfig and spec.needs_data and spec.title == "progressive distillation"
    for teacher, kimg, clip in ((ring8(), 30.0, False), (_image_teacher(0.3), 100.0, True)):
        argv = () if kimg == 100.0 else ("--kimg", f"{kimg:g}")     # 100 kimg: distill's default run length
        args = parse_distill("pd", *argv)
        loop = distill_loop(out="unused", total_kimg=args.kimg, batch=args.batch)
        api = spec.config().resolve(teacher, loop)
        cli = config_from_namespace(spec.config, args).resolve(teacher, loop)
        assert api == cli
        assert (api.start_steps, api.end_steps, api.round_kimg) == (1024, 1, kimg / 10)    # 10 halvings
        assert (api.lr, api.betas, api.grad_clip, api.student_dropout, api.pd_ema, api.clip_denoised) == \
            (5e-5, (0.9, 0.999), 1.0, 0.0, False, clip)
        assert api.resolve(teacher, loop) == api and api.resolve(teacher, None) == api
    # the method keeps the resolved settings it was built with
    args = parse_distill("pd", "--start-steps", "4", "--kimg", "2", "--student-preset", "mlp-tiny", out="runs/x")
    from diffdistill.data import open_dataset

    method = method_from_args("pd", args, ring8(), open_dataset("toy:ring8"))
    assert method.cfg.round_kimg == 1.0 and method.n_rounds == 2
    tiny, toy = (sum(p.numel() for p in mlp_preset(name, 2).parameters()) for name in ("tiny", "toy"))
    assert tiny != toy and sum(p.numel() for p in method.student.parameters()) == tiny     # --student-preset


def test_distill_api_matches_the_cli_bit_for_bit(tmp_path, capsys):
    """`diffdistill distill pd ...` and `diffdistill.distill("pd", ...)` train the same students, each run with its
    own round table (the directory comes from the run's loop)."""
    from diffdistill.api import distill, distill_loop
    from tests.cli_util import run_cli

    code, _, err = run_cli(capsys, "distill", "pd", "--teacher", "toy:ring8", "--data", "toy:ring8", "--out",
                           tmp_path / "cli", "--kimg", "0.256", "--batch", "64", "--start-steps", "4",
                           "--student-preset", "mlp-tiny", "--lr", "2e-3", "--no-progress", "--device", "cpu",
                           "--grid-kimg", "0")
    assert code == 0, err
    run = distill("pd", "toy:ring8", data="toy:ring8", loop=distill_loop(out=str(tmp_path / "api"), total_kimg=0.256,
                                                                         batch=64, progress=False, device="cpu",
                                                                         final_grid=False),
                  start_steps=4, student_preset="mlp-tiny", lr=2e-3)
    assert run.config.round_kimg == 0.128 and not run.interrupted
    for name in ("round-02steps", "model"):
        a, b = io.load_snapshot(tmp_path / "cli" / name)[0], io.load_snapshot(tmp_path / "api" / name)[0]
        assert a.sampling == b.sampling
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())), name
    rows = [json.loads((tmp_path / d / "rounds.json").read_text()) for d in ("cli", "api")]
    assert rows[0] == rows[1] and [r["student_steps"] for r in rows[0]] == [2, 1]


def test_an_evaluation_every_round_length_scores_each_rounds_student_at_its_end(tmp_path):
    """eval_kimg = round_kimg (the converged benchmark's PD curve): one evaluation per round, on the round's last
    step, of that round's student (its own steps), and nothing else; the weights are those of a run without it."""
    from diffdistill.data import open_dataset

    seen = []

    def evaluate(method, ema, nimg):
        seen.append((nimg, len(method.export()[1]["sigmas"]) - 1, method.round))
        return {}

    data = open_dataset("toy:ring8")
    pd.run(*_two_rounds(tmp_path / "eval", eval_kimg=0.25), data, evaluate)
    assert seen == [(256, 4, 0), (512, 2, 1)]
    pd.run(*_two_rounds(tmp_path / "plain"), data)
    _same_run(tmp_path / "eval", tmp_path / "plain", table=False)
