"""Knowledge distillation, Denoising Student (diffdistill.methods.kd; algorithms.md §2, oracles O11, O15)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffdistill import io
from diffdistill.api import distill_loop, own_evaluation
from diffdistill.cli import distill as cli_distill
from diffdistill.data import pairs as P
from diffdistill.diffusion.denoiser import Denoiser, Precond, PrecondConfig
from diffdistill.diffusion.schedules import ddpm_alphas_cumprod, sigmas_from_alphas_cumprod, vp_sigma_inv
from diffdistill.errors import DiffdistillError, UsageError
from diffdistill.methods import common, kd
from diffdistill.methods import kd_pairs as KP
from diffdistill.methods.base import Batch
from diffdistill.methods.options import config_from_namespace
from diffdistill.networks.mlp import mlp_preset
from diffdistill.samplers import sample, sample_onestep
from diffdistill.teachers.analytic import Gaussian, GaussianMixture, ring8
from diffdistill.train.ema import ema_beta
from diffdistill.train.loop import TrainConfig
from tests.cli_util import method_from_args, parse_distill

MU, VAR = 0.3, 0.25


def quiet(out, **kw) -> TrainConfig:
    return TrainConfig(out=str(out), checkpoint_kimg=0, progress=False, tensorboard=False, device="cpu", **kw)


def pairs_batch(pairs: P.PairsDataset, indices) -> dict[str, torch.Tensor]:
    """Items `indices` of a pairs data set stacked field by field, as the loop's DataLoader hands them over."""
    return torch.utils.data.default_collate([pairs[i] for i in indices])


def vp_ddim_map(z_T: float) -> float:
    """Independent oracle: the Denoising Student DDIM chain (quadratic 100 steps from index 800, abar form of
    §1.5) for N(MU, VAR) data with the exact posterior mean."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    seq = list((np.linspace(0, np.sqrt(800), 100) ** 2).astype(int))
    z = z_T
    for i, j in zip(reversed(seq), reversed([-1] + seq[:-1])):
        a, ap = abar[i], (abar[j] if j >= 0 else 1.0)
        x_hat = MU + np.sqrt(a) * VAR / (a * VAR + 1 - a) * (z - np.sqrt(a) * MU)
        eps = (z - np.sqrt(a) * x_hat) / np.sqrt(1 - a)
        z = np.sqrt(ap) * x_hat + np.sqrt(1 - ap) * eps
    return z


class AffineStudent(Denoiser):
    """D(x; sigma) = b + a x / sigma, so the one-step student z -> D(sigma z; sigma) = a z + b is affine."""

    def __init__(self, sigma_max: float):
        super().__init__((1,), sigma_max=sigma_max)
        self.a = torch.nn.Parameter(torch.tensor(0.0))
        self.b = torch.nn.Parameter(torch.tensor(0.0))

    def denoise(self, x, sigma, cond):
        return self.b + self.a * x / sigma[:, None]

    def config(self):
        return {"type": "test-affine", "sigma_max": self.sigma_max}


io.register_builder("test-affine")(lambda cfg: AffineStudent(cfg["sigma_max"]))   # snapshots of it load again


def test_o15_regression_optimum_is_the_teachers_affine_ddim_map(tmp_path):
    teacher = Gaussian([MU], VAR**0.5)
    teacher.discrete_sigmas = sigmas_from_alphas_cumprod(ddpm_alphas_cumprod())
    b_star = vp_ddim_map(0.0)
    a_star = vp_ddim_map(1.0) - b_star
    assert vp_ddim_map(2.0) == pytest.approx(2 * a_star + b_star, abs=1e-12)   # affine indeed
    root = tmp_path / "pairs"
    m = KP.generate_pairs(teacher, root, KP.PairsConfig(n_pairs=4000, heldout=500, shard_size=2000), progress=False)
    assert m["recipe"]["name"] == "ddim-quad"
    every = pairs_batch(P.PairsDataset(root, m), range(4000))
    z, y = every["noise"], every["target"]
    slope, intercept = np.polyfit(z[:, 0].double().numpy(), y[:, 0].double().numpy(), 1)
    assert slope == pytest.approx(a_star, abs=2e-3) and intercept == pytest.approx(b_star, abs=2e-3)
    # The KD method (L2) trained through the loop converges to that map.
    method = kd.KnowledgeDistillation(AffineStudent(157.4), root, kd.KDConfig(loss="l2", lr=0.05, warmup_kimg=0),
                                      manifest=m)
    kd.train_on_pairs(method, quiet(tmp_path / "run", total_kimg=64, batch=128, ema_halflife_kimg=0, tick_kimg=64),
                      evaluate=own_evaluation)
    a, b = float(method.student.a.detach()), float(method.student.b.detach())
    assert a == pytest.approx(a_star, abs=1e-2) and b == pytest.approx(b_star, abs=1e-2), (a, b, a_star, b_star)
    # The loss at the exact map is the fp16 storage floor, below that of a perturbed map.
    held = P.read_heldout(root, m)
    exact = kd.regression_loss(a_star * held[0] + b_star, held[1], "l2")
    assert float(exact) < 1e-6 < float(kd.regression_loss((a_star + 0.01) * held[0] + b_star, held[1], "l2"))


def test_loss_is_the_paper_reduction_on_the_batch_pairs(tmp_path):
    pred = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    target = torch.zeros(2, 2)
    assert float(kd.regression_loss(pred, target, "l1")) == pytest.approx((3 + 0.5) / 2)
    assert float(kd.regression_loss(pred, target, "l2")) == pytest.approx((5 + 0.25) / 2)
    root = tmp_path / "p"
    m = KP.generate_pairs(ring8(), root, KP.PairsConfig(n_pairs=300, heldout=50, shard_size=100, steps=3, batch=64),
                         progress=False)
    method = kd.KnowledgeDistillation(kd.make_student(ring8(), "mlp-tiny"), root, kd.KDConfig(), manifest=m)
    fields = pairs_batch(method.pairs, range(40, 72))
    out = method.student_loss(Batch(size=32, device=torch.device("cpu"), fields=fields))
    out["loss"].backward()
    with torch.no_grad():
        ref = kd.regression_loss(common.generate(method.student, fields["noise"], method.sigma), fields["target"], "l1")
    assert float(out["loss"]) == float(ref) and torch.isfinite(out["loss"])
    assert method.groups()["student"].needs_data and not hasattr(method, "cursor")
    net, recipe = method.export()
    assert net is method.student and recipe == {"sampler": "onestep", "sigmas": [80.0, 0.0]}
    assert own_evaluation(method, None, 0)["heldout_loss"] == float(method.best_loss)
    assert method.export()[0] is method.best                 # after an evaluation: the best so far


# --------------------------------------------------------------------------------------------------
# The pairs are the loop's data set: its order, each rank's and micro-batch's slice, resumption


class RecordingKD(kd.KnowledgeDistillation):
    """KD that records the noise of every micro-batch its loss gets, as (step, noise)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def student_loss(self, batch):
        self.seen.append((batch.step, batch.fields["noise"].clone()))
        return super().student_loss(batch)


