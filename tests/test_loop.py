"""The one training loop: EMA rule, LR schedule, data stream, groups (every / start), stages, NaN stop, stats,
grids, snapshots, evaluation, run-directory rules and SIGINT handling. Tiny CPU models only."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill import io
from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.errors import DiffdistillError
from diffdistill.methods.base import Batch, Group, Method, OptimConfig
from diffdistill.networks.mlp import MLP
from diffdistill.train import checkpoint as ckpt
from diffdistill.train.ema import EMA, ema_beta
from diffdistill.train.loop import Stage, StreamSampler, TrainConfig, lr_at, split_batch, step_seed, train

torch.set_num_threads(1)


class Points:
    """A map-style data set of 2-D points (the interface of diffdistill.data)."""

    def __init__(self, n=64, seed=0, label_dim=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 2, generator=g) * 0.5
        self.labels = torch.randint(max(label_dim, 1), (n,), generator=g) if label_dim else None
        self.shape, self.label_dim = (2,), label_dim

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], (int(self.labels[i]) if self.labels is not None else -1)


def tiny_denoiser(seed: int) -> Precond:
    torch.manual_seed(seed)
    return Precond(MLP(dim=2, hidden=16, num_layers=1, emb_channels=8), (2,), 0, PrecondConfig())


class Toy(Method):
    """Two groups: 'a' (data, every step) and 'b' (data-free, every `every_b` steps), with test hooks."""

    name = "toy"

    def __init__(self, every_b=2, nan_at=None, kill_at=None):
        super().__init__()
        self.a, self.b = tiny_denoiser(1), tiny_denoiser(2)
        self.drop = nn.Dropout(0.2)
        self.every_b = every_b
        self.nan_at, self.kill_at = nan_at, kill_at
        self.seen: list[tuple[str, int, int]] = []   # (group, step, batch size)

    def groups(self):
        return {"a": Group(list(self.a.parameters()), OptimConfig(lr=1e-2), loss=self.a_loss, needs_data=True),
                "b": Group(list(self.b.parameters()), OptimConfig(lr=1e-2, warmup_kimg=0.064), loss=self.b_loss,
                           every=self.every_b)}

    def a_loss(self, batch: Batch):
        self.seen.append(("a", batch.step, batch.size))
        sigma = torch.rand(batch.size) + 0.1
        x = batch.x
        out = self.a(self.drop(x) + sigma[:, None] * torch.randn_like(x), sigma)
        loss = ((out - x) ** 2).sum(1).mean()
        if self.kill_at is not None and batch.step == self.kill_at:
            os.kill(os.getpid(), signal.SIGINT)
        return {"loss": loss, "sigma_mean": sigma.mean()}

    def b_loss(self, batch: Batch):
        self.seen.append(("b", batch.step, batch.size))
        sigma = torch.rand(batch.size) + 0.1
        x = torch.randn(batch.size, 2) * 0.3 + 1.0
        loss = ((self.b(x + sigma[:, None] * torch.randn_like(x), sigma) - x) ** 2).sum(1).mean()
        if self.nan_at is not None and batch.step >= self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss, "sigma_mean": sigma.mean()}

    def ema_targets(self):
        return {"a": self.a}

    def export(self, ema=None):
        return (ema["a"] if ema else self.a), {"sampler": "euler", "steps": 4}


def config(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(out=str(tmp_path / name), total_kimg=0.16, batch=16, ema_halflife_kimg=0.05, tick_kimg=0.048,
                checkpoint_kimg=0.064, keep_checkpoints=2, tensorboard=False, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------------------------------
# Pieces


def test_ema_beta_is_edms_half_life_rule():
    # After `halflife` images at a constant rate, the old weights have decayed to one half.
    beta = ema_beta(batch=32, nimg=10**9, halflife_kimg=2.0, rampup=None)
    assert beta ** (2000 / 32) == pytest.approx(0.5, rel=1e-12)
    # Ramp-up: half-life min(h, 0.05 * nimg).
    assert ema_beta(32, 1000, 2.0, 0.05) == pytest.approx(0.5 ** (32 / 50.0), rel=1e-12)
    assert ema_beta(32, 0, 2.0, 0.05) == 0.0  # first step copies the weights


def test_halflife_from_a_per_step_decay():
    from diffdistill.methods.base import halflife_from_decay

    for decay, batch in [(0.995, 512), (0.9999, 2048), (0.5, 1)]:
        assert ema_beta(batch, 10**9, halflife_from_decay(decay, batch), None) == pytest.approx(decay, rel=1e-12)
    assert halflife_from_decay(0.995, 512) == pytest.approx(70.80, abs=0.01)
    assert halflife_from_decay(0.0, 64) == 0.0
    with pytest.raises(ValueError):
        halflife_from_decay(1.0, 64)


def test_ema_update_is_lerp():
    net = nn.Linear(3, 2)
    ema = EMA({"n": net}, halflife_kimg=0.1, rampup=None)
    before = {k: v.clone() for k, v in ema.modules["n"].state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    beta = ema.update(nimg=64, batch=16)
    assert beta == pytest.approx(0.5 ** (16 / 100))
    expected = beta * before["weight"] + (1 - beta) * net.weight.detach()
    torch.testing.assert_close(ema.modules["n"].weight, expected)
    # state_dict round trip
    other = EMA({"n": nn.Linear(3, 2)}, 0.1)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.modules["n"].weight, ema.modules["n"].weight)


def test_lr_schedule_warmup_and_linear_decay():
    oc = OptimConfig(lr=1.0, warmup_kimg=1.0, decay="linear")
    assert lr_at(oc, 500, 0, 10_000) == pytest.approx(0.5 * (1 - 500 / 10_000))
    assert lr_at(oc, 5000, 0, 10_000) == pytest.approx(0.5)
    assert lr_at(oc, 10_000, 0, 10_000) == 0.0
    # from an origin at 10k images (a later stage's start) the schedule starts again
    assert lr_at(oc, 10_250, 10_000, 20_000) == pytest.approx(0.25 * (1 - 250 / 10_000))
    assert lr_at(OptimConfig(lr=3.0), 123, 0, 1000) == 3.0


def test_split_batch():
    assert split_batch(64, 8, 2) == (8, 4)
    assert split_batch(64, None, 2) == (32, 1)
    with pytest.raises(DiffdistillError):
        split_batch(64, 12, 1)
    with pytest.raises(DiffdistillError):
        split_batch(63, None, 2)


def test_stream_sampler_epochs_shards_and_resume():
    n, batch, bgpu, accum, world = 10, 8, 2, 2, 2
    per_rank = [iter(StreamSampler(n, 5, 0, batch, bgpu, accum, world, r)) for r in range(world)]
    stream = []
    for _ in range(5):  # 5 steps of 8 images = 40 positions = 4 epochs
        step = {}
        for r in range(world):
            for a in range(accum):
                step[a * world + r] = next(per_rank[r])
        stream += [i for g in sorted(step) for i in step[g]]
    for e in range(4):  # every epoch is a permutation of the data set
        assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n:2 * n]  # and a different one each epoch
    # resuming from images seen gives the same continuation
    resumed = iter(StreamSampler(n, 5, 24, batch, bgpu, accum, world, 0))
    assert next(resumed) == stream[24:26]


# --------------------------------------------------------------------------------------------------
# The loop end to end


def test_train_writes_stats_checkpoints_and_model(tmp_path):
    method = Toy()
    cfg = config(tmp_path, grid_kimg=0.08, grid_n=16, snapshot_kimg=0.08)
    result = train(method, cfg, Points())
    run = tmp_path / "run"
    assert result["step"] == 10 and result["nimg"] == 160 and not result["interrupted"]
    lines = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 9, 10]  # ticks at 48, 96, 144 images and the end
    for key in ("kimg", "time", "a/loss", "b/loss", "a/sigma_mean", "lr/a", "it_per_s", "img_per_s", "peak_mem_gb"):
        assert key in lines[0]
    assert lines[-1]["lr/a"] == pytest.approx(1e-2)
    # group b runs every 2nd step: steps 0, 2, ..., 8
    assert sorted({s for g, s, _ in method.seen if g == "b"}) == [0, 2, 4, 6, 8]
    assert sorted({s for g, s, _ in method.seen if g == "a"}) == list(range(10))
    # checkpoints every 64 images (steps 4, 8) plus the end (10); keep 2
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [10, 8]
    assert json.loads((run / "config.json").read_text())["method"] == "toy"
    assert (run / "command.txt").is_file()
    # sampler-ready model = the EMA export
    den, recipe, meta = io.load_snapshot(run / "model")
    assert recipe == {"sampler": "euler", "steps": 4} and meta["step"] == 10
    assert set(den.state_dict()) == set(method.a.state_dict())
    # every 80 images: two grids and two snapshots, named by kimg to the image under 1 kimg
    assert (run / "samples-kimg000000.080.png").is_file() and (run / "samples-kimg000000.160.png").is_file()
    assert (run / "samples-final.png").is_file()
    assert sorted(p.name for p in run.glob("snapshot-*")) == ["snapshot-kimg000000.080", "snapshot-kimg000000.160"]
    assert (run / "snapshot-kimg000000.160" / "model.json").is_file()


def test_model_is_the_ema_not_the_raw_weights(tmp_path):
    method = Toy()
    train(method, config(tmp_path, ema_halflife_kimg=1.0), Points())
    den, _, _ = io.load_snapshot(tmp_path / "run" / "model")
    raw = method.a.state_dict()
    diffs = [float((den.state_dict()[k] - raw[k]).abs().max()) for k in raw]
    assert max(diffs) > 1e-4  # a half-life of 1000 images over 160 images lags the weights


def test_batch_sizes_reach_the_method(tmp_path):
    method = Toy()
    train(method, config(tmp_path, batch=16, batch_gpu=4, max_steps=2), Points())
    a_calls = [(s, b) for g, s, b in method.seen if g == "a"]
    assert a_calls == [(0, 4)] * 4 + [(1, 4)] * 4  # 4 accumulation rounds of 4


def test_begin_step_is_a_notice_whose_return_is_ignored(tmp_path):
    """The loop calls `begin_step(step, nimg)` before every step and ignores what it returns: nothing is reset (an
    older contract rebuilt the optimisers of returned groups); an old checkpoint's `extra_state` key is ignored."""
    class Notices(Toy):
        def __init__(self):
            super().__init__()
            self.notices = []

        def begin_step(self, step, nimg):
            self.notices.append((step, nimg))
            return {"a", "b"}          # a group reset of the older contract: no effect now

    method = Notices()
    train(method, config(tmp_path, max_steps=8), Points())
    assert method.notices == [(s, 16 * s) for s in range(8)]
    run = tmp_path / "run"
    tensors, state = ckpt.load_latest(run)
    assert state["origins"] == {"a": 0, "b": 0}
    # Adam's step counts: a on every step (8), b on steps 0, 2, 4, 6 (4)
    b_steps = [v for k, v in tensors.items() if k.startswith("optim.b.") and k.endswith(".step")]
    a_steps = [v for k, v in tensors.items() if k.startswith("optim.a.") and k.endswith(".step")]
    assert float(b_steps[0]) == 4.0 and float(a_steps[0]) == 8.0
    # a checkpoint of an older version, with the method's `extra_state`, still resumes (the key is ignored)
    assert "extra_state" not in state
    js = ckpt.list_checkpoints(run)[0][1]
    js.write_text(json.dumps(dict(state, extra_state={"counter": 8})))
    resumed = Notices()
    assert train(resumed, config(tmp_path, max_steps=10, resume=True), Points())["step"] == 10
    assert resumed.notices == [(8, 128), (9, 144)]


