"""Sampling speed (issue 9, part 1): bare network forwards, the one-step sampling path, the teacher at its
usual step counts, and diffdistill's DDIM against diffusers' own DDIM loop on identical weights."""

from __future__ import annotations

import contextlib
import math
import tempfile
from functools import partial
from pathlib import Path

import torch

from diffdistill.diffusion.denoiser import Precond, PrecondConfig
from diffdistill.diffusion.schedules import karras_sigmas
from diffdistill.networks.unet import unet_preset
from diffdistill.samplers import sample_euler, sample_heun, sample_onestep

from .common import Context, alternate, fmt, goal, median_time, not_run, table

# The three network sizes of the issue: UNet preset -> sample shape (C, H, W).
NETS = {"tiny": (3, 8, 8), "digits": (1, 8, 8), "cifar10": (3, 32, 32)}
BATCHES = (1, 16, 64)
# Teacher recipes: (label, sampler, steps); NFE = steps for Euler/DDIM, 2 * steps - 1 for Heun.
TEACHER_RECIPES = [("Euler/DDIM 10", "euler", 10), ("Euler/DDIM 50", "euler", 50),
                   ("Euler/DDIM 100", "euler", 100), ("Heun 18 (35 NFE)", "heun", 18)]


def make_denoiser(preset: str, device) -> Precond:
    """A randomly initialised UNet preset wrapped in EDM preconditioning (speed does not depend on weights)."""
    shape = NETS[preset]
    torch.manual_seed(0)
    net = unet_preset(preset, shape[1], shape[0], 0)
    return Precond(net, shape, 0, PrecondConfig(kind="edm")).to(device).eval().requires_grad_(False)


def autocast(dtype: str, device):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def repeats_for(ctx: Context, preset: str, batch: int) -> int | None:
    """How many timed repeats a forward gets (None: skipped). CIFAR-10 size at batch 64 is seconds on a CPU."""
    if ctx.cuda:
        return 10 if ctx.quick else 30
    if preset == "cifar10":
        return {1: 3 if ctx.quick else 7, 16: 2 if ctx.quick else 3, 64: None if ctx.quick else 2}[batch]
    return 5 if ctx.quick else 15


def bare_forward(den: Precond, x: torch.Tensor, sigma: float):
    """The backbone alone on precomputed inputs: F(c_in x, c_noise) (what the one-step path must match)."""
    c_in = 1 / math.sqrt(sigma**2 + den.sigma_data**2)
    x_in = (c_in * x).float()
    c_noise = torch.full((x.shape[0],), math.log(sigma) / 4, device=x.device)

    @torch.no_grad()
    def run():
        return den.backbone(x_in, c_noise, None)
    return run


def forward_rows(ctx: Context, results: dict) -> list[list]:
    rows = []
    for preset, shape in NETS.items():
        den = make_denoiser(preset, ctx.device)
        params = sum(p.numel() for p in den.parameters())
        for dtype in ("fp32", "bf16"):
            row = [preset, f"{params / 1e6:.2f}M", "x".join(map(str, shape)), dtype]
            for batch in BATCHES:
                reps = repeats_for(ctx, preset, batch)
                if dtype == "bf16" and reps is not None and preset == "cifar10" and not ctx.cuda and batch > 1:
                    reps = 1 if ctx.quick else reps
                if reps is None:
                    row.append("not run (--quick)")
                    continue
                x = torch.randn(batch, *shape, device=ctx.device)
                fn = bare_forward(den, x, 80.0)
                with autocast(dtype, ctx.device):
                    t = median_time(fn, reps, warmup=1, device=ctx.device)
                ips = batch / t["median_s"]
                results.setdefault("forward", []).append(dict(net=preset, dtype=dtype, batch=batch,
                                                              images_per_s=ips, **t))
                row.append(fmt(ips))
            rows.append(row)
            ctx.log(f"speed: forward {preset} {dtype}: {row[4:]}")
    return rows


def onestep_rows(ctx: Context, results: dict) -> tuple[list[list], float]:
    """Bare forward vs `sample_onestep` (the student's sampling path), alternating; ratio = t_bare / t_path."""
    rows, worst = [], math.inf
    for preset, shape in NETS.items():
        den = make_denoiser(preset, ctx.device)
        batch = 1 if preset == "cifar10" and not ctx.cuda else 16
        rounds = (5 if ctx.quick else 11) if preset == "cifar10" else (9 if ctx.quick else 31)
        noise = torch.randn(batch, *shape, device=ctx.device)
        sigmas = torch.tensor([80.0, 0.0], dtype=torch.float64)
        bare = bare_forward(den, noise * 80.0, 80.0)
        calls = 1 if preset == "cifar10" and not ctx.cuda else 10   # ~60 ms per timing on a CPU
        r = alternate(bare, partial(sample_onestep, den, noise, sigmas), rounds, device=ctx.device, calls=calls)
        worst = min(worst, r["ratio"])
        results.setdefault("onestep", []).append(dict(net=preset, batch=batch, **r))
        rows.append([preset, batch, fmt(batch / r["a_median_s"]), fmt(batch / r["b_median_s"]),
                     f"{r['ratio']:.3f}", r["rounds"]])
        ctx.log(f"speed: one-step path {preset}: ratio {r['ratio']:.3f}")
    return rows, worst