def _recording_kd(root, m) -> RecordingKD:
    torch.manual_seed(0)
    return RecordingKD(kd.make_student(ring8(), "mlp-tiny"), root, kd.KDConfig(lr=1e-3, warmup_kimg=0), manifest=m)


def _stream(seen_by_rank: list[list], world: int, index_of: dict) -> list[int]:
    """The pair indices the losses saw, in stream order: step by step, micro-batch a of rank r at a * world + r
    (the loop calls the loss once per micro-batch, in order)."""
    out = []
    for step in sorted({s for seen in seen_by_rank for s, _ in seen}):
        micro = [[z for s, z in seen if s == step] for seen in seen_by_rank]
        for a in range(len(micro[0])):
            for r in range(world):
                out += [index_of[tuple(row)] for row in micro[r][a].tolist()]
    return out


def _kd_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import os

    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        method = _recording_kd(root, P.verify_pairs(root))
        kd.train_on_pairs(method, quiet(out, max_steps=5, batch=16, batch_gpu=4, seed=3))
        torch.save(method.seen, f"{out}-seen{rank}.pt")
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_every_training_pair_is_seen_once_per_epoch_on_any_split(tmp_path):
    """40 training pairs (shards of 16, 16, 8; held-out pairs never trained on), batch 16 for 5 steps = 2 epochs,
    the second epoch starting mid-step: one process accumulating 4 micro-batches of 4 (with a DataLoader worker)
    and two gloo processes accumulating 2 each see the same stream, every pair once in each epoch, in a new order
    in the second."""
    import socket

    import torch.multiprocessing as mp

    root = tmp_path / "p"
    m = KP.generate_pairs(ring8(), root, KP.PairsConfig(n_pairs=40, heldout=8, shard_size=16, steps=2), progress=False)
    noise = {s["name"]: P.load_shard(root, m, s["name"])["noise"].float() for s in m["shards"]}
    train_noise = torch.cat([noise[s["name"]] for s in m["shards"] if s["name"] != P.HELDOUT])
    index_of = {tuple(row): i for i, row in enumerate(train_noise.tolist())}
    assert len(index_of) == 40 and not set(map(tuple, noise[P.HELDOUT].tolist())) & set(index_of)
    single = _recording_kd(root, m)
    kd.train_on_pairs(single, quiet(tmp_path / "one", max_steps=5, batch=16, batch_gpu=4, seed=3, workers=1))
    assert [len(z) for _, z in single.seen] == [4] * 20
    stream = _stream([single.seen], 1, index_of)
    assert len(stream) == 80 and sorted(stream[:40]) == sorted(stream[40:]) == list(range(40))
    assert stream[:40] != stream[40:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_kd_worker, args=(2, port, str(root), str(tmp_path / "ddp")), nprocs=2, join=True,
                       start_method="fork")
    seen = [torch.load(tmp_path / f"ddp-seen{r}.pt") for r in range(2)]
    assert [len(z) for _, z in seen[0]] == [4] * 10 and len(seen[1]) == 10
    assert _stream(seen, 2, index_of) == stream