def _lines(run):
    return [{k: v for k, v in json.loads(x).items() if k not in ("time", "it_per_s", "img_per_s")}
            for x in (run / "stats.jsonl").read_text().splitlines()]


class Vector(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))


class Quadratic(Method):
    """One vector w under Adam (LR warm-up over 2 steps, linear decay to the run's end), loss
    0.5 * mean_i ||w - (x_i + 0.1 n_i)||^2 over the batch's points x_i, with noise n_i drawn after the loop's per-step
    seed: every step is known in closed form (`quadratic_by_hand`). The export is a fixed tiny denoiser."""

    name = "quadratic"

    def __init__(self):
        super().__init__()
        self.q = Vector([1.0, -2.0])
        self.den = tiny_denoiser(1).requires_grad_(False)
        self.notices: list[int] = []

    def groups(self):
        oc = OptimConfig(lr=0.1, warmup_kimg=0.032, decay="linear")
        return {"w": Group([self.q.w], oc, loss=self.w_loss, needs_data=True)}

    def w_loss(self, batch: Batch):
        target = batch.x + 0.1 * torch.randn_like(batch.x)
        return {"loss": 0.5 * ((self.q.w - target) ** 2).sum(1).mean()}

    def begin_step(self, step, nimg):
        self.notices.append(step)

    def ema_targets(self):
        return {"q": self.q}

    def export(self, ema=None):
        return self.den, {"sampler": "euler", "steps": 4}