def teacher_rows(ctx: Context, results: dict) -> list[list]:
    """The teacher's multi-step samplers vs the one-step student (same network), alternating."""
    rows = []
    for preset, shape in NETS.items():
        den = make_denoiser(preset, ctx.device)
        big = preset == "cifar10" and not ctx.cuda
        batch = 1 if big else 16
        noise = torch.randn(batch, *shape, device=ctx.device)
        one = torch.tensor([80.0, 0.0], dtype=torch.float64)
        for label, sampler, steps in TEACHER_RECIPES:
            if big and ctx.quick and steps > 18:
                rows.append([preset, batch, label, "not run (--quick)", "", ""])
                continue
            sigmas = karras_sigmas(steps, den.sigma_min, den.sigma_max)
            fn = sample_heun if sampler == "heun" else sample_euler
            rounds = 3 if big or ctx.quick else 5
            r = alternate(partial(fn, den, noise, sigmas), partial(sample_onestep, den, noise, one), rounds,
                          warmup=0 if big else 1, device=ctx.device)
            nfe = 2 * steps - 1 if sampler == "heun" else steps
            results.setdefault("teacher", []).append(dict(net=preset, batch=batch, recipe=label, nfe=nfe, **r))
            rows.append([preset, batch, label, nfe, fmt(batch / r["a_median_s"]), f"{r['ratio']:.1f}x"])
            ctx.log(f"speed: teacher {preset} {label}: student speed-up {r['ratio']:.1f}x")
    return rows


# --------------------------------------------------------------------------------------------------
# diffdistill's DDIM (sample_euler on the scheduler's grid) vs diffusers' DDIMScheduler loop


DIFFUSERS_NETS = {
    # label: (sample size, block_out_channels, attention) of a randomly initialised UNet2DModel
    "8x8, 2 levels (8, 16)": (8, (8, 16)),
    "32x32, 3 levels (32, 64, 64)": (32, (32, 64, 64)),
}


def _diffusers_unet(size: int, channels: tuple[int, ...]):
    import diffusers

    torch.manual_seed(0)
    down = ["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (len(channels) - 1)
    return diffusers.UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                                 layers_per_block=1, down_block_types=tuple(down), up_block_types=tuple(up),
                                 norm_num_groups=4, attention_head_dim=8).eval().requires_grad_(False)