def test_a_steps_loss_is_the_closed_form_loss_of_its_pairs(tmp_path):
    """A fixed affine student (lr 0) z -> 0.7 z - 0.2 on uint8 targets: the loss logged for each step is the mean
    over the step's pairs (positions step * 16 ... of the loop's order: 40 pairs, so step 2 spans two epochs) of
    |0.7 z - 0.2 - y|, with z and y read from the shards on disk and y decoded by hand."""
    from safetensors.torch import load_file

    from diffdistill.train.loop import StreamSampler

    root = tmp_path / "p"
    m = KP.generate_pairs(Gaussian([MU], VAR**0.5), root, KP.PairsConfig(n_pairs=40, heldout=0, shard_size=16,
                          steps=2, sampler="euler", target_dtype="uint8"), progress=False)
    shards = [load_file(P.shard_path(root, s["name"])) for s in m["shards"]]
    z = torch.cat([t["noise"] for t in shards]).double()[:, 0]
    y = torch.cat([t["target"] for t in shards]).double()[:, 0] / 127.5 - 1
    student = AffineStudent(157.4)
    with torch.no_grad():
        student.a.fill_(0.7)
        student.b.fill_(-0.2)
    a, b = float(student.a), float(student.b)                         # 0.7 and -0.2 in float32
    method = kd.KnowledgeDistillation(student, root, kd.KDConfig(loss="l1", lr=0.0, warmup_kimg=0), manifest=m)
    kd.train_on_pairs(method, quiet(tmp_path / "run", max_steps=5, batch=16, batch_gpu=8, seed=5, tick_kimg=0.016,
                                    ema_halflife_kimg=0))
    logged = [r["student/loss"] for r in map(json.loads, (tmp_path / "run" / "stats.jsonl").read_text().splitlines())
              if "student/loss" in r]
    order = iter(StreamSampler(40, 5, 0, 16, 16, 1, 1, 0))             # each step's 16 pairs, all micro-batches
    expected = []
    for _ in range(5):
        i = torch.tensor(next(order))
        expected.append(float((a * z[i] + b - y[i]).abs().mean()))
    assert len(logged) == 5 and logged == pytest.approx(expected, rel=1e-6)
    assert (float(student.a), float(student.b)) == (a, b)                  # lr 0: the student is fixed


def test_a_non_finite_pair_is_named_by_its_index(tmp_path):
    """A pair whose target is NaN (a shard rewritten with a valid checksum) stops the run naming that pair."""
    root = tmp_path / "p"
    m = KP.generate_pairs(ring8(), root, KP.PairsConfig(n_pairs=32, heldout=0, shard_size=16, steps=2), progress=False)
    spec = m["shards"][1]
    tensors = P.load_shard(root, m, spec["name"])
    tensors["target"][5, 1] = float("nan")                                  # pair 16 + 5 = 21
    P.write_shard(root, m, spec, tensors)
    method = kd.KnowledgeDistillation(kd.make_student(ring8(), "mlp-tiny"), root, kd.KDConfig(), manifest=m)
    with pytest.raises(DiffdistillError, match=r"non-finite loss in group 'student'.*items \[21\] of the training "
                                               r"data the data set hold NaN or inf"):
        kd.train_on_pairs(method, quiet(tmp_path / "run", max_steps=2, batch=32, batch_gpu=8))