def quadratic_by_hand(cfg: TrainConfig, data: Points, stage_ends: list[int]) -> dict:
    """A run of `Quadratic` in stages ending at `stage_ends` (the last: the run's end), written out: the data order
    is the concatenation of the permutations torch.randperm(n, seed * 1_000_003 + epoch) read from the run's start,
    the noise follows torch.manual_seed(step_seed(seed, step, 0, 0)), and every stage starts a fresh torch Adam, an
    LR schedule whose origin is the stage's first image, and an EMA copy of the weights at its start."""
    n, batch, total = len(data), cfg.batch, stage_ends[-1] * cfg.batch
    order = torch.cat([torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + e))
                       for e in range((total + n - 1) // n)])
    assert cfg.ema_rampup is None
    beta = 0.5 ** (batch / (cfg.ema_halflife_kimg * 1000))
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    losses, lrs, step = [], [], 0
    for end in stage_ends:
        opt, origin, ema = torch.optim.Adam([w], lr=0.1), step * batch, w.detach().clone()
        while step < end:
            x = data.x[order[step * batch:(step + 1) * batch]]
            torch.manual_seed(step_seed(cfg.seed, step, 0, 0))
            target = x + 0.1 * torch.randn_like(x)
            done = (step + 1) * batch - origin
            lr = 0.1 * min(done / 32, 1.0) * max(0.0, 1 - done / (total - origin))
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
            loss = 0.5 * ((w - target) ** 2).sum(1).mean()
            loss.backward()
            opt.step()
            ema = w.detach().lerp(ema, beta)
            losses.append(float(loss.detach()))
            lrs.append(lr)
            step += 1
    state = opt.state[w]
    return dict(w=w.detach(), ema=ema, losses=losses, lrs=lrs, adam_step=float(state["step"]),
                exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"])


def test_stages_continue_one_run(tmp_path):
    """Three calls of `train` as stages ending at steps 3 and 7 and the run's end (10) give the run written out by
    hand (`quadratic_by_hand`): each stage with a fresh Adam, LR schedule and EMA, the data order and per-step
    seeds of the whole run, and stats.jsonl's kimg, losses and LRs continuing globally (the tick across a stage's
    end included), plus each stage's export; a rerun skips the stages finished before and restores only a
    checkpoint written during a stage."""
    cfg = config(tmp_path, keep_checkpoints=9, seed=5, ema_rampup=None)
    data = Points(n=40)                                  # 160 images: 4 epochs, two of them ending mid-step
    want = quadratic_by_hand(cfg, data, [3, 7, 10])
    run, method, stage = tmp_path / "run", Quadratic(), None
    for end, export in ((3, "first"), (7, None), (None, "last")):
        stage = Stage(end=end, export=export, after=stage)
        result = train(method, cfg, data, stage=stage)
        assert result["step"] == (end or 10) and (result["model"] is not None) == (end is None)
    assert method.notices == list(range(10))
    torch.testing.assert_close(method.q.w.detach(), want["w"])
    tensors, state = ckpt.load_latest(run)
    assert state["step"] == 10 and state["origins"] == {"w": 7 * 16}
    torch.testing.assert_close(tensors["ema.q.w"], want["ema"])
    assert float(tensors["optim.w.0.step"]) == want["adam_step"] == 3.0                 # the last stage's 3 steps
    torch.testing.assert_close(tensors["optim.w.0.exp_avg"], want["exp_avg"])
    torch.testing.assert_close(tensors["optim.w.0.exp_avg_sq"], want["exp_avg_sq"])
    lines = _lines(run)                                  # a tick every 48 images and at the end: global kimg
    assert [r["step"] for r in lines] == [3, 6, 9, 10]
    assert [r["kimg"] for r in lines] == pytest.approx([0.048, 0.096, 0.144, 0.16])
    for r, (a, b) in zip(lines, [(0, 3), (3, 6), (6, 9), (9, 10)]):        # steps 6-8 span the second stage's end
        assert r["w/loss"] == pytest.approx(np.mean(want["losses"][a:b]), rel=1e-6)
        assert r["lr/w"] == pytest.approx(want["lrs"][b - 1], rel=1e-12)          # the tick's last LR
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [10, 8, 7, 4, 3]  # every 4 steps, and each stage's end
    assert io.load_snapshot(run / "first")[2]["step"] == 3 and io.load_snapshot(run / "last")[2]["step"] == 10
    assert (run / "command.txt").read_text().count("\n") == 1           # RUN is prepared by the first stage only
    # a rerun: the newest checkpoint (4) lies in the second stage: the first is skipped, the second resumes from it
    for p in ckpt.list_checkpoints(run)[:3]:
        p[1].unlink()
    again, stage = Quadratic(), None
    for end in (3, 7, None):
        stage = Stage(end=end, after=stage)
        train(again, cfg, data, stage=stage)
        assert stage.skipped == (end == 3)
    assert again.notices == [4, 5, 6, 7, 8, 9]
    torch.testing.assert_close(again.q.w.detach(), want["w"])
    torch.testing.assert_close(ckpt.load_latest(run)[0]["ema.q.w"], want["ema"])


class LateStart(Toy):
    """Group 'b' under AdamW with weight decay, starting at step `start_b` (a warm-up of group 'a')."""

    def __init__(self, start_b):
        super().__init__(every_b=1)
        self.start_b = start_b

    def groups(self):
        groups = super().groups()
        groups["b"].optim = OptimConfig(lr=1e-2, kind="adamw", weight_decay=0.1, warmup_kimg=0.032)
        groups["b"].start = self.start_b
        return groups


def test_group_start_leaves_the_group_untouched_until_then(tmp_path):
    """A group with `start` is neither evaluated nor stepped before it: under AdamW (whose decoupled weight decay
    moves weights even for a zero gradient) its weights stay bit-identical through the warm-up, and its LR
    warm-up counts from `start`."""
    method = LateStart(start_b=5)
    before = {k: v.clone() for k, v in method.b.state_dict().items()}
    train(method, config(tmp_path, max_steps=5, total_kimg=1), Points())
    assert all(torch.equal(before[k], v) for k, v in method.b.state_dict().items())
    assert not [s for s in method.seen if s[0] == "b"]
    method = LateStart(start_b=5)
    train(method, config(tmp_path, name="run2", max_steps=7, total_kimg=1), Points())
    assert {s[1] for s in method.seen if s[0] == "b"} == {5, 6}
    assert not all(torch.equal(before[k], v) for k, v in method.b.state_dict().items())
    stats = [json.loads(line) for line in (tmp_path / "run2" / "stats.jsonl").read_text().splitlines()]
    lr_b = [r["lr/b"] for r in stats if "lr/b" in r]
    assert lr_b and lr_b[-1] == pytest.approx(1e-2 * (2 * 16) / 32)   # 2 of its 2 warm-up steps: the full lr


class EveryThird(Toy):
    """Group 'b' under AdamW with weight decay, due on steps 3, 6, ... (start 3, every 3); its loss is a closure
    (not a method named after the group) that counts its calls."""

    def __init__(self):
        super().__init__()
        self.b_calls: list[int] = []

    def groups(self):
        groups = super().groups()
        b = groups["b"]
        b.optim, b.start, b.every = OptimConfig(lr=1e-2, kind="adamw", weight_decay=0.1), 3, 3

        def counted(batch):
            self.b_calls.append(batch.step)
            return self.b_loss(batch)
        b.loss = counted
        return groups


def test_an_inactive_group_neither_computes_its_loss_nor_steps(tmp_path):
    """The loop calls each group's own `Group.loss`, only on its due steps: before `start` and off its `every`
    the loss function is not called, and the group's weights and optimiser state stay bit-identical (AdamW's
    decoupled weight decay would move the weights on any step of its optimiser)."""
    def run(steps):
        method = EveryThird()
        train(method, config(tmp_path, name=f"run{steps}", batch=16, batch_gpu=8, max_steps=steps, total_kimg=1),
              Points())
        tensors = ckpt.load_latest(tmp_path / f"run{steps}")[0]
        return method, {k: v for k, v in tensors.items() if k.startswith("optim.b.")}

    init = {k: v.clone() for k, v in tiny_denoiser(2).state_dict().items()}
    before_start, optim_b = run(3)                      # steps 0-2: before its start
    assert before_start.b_calls == [] and optim_b == {}
    assert all(torch.equal(init[k], v) for k, v in before_start.b.state_dict().items())
    assert {s for g, s, _ in before_start.seen if g == "a"} == {0, 1, 2}
    stepped, optim_b3 = run(4)                          # step 3: its first update, 2 micro-batches
    assert stepped.b_calls == [3, 3] and optim_b3
    assert not all(torch.equal(init[k], v) for k, v in stepped.b.state_dict().items())
    idle, optim_b5 = run(6)                             # steps 4, 5: off its every
    assert idle.b_calls == [3, 3]
    assert all(torch.equal(stepped.b.state_dict()[k], v) for k, v in idle.b.state_dict().items())
    assert optim_b5.keys() == optim_b3.keys() and all(torch.equal(optim_b3[k], optim_b5[k]) for k in optim_b3)
    assert {s for g, s, _ in idle.seen if g == "a"} == set(range(6))


def test_a_group_without_a_loss_function_is_refused(tmp_path):
    class NoLoss(Toy):
        def groups(self):
            groups = super().groups()
            groups["b"].loss = None
            return groups

    with pytest.raises(DiffdistillError, match="group 'b' of method 'toy' names no loss function"):
        train(NoLoss(), config(tmp_path, max_steps=1), Points())


def test_method_ema_default_when_the_loop_gives_none(tmp_path):
    from diffdistill.train.loop import ema_settings

    class KDLike(Toy):
        def ema_default(self, batch):
            return 0.1 * batch, None

    assert ema_settings(KDLike(), TrainConfig(batch=8)) == (0.8, None)
    assert ema_settings(KDLike(), TrainConfig(batch=8, ema_halflife_kimg=3.0)) == (3.0, 0.05)
    assert ema_settings(Toy(), TrainConfig()) == (500.0, 0.05)


def test_nan_loss_stops_with_the_group_named_and_keeps_checkpoint(tmp_path):
    method = Toy(nan_at=6)
    with pytest.raises(DiffdistillError, match=r"non-finite loss in group 'b'.*ckpt-000000004"):
        train(method, config(tmp_path), Points())
    tensors, state = ckpt.load_latest(tmp_path / "run")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in tensors.values())


def test_evaluate_and_best_snapshot(tmp_path):
    calls = []
    scores = iter([3.0, 1.0, 2.0])

    def evaluate(method, ema, nimg):
        assert set(ema) == {"a"}
        calls.append(nimg)
        return {"score": next(scores)}

    result = train(Toy(), config(tmp_path, eval_kimg=0.064, best_metric="score", max_steps=10), Points(), evaluate)
    assert calls == [64, 128, 160]
    assert result["best"]["value"] == 1.0 and result["best"]["nimg"] == 128
    assert io.load_snapshot(tmp_path / "run" / "best")[2]["metrics"] == {"score": 1.0}
    evals = [json.loads(x) for x in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()
             if "eval/score" in x]
    assert [e["eval/score"] for e in evals] == [3.0, 1.0, 2.0]


def test_run_dir_rules(tmp_path):
    train(Toy(), config(tmp_path, max_steps=2), Points())
    # the same command again resumes (nothing left to do)
    again = Toy()
    assert train(again, config(tmp_path, max_steps=2), Points())["step"] == 2 and not again.seen
    # a different run is refused ...
    with pytest.raises(DiffdistillError, match="holds a different run.*batch"):
        train(Toy(), config(tmp_path, max_steps=2, batch=8), Points())
    # ... unless resumed (continue with new settings) or forced (start over)
    more = Toy()
    assert train(more, config(tmp_path, max_steps=4, resume=True), Points())["step"] == 4
    assert {s for _, s, _ in more.seen} == {2, 3}
    fresh = Toy()
    assert train(fresh, config(tmp_path, max_steps=1, force=True), Points())["step"] == 1
    assert {s for _, s, _ in fresh.seen} == {0}
    # a non-empty folder that is no run is refused
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DiffdistillError, match="no config.json"):
        train(Toy(), config(tmp_path, name="other", max_steps=1), Points())