@torch.no_grad()
def diffusers_ddim(unet, sched, z_T: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' own loop: set_timesteps, then scheduler.step on the UNet's prediction."""
    sched.set_timesteps(steps)
    z = z_T
    for t in sched.timesteps:
        z = sched.step(unet(z, t).sample, t, z).prev_sample
    return z


def diffusers_rows(ctx: Context, results: dict) -> tuple[list[list], float | None, float | None]:
    try:
        import diffusers
    except ImportError:
        return [["–", "–", not_run("diffusers is not installed"), "", "", ""]], None, None
    from diffdistill.teachers import load_teacher

    steps, batch = (20, 4) if ctx.quick else (50, 4)
    rows, worst_err, worst_ratio = [], 0.0, math.inf
    for label, (size, channels) in DIFFUSERS_NETS.items():
        unet = _diffusers_unet(size, channels).to(ctx.device)
        with tempfile.TemporaryDirectory() as tmp:
            unet.save_pretrained(Path(tmp) / "unet")
            diffusers.DDIMScheduler(clip_sample=False).save_pretrained(Path(tmp) / "scheduler")
            den = load_teacher(tmp, device=ctx.device)
        sched = diffusers.DDIMScheduler(clip_sample=False)
        z_T = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(ctx.device)
        sigmas = den.default_sigmas(steps)
        s0 = float(sigmas[0])
        # diffusers starts from z_T at abar_T; in EDM space x_T = z_T / alpha_T = z_T sqrt(1 + sigma_T^2).
        noise = z_T.double() * math.sqrt(1 + s0**2) / s0

        theirs = partial(diffusers_ddim, unet, sched, z_T, steps)
        ours = partial(sample_euler, den, noise, sigmas)

        mine, ref = ours().float(), theirs()
        err = float((mine - ref).abs().max())
        # the criterion of tests/test_diffusers_teacher.py: |a - b| <= 1e-4 + 1e-4 |b| (torch assert_close)
        rel = float(((mine - ref).abs() / (1e-4 + 1e-4 * ref.abs())).max())
        # and against diffusers' loop run in float64 (unet.double()): how much of the gap is fp32 rounding
        err64 = float((mine.double() - diffusers_ddim(unet.double(), sched, z_T.double(), steps)).abs().max())
        unet.float()
        rounds = 3 if ctx.quick else 7
        r = alternate(ours, theirs, rounds, device=ctx.device)
        worst_err, worst_ratio = max(worst_err, rel), min(worst_ratio, 1 / r["ratio"])
        results.setdefault("diffusers_ddim", []).append(dict(net=label, steps=steps, batch=batch, max_abs_diff=err,
                                                             tolerance_used=rel, max_abs_diff_fp64=err64, **r))
        rows.append([label, steps, batch, f"{err:.1e} ({rel:.2f} of tol.)", f"{err64:.1e}",
                     fmt(batch / r["a_median_s"]),
                     fmt(batch / r["b_median_s"]), f"{1 / r['ratio']:.3f}"])
        ctx.log(f"speed: diffusers DDIM {label}: max diff {err:.1e}, speed ratio {1 / r['ratio']:.3f}")
    return rows, worst_err, worst_ratio


def run(ctx: Context) -> dict:
    results: dict = {}
    where = "GPU" if ctx.cuda else "CPU"
    fwd = forward_rows(ctx, results)
    one, worst_one = onestep_rows(ctx, results)
    teach = teacher_rows(ctx, results)
    diff, diff_err, diff_ratio = diffusers_rows(ctx, results)
    tables = [
        table(f"Bare network forward ({where}, images/s, median)",
              ["network", "params", "shape", "dtype"] + [f"batch {b}" for b in BATCHES], fwd,
              "UNet presets of diffdistill.networks.unet, random weights, backbone only (no preconditioning). "
              "bf16 = torch.autocast(bfloat16)."),
        table("One-step student through the sampling path vs the bare forward",
              ["network", "batch", "bare img/s", "sample_onestep img/s", "ratio (goal >= 0.97)", "rounds"], one,
              "ratio = t(bare forward) / t(sample_onestep), median of per-round ratios, alternating in one "
              "process, 10 calls per timing (1 for cifar10 on a CPU); the path adds the EDM preconditioning and the "
              "grid check (no float64 state: one step integrates nothing)."),
        table("Teacher at its usual step counts vs the one-step student (same network)",
              ["network", "batch", "teacher sampler", "NFE", "teacher img/s", "one-step speed-up"], teach,
              "speed-up = t(teacher sampler) / t(sample_onestep), alternating; Karras grid, EDM preconditioning."),
        table("diffdistill DDIM vs diffusers' DDIMScheduler loop (identical UNet2DModel weights)",
              ["UNet2DModel", "steps", "batch", "max |diff| vs diffusers fp32",
               "max |diff| vs diffusers fp64", "diffdistill img/s", "diffusers img/s",
               "speed ratio (goal >= 1)"], diff,
              "diffdistill: load_teacher(diffusers folder) + sample_euler on the scheduler's own grid; diffusers: "
              "set_timesteps + step loop. tol. = 1e-4 + 1e-4 |x| (torch assert_close atol = rtol = 1e-4, as in "
              "tests/test_diffusers_teacher.py); fp64 = diffusers' loop with unet.double(). speed ratio = "
              "t(diffusers) / t(diffdistill)."),
    ]
    return dict(tables=tables, goals=speed_goals(results), results=results)


def speed_goals(results: dict) -> list[dict]:
    """The issue's speed goals, judged from the measurements (also used to re-derive them from a record)."""
    one = results.get("onestep", [])
    goals = []
    if one:
        worst = min(one, key=lambda r: r["ratio"])
        best = max(one, key=lambda r: r["ratio"])
        met = worst["ratio"] >= 0.97
        # the path's extra time per call, against the bare forward's time
        extra_ms = 1e3 * (worst["b_median_s"] - worst["a_median_s"])
        why = "" if met else (f"a fixed cost per call of ~{extra_ms:.2f} ms (EDM preconditioning and the grid "
                              f"check: small-tensor Python ops) against a {1e3 * worst['a_median_s']:.1f} ms "
                              f"forward of the {worst['net']} network at batch {worst['batch']}; the "
                              f"{best['net']} network reaches {best['ratio']:.3f}")
        goals.append(goal("one-step sampling path >= 0.97 of the bare forward", met,
                          "; ".join(f"{r['net']} {r['ratio']:.3f}" for r in one), why))
    ddim = results.get("diffusers_ddim", [])
    if ddim:
        tol = max(r["tolerance_used"] for r in ddim)
        goals.append(goal("diffdistill DDIM agrees with diffusers to 1e-4 (atol = rtol = 1e-4)", tol <= 1,
                          f"worst {tol:.2f} of the tolerance; max |diff| to diffusers in float64 "
                          f"{max(r['max_abs_diff_fp64'] for r in ddim):.1e}"))
        ratios = [1 / r["ratio"] for r in ddim]
        goals.append(goal("diffdistill DDIM no slower than diffusers", min(ratios) >= 1.0,
                          "t(diffusers)/t(diffdistill) " + ", ".join(f"{v:.3f}" for v in ratios),
                          "" if min(ratios) >= 1.0 else "within a few %: the float64 ODE state and per-step "
                          "casts against diffusers' fp32 loop, at the noise level of a shared machine"))
    return goals