def test_students():
    teacher = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig()).eval().requires_grad_(False)
    student = kd.make_student(teacher)                       # auto: a copy of the teacher's network
    for p, q in zip(student.parameters(), teacher.parameters()):
        assert torch.equal(p, q) and p is not q and p.requires_grad
    assert student.training
    with pytest.raises(DiffdistillError, match="no network"):
        kd.make_student(ring8(), "teacher")
    with pytest.raises(DiffdistillError, match="unknown student preset"):
        kd.make_student(ring8(), "resnet")
    assert isinstance(kd.make_student(ring8(), "auto"), Precond)


def _pairs_args(*argv):
    """`diffdistill kd-pairs --teacher t ARGV` parsed."""
    from diffdistill.cli.main import build_parser

    return build_parser().parse_args(["kd-pairs", "--teacher", "t", *argv])


def test_cli_hooks_and_refusals(tmp_path, capsys):
    argv = ["--n-pairs", "200", "--heldout", "40", "--shard-size", "100", "--pairs-steps", "3"]
    args = _pairs_args("--pairs", str(tmp_path / "p"), *argv)
    assert kd.run_pairs(args, ring8()) == 0
    assert "200 training + 40 held-out pairs" in capsys.readouterr().out
    args = parse_distill("kd", "--pairs", str(tmp_path / "p"), "--loss", "l2", "--student-preset", "mlp-tiny",
                         "--lr", "1e-3", *argv, out=str(tmp_path / "run"))
    method = method_from_args("kd", args, ring8())
    assert method.cfg.loss == "l2" and method.cfg.lr == 1e-3 and kd.SPEC.needs_data is False
    other = GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [0.1, 0.1])
    with pytest.raises(DiffdistillError, match="different teacher"):
        method_from_args("kd", args, other)
    args.pairs = None                                        # default: RUN-pairs
    method_from_args("kd", args, ring8())
    assert (tmp_path / "run-pairs" / "pairs.json").is_file()


def test_end_to_end_ring8_one_step_student(tmp_path):
    """A one-step KD student of toy:ring8 keeps every mode (|share - 1/8| < 0.25/8 on 10k samples)."""
    torch.manual_seed(0)
    teacher = ring8()
    root = tmp_path / "pairs"
    m = KP.generate_pairs(teacher, root, KP.PairsConfig(n_pairs=20_000, heldout=2000, shard_size=10_000,
                                                      batch=2048), progress=False)
    assert m["recipe"]["name"] == "heun" and len(m["recipe"]["sigmas"]) == 19      # 35 NFE
    method = kd.KnowledgeDistillation(kd.make_student(teacher, "mlp-toy"), root,
                                      kd.KDConfig(loss="l2", lr=2e-3, warmup_kimg=10), manifest=m)
    result = kd.SPEC.run(method, quiet(tmp_path / "run", total_kimg=100, batch=256, ema_halflife_kimg=10,
                                       eval_kimg=25, best_metric=kd.SPEC.best_metric, tick_kimg=25),
                         None, own_evaluation)
    evals = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    losses = [r["eval/heldout_loss"] for r in evals if "eval/heldout_loss" in r]
    assert len(losses) == 4 and float(method.best_loss) == pytest.approx(min(losses))
    student, recipe, _ = io.load_snapshot(result["model"])
    assert recipe == {"sampler": "onestep", "sigmas": [80.0, 0.0]}
    assert method.heldout_loss(student) == pytest.approx(min(losses), rel=1e-5)   # RUN/model = the best EMA
    x = sample(student, 10_000, sampler=recipe["sampler"], sigmas=recipe["sigmas"], batch=5000)
    mode = teacher.mode_of(x)
    share = torch.bincount(mode, minlength=8).double() / len(x)
    assert float((share - 1 / 8).abs().max()) < 0.25 / 8, share
    within = float((((x.double() - teacher.means[mode]) ** 2).sum(1).sqrt() < 0.3).double().mean())
    xt = sample(teacher, 10_000, steps=18, sampler="heun", batch=5000)
    mt = teacher.mode_of(xt)
    within_t = float((((xt.double() - teacher.means[mt]) ** 2).sum(1).sqrt() < 0.3).double().mean())
    print(f"\nring8 within 3 std of a mode: teacher heun-35NFE {within_t:.4f}, KD student {within:.4f}")
    assert within > 0.8          # measured 0.91 (0.82 before the MLP's input Fourier features)


# --------------------------------------------------------------------------------------------------
# The paper's student for eps teachers (official models.py: Onestep_Model), dropout, EMA, recipes


def ddpm_eps_teacher(dropout: float = 0.0):
    """A tiny random diffusers UNet2DModel on DDPM's linear schedule, predicting eps (T = 1000)."""
    from tests.test_cd import tiny_ddpm_teacher

    return tiny_ddpm_teacher(dropout)


