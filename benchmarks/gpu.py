"""GPU rows (issue 9, part 5): bf16 and torch.compile forwards of the CIFAR-10-size UNet and the fraction of the
GPU's peak they reach. Only with `--device cuda`; otherwise every row says why it was not run."""

from __future__ import annotations

from functools import partial

import torch

from .common import Context, alternate, fmt, median_time, not_run, table
from .speed import bare_forward, make_denoiser

# Dense bf16 tensor-core peaks (TFLOP/s) of GPUs by name fragment; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
ROWS = [("cifar10", 64, "fp32"), ("cifar10", 64, "bf16"), ("cifar10", 64, "bf16 + torch.compile"),
        ("cifar10", 256, "bf16 + torch.compile")]
COLUMNS = ["network", "batch", "mode", "images/s", "TFLOP/s", "fraction of bf16 peak"]


def forward_flops(den, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    fn = bare_forward(den, x, 80.0)
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run(ctx: Context) -> dict:
    if not ctx.cuda:
        reason = not_run("no GPU in this session (rerun with --device cuda)")
        rows = [[net, batch, mode, reason, "", ""] for net, batch, mode in ROWS]
        return dict(tables=[table("GPU: bf16 and torch.compile forwards", COLUMNS, rows)], goals=[], results={})
    gpu = torch.cuda.get_device_name(ctx.torch_device)
    peak = peak_tflops(gpu)
    rows, results = [], []
    for net, batch, mode in ROWS:
        den = make_denoiser(net, ctx.device)
        x = torch.randn(batch, *den.shape, device=ctx.device)
        flops = forward_flops(den, x)
        if "compile" in mode:
            den.backbone = torch.compile(den.backbone)
        fn = bare_forward(den, x, 80.0)
        ctx_mgr = torch.autocast("cuda", dtype=torch.bfloat16) if "bf16" in mode else torch.autocast(
            "cuda", enabled=False)
        with ctx_mgr:
            t = median_time(fn, 5 if ctx.quick else 20, warmup=3, device=ctx.device)
        tflops = flops / t["median_s"] / 1e12
        results.append(dict(net=net, batch=batch, mode=mode, flops=flops, tflops=tflops, **t))
        rows.append([net, batch, mode, fmt(batch / t["median_s"]), fmt(tflops),
                     "–" if peak is None else f"{tflops / peak:.1%}"])
    # the sampling path on the GPU, as on the CPU: one-step vs bare forward
    from diffdistill.samplers import sample_onestep

    den = make_denoiser("cifar10", ctx.device)
    noise = torch.randn(64, *den.shape, device=ctx.device)
    r = alternate(bare_forward(den, noise * 80.0, 80.0),
                  partial(sample_onestep, den, noise, torch.tensor([80.0, 0.0], dtype=torch.float64)),
                  11, device=ctx.device)
    rows.append(["cifar10", 64, "one-step path / bare forward (fp32)", f"ratio {r['ratio']:.3f}", "", ""])
    note = f"{gpu}; peak {peak} TFLOP/s bf16 dense (table in benchmarks/gpu.py). FLOPs by FlopCounterMode."
    return dict(tables=[table("GPU: bf16 and torch.compile forwards", COLUMNS, rows, note)], goals=[],
                results=dict(rows=results, onestep=r))