def test_needs_data(tmp_path):
    with pytest.raises(DiffdistillError, match="real data"):
        train(Toy(), config(tmp_path, max_steps=1), None)


def test_sigint_finishes_the_step_and_saves(tmp_path):
    before = signal.getsignal(signal.SIGINT)    # default_int_handler, or SIG_IGN in a backgrounded job
    method = Toy(kill_at=3)
    result = train(method, config(tmp_path, checkpoint_kimg=10.0), Points())
    assert result["interrupted"] and result["step"] == 4 and result["model"] is None
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [4]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    resumed = train(Toy(), config(tmp_path, checkpoint_kimg=10.0), Points())
    assert resumed["step"] == 10 and resumed["model"]


def test_training_time_counts_every_session(tmp_path):
    """stats.jsonl's `time` is the run's training time: a resumed session continues from its checkpoint's."""
    train(Toy(kill_at=3), config(tmp_path, checkpoint_kimg=10.0), Points())
    (_, ckpt_json), = ckpt.list_checkpoints(tmp_path / "run")
    state = json.loads(ckpt_json.read_text())
    assert 0 < state["seconds"] < 60
    ckpt_json.write_text(json.dumps(dict(state, seconds=1000.0)))   # as if the first session took 1000 s
    train(Toy(), config(tmp_path, checkpoint_kimg=10.0), Points())
    lines = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    first, resumed = [r["time"] for r in lines if r["step"] <= 4], [r["time"] for r in lines if r["step"] > 4]
    assert first and all(t < 60 for t in first)
    assert resumed and all(1000 <= t < 1060 for t in resumed)