SMALL_PAIRS = dict(n_pairs=8, heldout=4, shard_size=8, steps=2, batch=8)


def test_ddpm_eps_student_is_the_papers_g_with_its_gradient_scale(tmp_path):
    """G(z) = z - F(z, 999) on the pairs' unit noise, trained with the paper's gradient, exported and reloaded."""
    teacher = ddpm_eps_teacher()
    m = KP.generate_pairs(teacher, tmp_path / "p", KP.PairsConfig(**SMALL_PAIRS), progress=False)
    assert m["recipe"]["name"] == "ddim-quad"
    method = kd.KnowledgeDistillation(kd.make_student(teacher), tmp_path / "p", kd.KDConfig(), manifest=m)
    assert isinstance(method.student, kd.PaperStudent)
    assert method.sigma == teacher.sigma_max == float(teacher.discrete_sigmas[-1])      # t_max = 999
    unet = method.student.net.model
    fields = pairs_batch(method.pairs, range(8))
    z, y = fields["noise"], fields["target"]
    params = list(unet.parameters())

    def paper_g():  # the reference: the UNet itself, fed z at timestep 999, subtracted from z
        return z - unet(z, torch.full((8,), 999.0)).sample

    with torch.no_grad():
        ref = paper_g()
        assert float((common.generate(method.student, z, method.sigma) - ref).abs().max()) < 1e-5
        net, recipe = method.export()
        assert float((sample_onestep(net, z, recipe["sigmas"]) - ref).abs().max()) < 1e-5
    # The gradient of the method's loss is the paper's (old code: D(sigma_max z; sigma_max), 157x the output).
    loss = method.student_loss(Batch(size=8, device=torch.device("cpu"), fields=fields))["loss"]
    grads = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    ref_loss = kd.regression_loss(paper_g(), y, "l1")
    ref_grads = torch.cat([g.flatten() for g in torch.autograd.grad(ref_loss, params)])
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert float((grads - ref_grads).norm() / ref_grads.norm()) < 1e-5        # measured 9e-7 (old code: 236x)
    # The exported student saves and loads as a snapshot, unchanged.
    io.save_snapshot(tmp_path / "snap", net, recipe)
    again, recipe2, _ = io.load_snapshot(tmp_path / "snap")
    assert isinstance(again, kd.PaperStudent) and recipe2 == recipe == {"sampler": "onestep",
                                                                       "sigmas": [method.sigma, 0.0]}
    with torch.no_grad():
        assert torch.equal(sample_onestep(again, z, recipe2["sigmas"]), sample_onestep(net, z, recipe["sigmas"]))


def test_vp_eps_students_are_wrapped_and_others_are_not(tmp_path):
    """EDM's VPPrecond (eps, sigma_max 80): G(u) = u - F(u, 999 t(80)); an EDM-preconditioned student stays
    D(sigma z; sigma)."""
    torch.manual_seed(0)
    vp = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig(kind="vp", sigma_max=80.0))
    student = kd.PaperStudent(vp, 80.0)
    u = torch.randn(16, 2)
    with torch.no_grad():
        ref = u - vp.backbone(u, 999 * vp_sigma_inv(torch.full((16,), 80.0)), None)
        assert float((common.generate(student, u, 80.0) - ref).abs().max()) < 1e-5
    root = tmp_path / "p"
    m = KP.generate_pairs(ring8(), root, KP.PairsConfig(n_pairs=16, heldout=0, shard_size=16, steps=2),
                         progress=False)
    assert isinstance(kd.KnowledgeDistillation(vp, root, manifest=m).student, kd.PaperStudent)
    edm = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig())
    assert kd.KnowledgeDistillation(edm, root, manifest=m).student is edm
    assert kd.is_vp_eps(vp) and not kd.is_vp_eps(edm) and not kd.is_vp_eps(ring8())
    with pytest.raises(DiffdistillError, match="eps-prediction VP"):
        kd.PaperStudent(edm, 80.0)


def _kd_args(tmp_path, *extra):
    return parse_distill("kd", "--pairs", str(tmp_path / "p"), "--n-pairs", "8", "--heldout", "0", "--shard-size",
                         "8", "--pairs-steps", "2", *extra, out=str(tmp_path / "run"))


