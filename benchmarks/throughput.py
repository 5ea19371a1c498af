"""Training throughput (issue 9, part 3): each method's student updates and images per second, as a ratio to one
training step (EDM loss, Adam) of the bare teacher network at the same batch, measured alternately.

A method step here is what the loop does for it, without the loop's bookkeeping (EMA, ticks, checkpoints):
`begin_step`, then for every group due at this step a fresh batch, the group's loss (`Group.loss`), backward and an
optimiser step (`diffdistill.train.loop.make_optimizer`). Methods with groups updated every k-th step are timed
over a whole cycle of k steps.
"""

from __future__ import annotations

import math
import tempfile
from functools import partial
from pathlib import Path

import torch

from diffdistill.cli.main import build_parser
from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.diffusion.losses import edm_loss
from diffdistill.methods.base import Batch
from diffdistill.networks.unet import unet_preset
from diffdistill.train.loop import make_optimizer

from .common import Context, alternate, fmt, goal, table
from .quality import METHODS

SHAPE = (1, 8, 8)   # the digits network size: big enough to be network-bound, small enough for a CPU


def digits_teacher(device) -> Precond:
    """A randomly initialised digits-preset UNet (throughput does not depend on the weights)."""
    torch.manual_seed(0)
    net = unet_preset("digits", SHAPE[1], SHAPE[0], 0)
    return Precond(net, SHAPE, 0, PrecondConfig(kind="edm")).to(device).eval().requires_grad_(False)


def digits_images() -> torch.Tensor:
    from diffdistill.data import open_dataset

    ds = open_dataset("digits", use_labels=False)
    return torch.stack([torch.as_tensor(ds[i][0]) for i in range(len(ds))])


# Options that keep set-up cheap without changing what one step costs.
EXTRA = {
    "kd": ["--n-pairs", "512", "--heldout", "0", "--shard-size", "512", "--pairs-sampler", "euler",
           "--pairs-steps", "1"],
    "pd": ["--start-steps", "8", "--end-steps", "1"],
}


def build_method(name: str, teacher, images: torch.Tensor, run_dir: Path):
    """The method as `diffdistill distill NAME` builds it (default options), on an in-memory teacher."""
    from diffdistill import methods
    from diffdistill.api import build_method as build
    from diffdistill.api import distill_loop
    from diffdistill.data import open_dataset
    from diffdistill.methods.options import config_from_namespace

    args = build_parser().parse_args(["distill", name, "--teacher", "unused", "--out", str(run_dir),
                                      *EXTRA.get(name, [])])
    spec = methods.get(name)
    data = open_dataset("digits", use_labels=False) if spec.needs_data else None
    loop = distill_loop(out=str(run_dir), total_kimg=args.kimg, batch=args.batch, device="cpu")
    return build(spec, config_from_namespace(spec.config, args), teacher, data, loop)[0]


class Stepper:
    """Runs method steps the way the loop does (minus EMA and logging)."""

    def __init__(self, method, images: torch.Tensor, batch: int, device):
        self.method, self.images, self.batch, self.device = method.to(device), images, batch, device
        self.groups = method.groups()
        self.opts = {k: make_optimizer(g.params, g.optim) for k, g in self.groups.items()}
        self.cycle = math.lcm(*[g.every for g in self.groups.values()])
        self.step = 0
        self.gen = torch.Generator().manual_seed(0)
        name = next((k for k in method.ema_targets() if k in self.groups), next(iter(self.groups)))
        self.student_updates = self.cycle // self.groups[name].every

    def one(self) -> None:
        nimg = self.step * self.batch
        self.method.begin_step(self.step, nimg)
        for name, g in self.groups.items():
            if self.step % g.every:
                continue
            idx = torch.randint(len(self.images), (self.batch,), generator=self.gen)
            b = Batch(size=self.batch, device=torch.device(self.device), x=self.images[idx].to(self.device),
                      step=self.step, nimg=nimg)
            self.opts[name].zero_grad(set_to_none=True)
            g.loss(b)["loss"].backward()
            self.opts[name].step()
        self.step += 1

    def cycle_steps(self) -> None:
        for _ in range(self.cycle):
            self.one()


def bare_step(net: Precond, opt, images: torch.Tensor, batch: int, gen: torch.Generator, device) -> None:
    """One EDM training step of the teacher network itself (the reference)."""
    idx = torch.randint(len(images), (batch,), generator=gen)
    opt.zero_grad(set_to_none=True)
    edm_loss(net, images[idx].to(device)).mean().backward()
    opt.step()


def run(ctx: Context) -> dict:
    batch = 32
    rounds = 3 if ctx.quick else 7
    images = digits_images()
    teacher = digits_teacher(ctx.device)
    bare = digits_teacher(ctx.device).train().requires_grad_(True)
    bare_opt = torch.optim.Adam(bare.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    rows, results, slowest = [], [], (math.inf, None)
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            try:
                method = build_method(name, teacher, images, Path(tmp) / name)
                stepper = Stepper(method, images, batch, ctx.device)
                r = alternate(partial(bare_step, bare, bare_opt, images, batch, gen, ctx.device),
                              stepper.cycle_steps, rounds, device=ctx.device)
            except Exception as e:
                msg = f"failed: {type(e).__name__}: {e}".split("\n")[0][:160]
                rows.append([name, msg] + [""] * 5)
                ctx.log(f"throughput {name}: {msg}")
                continue
            step_s = r["b_median_s"] / stepper.cycle
            ratio = r["ratio"] * stepper.cycle            # t(bare step) / t(method step)
            upd_s = stepper.student_updates / r["b_median_s"]
            slowest = min(slowest, (ratio, name))
            results.append(dict(method=name, batch=batch, cycle_steps=stepper.cycle, step_s=step_s,
                                bare_step_s=r["a_median_s"], ratio_to_bare=ratio,
                                student_updates_per_s=upd_s, rounds=r["rounds"]))
            rows.append([name, stepper.cycle, fmt(1 / step_s), fmt(upd_s), fmt(batch / step_s),
                         fmt(batch / r["a_median_s"]), f"{ratio:.3f}"])
            ctx.log(f"throughput {name}: {1 / step_s:.2f} steps/s, ratio to bare teacher step {ratio:.3f}")
    tables = [table(f"Training throughput at batch {batch} (digits-size UNet, 0.26M parameters, "
                    f"{'GPU' if ctx.cuda else 'CPU'})",
                    ["method", "cycle (steps)", "steps/s", "student updates/s", "images/s",
                     "bare teacher step img/s", "ratio to bare teacher step"], rows,
                    "A step = every group due at that step (loss, backward, optimiser step), as the loop does "
                    "minus EMA/logging; images/s counts the batch once per step. ratio = t(one EDM training step "
                    "of the bare teacher network) / t(one method step), median of alternating rounds.")]
    goals = []
    if slowest[1] is not None:
        goals.append(goal("training throughput reported for every method", len(results) == len(METHODS),
                          f"{len(results)}/{len(METHODS)} methods; slowest {slowest[1]} at {slowest[0]:.2f}x a "
                          "bare teacher step"))
    return dict(tables=tables, goals=goals, results=results)