def test_image_grid_and_scatter(tmp_path):
    from PIL import Image

    from diffdistill.train.stats import save_image_grid, save_scatter

    imgs = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    p = save_image_grid(imgs, tmp_path / "g.png", ncol=3, scale=1)
    arr = torch.from_numpy(np.asarray(Image.open(p)).copy())
    expected = ((imgs[4].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0)
    assert torch.equal(arr[4:8, 4:8], expected.to(arr.dtype))  # image 4 sits at row 1, column 1
    assert int(arr[4:8, 8:12].max()) == 0  # the empty slot is black
    s = save_scatter(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), tmp_path / "s.png", size=64, extent=2.0)
    img = Image.open(s).convert("RGB")
    assert img.size == (64, 64) and img.getpixel((48, 16)) != (255, 255, 255)  # (1, 1) plotted up-right
    assert img.getpixel((16, 48)) == (255, 255, 255)


def test_workers_tensorboard_and_bf16(tmp_path):
    plain, workers = Toy(), Toy()
    train(plain, config(tmp_path, name="w0", max_steps=3), Points())
    train(workers, config(tmp_path, name="w1", max_steps=3, workers=1, tensorboard=True), Points())
    for k, v in plain.state_dict().items():  # the same data order with a worker process
        assert torch.equal(v, workers.state_dict()[k]), k
    assert any((tmp_path / "w1" / "tensorboard").iterdir())
    result = train(Toy(), config(tmp_path, name="bf", max_steps=3, bf16=True), Points())
    last = json.loads((tmp_path / "bf" / "stats.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 3 and np.isfinite(last["a/loss"])


# --------------------------------------------------------------------------------------------------
# What a user can sample: grids with readable names, RUN/latest after an interruption


def test_output_names_say_kimg_and_sort_in_training_order():
    from diffdistill.train.loop import kimg_label

    assert kimg_label(200_000, 10) == "kimg000200" and kimg_label(1_999_999, 1) == "kimg001999"
    assert kimg_label(640, 0.064) == "kimg000000.640" and kimg_label(12_345_678, 0.5) == "kimg012345.678"
    names = [kimg_label(n, 0.064) for n in (64, 640, 6400, 64_000)]
    assert sorted(names) == names


def test_final_grid_without_periodic_grids_is_the_exported_models_samples(tmp_path):
    from PIL import Image

    from diffdistill import samplers
    from diffdistill.train.stats import save_scatter

    result = train(Toy(), config(tmp_path, final_grid=True, grid_n=32), Points())
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("samples-*.png")) == ["samples-final.png"]
    den, recipe, _ = io.load_snapshot(result["model"])
    x = samplers.sample(den, 32, steps=recipe["steps"], sampler=recipe["sampler"])   # seeds 0..31, as the loop
    expected = save_scatter(x, tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(run / "samples-final.png")), np.asarray(Image.open(expected)))
    # final_grid only changes outputs, not training: rerunning with it off is the same run (resumes, no refusal)
    assert "final_grid" not in json.loads((run / "config.json").read_text())["train"]
    train(Toy(), config(tmp_path, "off"), Points())
    assert not list((tmp_path / "off").glob("samples-*.png"))