def test_student_has_no_dropout_by_default(tmp_path):
    """The official student has no dropout: a copy of a teacher with dropout 0.1 trains without it."""
    teacher = ddpm_eps_teacher(dropout=0.1)
    assert common.dropout_of(teacher) == pytest.approx(0.1)
    x = torch.randn(2, *teacher.shape)

    def two_passes(net):
        with torch.no_grad():
            return net(80 * x, 80.0), net(80 * x, 80.0)

    method = method_from_args("kd", _kd_args(tmp_path), teacher)
    assert method.student.training and common.dropout_of(method.student) == 0
    a, b = two_passes(method.student)
    assert torch.equal(a, b)
    kept = method_from_args("kd", _kd_args(tmp_path, "--student-dropout", "teacher"), teacher)   # the override
    assert common.dropout_of(kept.student) == pytest.approx(0.1)
    a, b = two_passes(kept.student)
    assert not torch.equal(a, b)
    assert common.dropout_of(kd.make_student(teacher)) == 0


def test_ema_is_the_papers_per_step_decay(tmp_path):
    root = tmp_path / "p"
    m = KP.generate_pairs(ring8(), root, KP.PairsConfig(n_pairs=16, heldout=0, shard_size=16, steps=2),
                         progress=False)
    method = kd.KnowledgeDistillation(kd.make_student(ring8(), "mlp-tiny"), root, manifest=m)
    halflife, rampup = method.ema_default(512)
    assert rampup is None and halflife == pytest.approx(70.80, abs=0.01)
    for nimg in (512, 512 * 10_000):                             # no ramp-up: 0.995 from the first step
        assert ema_beta(512, nimg, halflife, rampup) == pytest.approx(0.995, abs=1e-12)
    lsun = kd.KnowledgeDistillation(kd.make_student(ring8(), "mlp-tiny"), root, kd.KDConfig(ema_decay=0.9995),
                                    manifest=m)
    assert ema_beta(32, 32, *lsun.ema_default(32)) == pytest.approx(0.9995, abs=1e-12)
    with pytest.raises(DiffdistillError, match="EMA decay"):
        kd.KnowledgeDistillation(method.student, root, kd.KDConfig(ema_decay=1.0), manifest=m)


@pytest.mark.parametrize("name, want", [
    ("cifar10", dict(loss="l1", lr=2e-4, betas=(0.9, 0.98), warmup_kimg=2560, batch=512, kimg=25_600,
                     decay=0.995, shard_size=102_400, heldout=51_200, sampler="ddim-quad", steps=100)),
    ("lsun_church", dict(loss="l2", lr=5e-6, betas=(0.98, 0.999), warmup_kimg=32, batch=32, kimg=40_960,
                         decay=0.9995, shard_size=2560, heldout=2560, sampler="ddim-uniform", steps=50)),
])
def test_recipes_are_the_official_settings(tmp_path, name, want):
    """`--recipe` values of official utils.py get_settings: every one reaches the optimiser, EMA and pairs."""
    recipe = kd.RECIPES[name]
    assert "get_settings" in recipe.source and set(kd.RECIPES) == {"cifar10", "celeba", "lsun_church",
                                                                   "lsun_bedroom"}
    teacher = ddpm_eps_teacher()
    args = cli_distill.with_recipe(parse_distill("kd", "--recipe", name), teacher)
    # the student's dropout: KD's default, 0 (the official student has none); the EMA: --ema-decay's, not --ema
    assert (args.kimg, args.batch, args.ema, args.student_dropout) == (want["kimg"], want["batch"], None, 0.0)
    assert (args.n_pairs, args.shard_size, args.heldout) == (1_024_000, want["shard_size"], want["heldout"])
    assert (args.pairs_sampler, args.pairs_steps, args.target_dtype) == (want["sampler"], want["steps"], "uint8")
    # The user's options come after the recipe's and win: a small pairs directory for the test.
    small = ["--pairs", str(tmp_path / "p"), "--n-pairs", "8", "--heldout", "0", "--shard-size", "8",
             "--pairs-steps", "2"]
    args = cli_distill.with_recipe(parse_distill("kd", "--recipe", name, *small, out=str(tmp_path / "run")),
                                   teacher)
    assert (args.kimg, args.n_pairs, args.pairs_steps) == (want["kimg"], 8, 2)
    method = method_from_args("kd", args, teacher)
    oc = method.groups()["student"].optim
    assert (oc.lr, tuple(oc.betas), oc.eps, oc.warmup_kimg) == (want["lr"], want["betas"], 1e-8, want["warmup_kimg"])
    assert method.cfg.loss == want["loss"] and common.dropout_of(method.student) == 0
    assert ema_beta(args.batch, 0, *method.ema_default(args.batch)) == pytest.approx(want["decay"], abs=1e-12)


def test_two_stage_workflow_through_the_cli(tmp_path, capsys):
    """`kd-pairs --n-pairs N` then `distill kd --pairs P` with no pair options (the kd-pairs --help example) trains on
    those pairs without regenerating them, whatever the generation batch; a smaller --n-pairs uses the first pairs."""
    from diffdistill.cli.main import build_parser, main

    pairs, run = tmp_path / "pairs", tmp_path / "run"
    assert main(["kd-pairs", "--teacher", "toy:ring8", "--pairs", str(pairs), "--n-pairs", "64", "--heldout", "16",
                 "--shard-size", "32", "--pairs-steps", "2", "--gen-batch", "16", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "64 training + 16 held-out pairs" in out and "pair" not in err    # --no-progress: no bar
    before = {p.name: p.stat().st_mtime_ns for p in pairs.iterdir()}
    loop = ["--max-steps", "2", "--batch", "16", "--kimg", "0.032", "--no-progress"]
    assert main(["distill", "kd", "--teacher", "toy:ring8", "--pairs", str(pairs), "--out", str(run), *loop]) == 0
    assert "kd: 64 pairs" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in pairs.iterdir()} == before   # reused, not remade
    assert main(["distill", "kd", "--teacher", "toy:ring8", "--pairs", str(pairs), "--out", str(tmp_path / "r2"),
                 "--n-pairs", "40", *loop]) == 0
    assert "kd: 40 pairs" in capsys.readouterr().out
    assert main(["kd-pairs", "--teacher", "toy:ring8", "--pairs", str(pairs), "--seed", "1", "--pairs-seed", "5",
                 "--no-progress"]) == 1
    assert "other settings (seed 0, asked 5)" in capsys.readouterr().err
    # The examples of `kd-pairs --help` are commands of this CLI.
    parser = build_parser()
    epilog = parser._subparsers._group_actions[0].choices["kd-pairs"].epilog
    commands = [c.split("diffdistill", 1)[1].split() for c in epilog.replace("\\\n", "").splitlines()
                if "diffdistill " in c and not c.strip().startswith("#")]
    assert len(commands) == 3
    for argv in commands:
        assert parser.parse_args(argv).func is not None


# --------------------------------------------------------------------------------------------------
# Settings: one KDConfig for the command line and the Python API; kd-pairs' options are its pair fields


def tiny_network_teacher():
    torch.manual_seed(0)
    return Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig()).eval().requires_grad_(False)


@pytest.mark.parametrize("teacher", [ring8, tiny_network_teacher], ids=["analytic", "network"])
@pytest.mark.parametrize("kimg, warmup", [(100, 10.0), (50_000, 2560.0)])
def test_python_api_defaults_are_the_command_lines(tmp_path, teacher, kimg, warmup):
    """KDConfig() resolves to what `distill kd` with no KD options resolves to; the warm-up is 10% of the run,
    capped at the paper's 2560 kimg (before, KDConfig() kept 2560 kimg whatever the run's length)."""
    teacher = teacher()
    out = str(tmp_path / "run")
    loop = distill_loop(out, total_kimg=kimg, batch=64, seed=3)
    api = kd.SPEC.config().resolve(teacher, loop)
    cli = config_from_namespace(kd.SPEC.config, parse_distill("kd", "--kimg", str(kimg), out=out)).resolve(teacher,
                                                                                                            loop)
    assert api == cli
    assert (api.warmup_kimg, api.pairs, api.student_dropout) == (warmup, out + "-pairs", 0.0)
    assert (api.loss, api.lr, api.betas, api.adam_eps, api.ema_decay) == ("l1", 2e-4, (0.9, 0.98), 1e-8, 0.995)
    assert api.resolve(teacher, None) == api == api.resolve(teacher, loop)          # idempotent
    # Without a run: the paper's warm-up and no pairs directory (create asks for one).
    assert kd.KDConfig().resolve(teacher, None) == kd.KDConfig(warmup_kimg=2560.0)