def test_an_interrupted_run_leaves_a_sampler_ready_latest_until_it_finishes(tmp_path):
    from diffdistill.io import run_snapshot

    run = tmp_path / "run"
    method = Toy(kill_at=3)
    result = train(method, config(tmp_path, checkpoint_kimg=10.0), Points())
    assert result["interrupted"] and result["model"] is None and result["rank"] == 0
    assert result["latest"] == str(run / "latest") and run_snapshot(run) == run / "latest"
    den, recipe, meta = io.load_snapshot(run / "latest")
    assert recipe == {"sampler": "euler", "steps": 4}        # the method's export, as RUN/model would be
    assert meta["step"] == 4 and meta["nimg"] == 64 and meta["interrupted"] is True
    tensors, _ = ckpt.load_latest(run)                       # = the EMA of the checkpoint it stopped at
    for k, v in den.state_dict().items():
        assert torch.equal(v, tensors[f"ema.a.{k}"]), k
    resumed = train(Toy(), config(tmp_path, checkpoint_kimg=10.0), Points())
    assert resumed["model"] == str(run / "model") and resumed["latest"] is None
    assert not (run / "latest").exists() and run_snapshot(run) == run / "model"
    # a run started over (--force) drops the old run's RUN/latest at once (here it then fails at its first step)
    train(Toy(kill_at=1), config(tmp_path, "again", checkpoint_kimg=10.0), Points())
    assert (tmp_path / "again" / "latest").is_dir()
    with pytest.raises(DiffdistillError, match="non-finite"):
        train(Toy(nan_at=0), config(tmp_path, "again", checkpoint_kimg=10.0, force=True), Points())
    assert not (tmp_path / "again" / "latest").exists()