def test_settings_are_checked_and_a_run_free_method_needs_its_pairs(tmp_path, capsys):
    with pytest.raises(UsageError, match="--loss"):
        kd.KDConfig(loss="l3").resolve(ring8(), None)
    with pytest.raises(UsageError, match="--ema-decay"):
        kd.KDConfig(ema_decay=1.0).resolve(ring8(), None)
    with pytest.raises(UsageError, match="pairs=DIR"):
        kd.create(kd.KDConfig(student_preset="mlp-tiny"), ring8())
    assert not list(tmp_path.iterdir())
    cfg = kd.KDConfig(pairs=tmp_path / "p", n_pairs=16, heldout=0, shard_size=16, pairs_steps=2,
                      student_preset="mlp-tiny", student_dropout=None)
    method = kd.create(cfg, ring8())
    assert method.pairs.m["n_pairs"] == 16 and (tmp_path / "p" / "pairs.json").is_file()
    assert method.cfg == kd.KDConfig(**{**vars(cfg), "pairs": str(tmp_path / "p"), "warmup_kimg": 2560.0})
    assert "kd: 16 pairs in" in capsys.readouterr().out


def test_kd_pairs_options_are_the_pair_settings_of_distill_kd(tmp_path):
    """`kd-pairs` has exactly PairsSettings' options (written once), which `distill kd` parses the same way; only
    kd-pairs requires --pairs."""
    from diffdistill.cli.main import build_parser
    from diffdistill.methods.options import cli_fields

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices["kd-pairs"]
    own = {a.dest for a in sub._actions} - {"help", "debug", "teacher", "device", "seed", "no_progress", "threads"}
    assert own == set(kd.PAIR_FIELDS) == {f.name for f in cli_fields(kd.PairsSettings)}
    assert set(kd.PAIR_FIELDS) < {f.name for f in cli_fields(kd.KDConfig)}
    argv = ["--pairs", str(tmp_path / "p"), "--n-pairs", "300", "--heldout", "0", "--shard-size", "64",
            "--pairs-sampler", "euler", "--pairs-steps", "7", "--target-dtype", "float16", "--gen-batch", "32",
            "--pairs-seed", "5"]
    pairs = config_from_namespace(kd.PairsSettings, _pairs_args(*argv))
    distill = config_from_namespace(kd.KDConfig, parse_distill("kd", *argv))
    assert pairs == kd.PairsSettings(**{name: getattr(distill, name) for name in kd.PAIR_FIELDS})
    assert pairs.pairs_config() == KP.PairsConfig(n_pairs=300, heldout=0, shard_size=64, sampler="euler", steps=7,
                                                 target_dtype="float16", batch=32, seed=5)
    for bad in (["--n-pairs", "0"], ["--pairs-seed", "-1"], ["--target-dtype", "int8"]):
        with pytest.raises(SystemExit):
            _pairs_args("--pairs", "p", *bad)
        with pytest.raises(SystemExit):
            parse_distill("kd", *bad)
    with pytest.raises(SystemExit):
        _pairs_args()                                        # kd-pairs: --pairs is required
    assert parse_distill("kd").pairs is None                 # distill kd: RUN-pairs


def test_python_api_run_keeps_the_best_heldout_ema(tmp_path):
    """`diffdistill.distill("kd", ...)`: the method's own model selection (SPEC.best_metric) runs without a
    command line, and the run's warm-up is 10% of its length."""
    from diffdistill.api import distill

    loop = distill_loop(str(tmp_path / "run"), total_kimg=0.064, batch=16, device="cpu", progress=False,
                        tensorboard=False, final_grid=False)
    result = distill("kd", ring8(), loop=loop, pairs=str(tmp_path / "p"), n_pairs=64, heldout=16, shard_size=64,
                     pairs_steps=2, student_preset="mlp-tiny", loss="l2", lr=1e-3)
    assert result.config.warmup_kimg == pytest.approx(0.0064) and result.config.pairs == str(tmp_path / "p")
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    losses = [r["eval/heldout_loss"] for r in stats if "eval/heldout_loss" in r]
    assert losses and result.best["metric"] == "heldout_loss" and result.best["value"] == pytest.approx(min(losses))
    student = result.student()
    method = kd.KnowledgeDistillation(kd.make_student(ring8(), "mlp-tiny"), tmp_path / "p", kd.KDConfig(loss="l2"))
    assert method.heldout_loss(student) == pytest.approx(min(losses), rel=1e-5)   # RUN/model = the best EMA


def test_pairs_are_generated_where_the_teacher_is():
    """The teacher's own device (a teacher loaded on the GPU without --device used to get CPU noise), else the
    run's device, else the CPU."""
    on_meta = Precond(mlp_preset("tiny", 2), (2,), 0, PrecondConfig()).to("meta")
    assert kd._pairs_device(on_meta, "cpu") == "meta"
    assert kd._pairs_device(ring8().to("meta"), None) == "meta"          # an analytic teacher's buffers
    assert kd._pairs_device(Denoiser((2,)), "cuda:1") == "cuda:1" and kd._pairs_device(Denoiser((2,)), None) == "cpu"
