"""Memory (issue 9, part 4): peak resident memory of KD pair generation for 1k, 10k and 50k pairs (the goal:
flat, since pairs stream to shards) and of one training step of each method. Every measurement runs in its own
subprocess (`python -m benchmarks.memory ...`): the current RSS before the measured work, then the kernel's
peak-RSS mark (VmHWM, reset to the current RSS just before the work; `resource.getrusage` ru_maxrss where that is
not available); tracemalloc's peak of Python-level allocations is reported beside it.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from .common import ROOT, Context, fmt, goal, table

PAIR_COUNTS = (1_000, 10_000, 50_000)
PAIR_REPEATS = 3           # fresh processes per count: the allocator's peak varies by tens of MB run to run
GEN_BATCH = 500
PAIR_SHAPE = (1, 28, 28)   # MNIST-size pairs: 50k of them would be ~0.2 GB if held in memory
SHARD = 10_000


def maxrss_mb() -> float:
    """Peak RSS of this process (since the last `reset_peak`, where Linux allows resetting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def rss_mb() -> float:
    """Current RSS of this process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return maxrss_mb()


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: write 5 to /proc/self/clear_refs), so
    that the peak measured next belongs to the work that follows, not to the set-up before it."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(argv: list[str], timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"child {' '.join(argv)} exited {out.returncode}: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_pairs_teacher(path: Path) -> Path:
    """A random tiny-preset UNet at MNIST size, saved as a snapshot (the pipeline, not the teacher, is measured)."""
    import torch

    from diffdistill.diffusion.denoiser import Precond, PrecondConfig
    from diffdistill.io import save_snapshot
    from diffdistill.networks.unet import unet_preset

    torch.manual_seed(0)
    net = unet_preset("tiny", PAIR_SHAPE[1], PAIR_SHAPE[0], 0)
    den = Precond(net, PAIR_SHAPE, 0, PrecondConfig(kind="edm"))
    return save_snapshot(path, den, dict(sampler="euler", steps=1))


# --------------------------------------------------------------------------------------------------
# Children


def child_pairs(teacher: str, out: str, n: int) -> dict:
    from diffdistill.cli.main import main

    base = rss_mb()
    reset_peak()
    tracemalloc.start()
    t0 = time.perf_counter()
    rc = main(["kd-pairs", "--teacher", teacher, "--pairs", out, "--n-pairs", str(n), "--heldout", "0",
               "--shard-size", str(min(n, SHARD)), "--pairs-sampler", "euler", "--pairs-steps", "1",
               "--gen-batch", str(GEN_BATCH)])
    wall = time.perf_counter() - t0
    py_peak = tracemalloc.get_traced_memory()[1] / 2**20
    if rc != 0:
        raise SystemExit(rc)
    return dict(n=n, base_mb=base, peak_mb=maxrss_mb(), python_peak_mb=py_peak, wall_s=wall)


def child_method(name: str, batch: int) -> dict:
    import torch

    from .throughput import Stepper, build_method, digits_images, digits_teacher

    torch.set_num_threads(1)
    images = digits_images()
    with tempfile.TemporaryDirectory() as tmp:
        method = build_method(name, digits_teacher("cpu"), images, Path(tmp) / name)
        stepper = Stepper(method, images, batch, "cpu")
        base = rss_mb()
        reset_peak()
        tracemalloc.start()
        stepper.cycle_steps()
        stepper.cycle_steps()
        py_peak = tracemalloc.get_traced_memory()[1] / 2**20
    return dict(method=name, batch=batch, base_mb=base, peak_mb=maxrss_mb(), python_peak_mb=py_peak)


# --------------------------------------------------------------------------------------------------
# The benchmark


def run(ctx: Context) -> dict:
    from .quality import METHODS

    counts = PAIR_COUNTS[:2] + ((20_000,) if ctx.quick else PAIR_COUNTS[2:])
    repeats = 1 if ctx.quick else PAIR_REPEATS
    results: dict = {"pairs": [], "methods": []}
    pair_rows, method_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_pairs_teacher(Path(tmp) / "teacher")
        for n in counts:
            try:
                rs = [_child(["pairs", str(teacher), str(Path(tmp) / f"pairs-{n}-{k}"), str(n)], timeout=900)
                      for k in range(repeats)]
            except Exception as e:
                pair_rows.append([fmt(n), f"failed: {e}"[:160], "", "", "", "", ""])
                continue
            growth = sorted(r["peak_mb"] - r["base_mb"] for r in rs)
            r = dict(n=n, base_mb=statistics.median(r["base_mb"] for r in rs),
                     peak_mb=statistics.median(r["peak_mb"] for r in rs), growth_mb=statistics.median(growth),
                     growth_range_mb=[growth[0], growth[-1]], repeats=len(rs),
                     python_peak_mb=max(r["python_peak_mb"] for r in rs),
                     wall_s=statistics.median(r["wall_s"] for r in rs))
            results["pairs"].append(r)
            pair_rows.append([fmt(n), fmt(r["base_mb"]), fmt(r["peak_mb"]), fmt(r["growth_mb"]),
                              f"{growth[0]:.0f}-{growth[-1]:.0f}", fmt(r["python_peak_mb"]), fmt(r["wall_s"])])
            ctx.log(f"memory: kd-pairs {n}: peak {r['peak_mb']:.0f} MB (+{r['growth_mb']:.0f}, "
                    f"range {growth[0]:.0f}-{growth[-1]:.0f})")
    if ctx.quick:
        pair_rows.append(["50,000", "not run (--quick): 20,000 instead", "", "", "", "", ""])
    batch = 32
    for name in METHODS:
        try:
            r = _child(["method", name, str(batch)], timeout=600)
        except Exception as e:
            method_rows.append([name, f"failed: {e}"[:160], "", "", ""])
            continue
        results["methods"].append(r)
        method_rows.append([name, fmt(r["base_mb"]), fmt(r["peak_mb"]), fmt(r["peak_mb"] - r["base_mb"]),
                            fmt(r["python_peak_mb"])])
        ctx.log(f"memory: {name} step: +{r['peak_mb'] - r['base_mb']:.0f} MB")
    tables = [
        table("KD pair generation (`diffdistill kd-pairs`), peak resident memory",
              ["pairs", "RSS before (MB)", "peak RSS during (MB)", "growth (MB)", "growth range (MB)",
               "Python peak (MB, tracemalloc)", "wall s"], pair_rows,
              f"Medians of {repeats} fresh subprocesses each; {'x'.join(map(str, PAIR_SHAPE))} pairs of a random "
              f"tiny UNet, Euler 1 step, --shard-size {SHARD} --gen-batch {GEN_BATCH}. Memory is bounded by one "
              "shard plus the generation batch's activations (here most of the growth: the UNet's 14x14 "
              "self-attention at batch 500); with the default --shard-size 102400 a run of up to 102,400 pairs "
              "holds them all. The range is the allocator's run-to-run spread. Goal: flat."),
        table(f"One training step per method (digits-size UNet, batch {batch}, CPU), peak resident memory",
              ["method", "RSS after build (MB)", "peak RSS during the steps (MB)", "growth (MB)",
               "Python peak (MB)"], method_rows,
              "Each in a fresh subprocess: build the method as `distill` does, then two cycles of steps."),
    ]
    return dict(tables=tables, goals=memory_goals(results), results=results)


def memory_goals(results: dict) -> list[dict]:
    """The flat-memory goal of KD pair generation, judged from the measurements."""
    pairs = results.get("pairs", [])
    if len(pairs) < 2:
        return []
    def growth(p):
        return p.get("growth_mb", p["peak_mb"] - p["base_mb"])

    # Memory is bounded by one shard of min(n, SHARD) pairs: compare the runs whose shards are full (n >= SHARD),
    # the smallest against the largest; a run under SHARD pairs holds a smaller shard.
    full = [p for p in pairs if p["n"] >= SHARD] or pairs
    ref, big = full[0], full[-1]
    flat = growth(big) <= growth(ref) + 64     # within 64 MB while the pairs grow 5x
    shards = max(big["n"] // SHARD, 1)
    per_shard = (growth(big) - growth(ref)) / max(shards - ref["n"] // SHARD, 1)
    shard_mb = SHARD * (2 + 1) * 784 / 2**20
    why = "" if flat else (f"~{per_shard:.0f} MB more per extra {SHARD:,}-pair shard (one shard is "
                           f"{shard_mb:.0f} MB of float16 noise + uint8 targets)")
    small = [p for p in pairs if p["n"] < SHARD]
    value = (f"growth {growth(ref):.0f} MB at {ref['n']:,} -> {growth(big):.0f} MB at {big['n']:,} pairs "
             f"(shards of {SHARD:,})")
    if small:
        value += (f"; {growth(small[0]):.0f} MB at {small[0]['n']:,} pairs, whose one shard is "
                  f"{SHARD // small[0]['n']}x smaller")
    return [goal("KD pair generation memory flat in the number of pairs", flat, value, why)]


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "pairs":
        rec = child_pairs(rest[0], rest[1], int(rest[2]))
    elif kind == "method":
        rec = child_method(rest[0], int(rest[1]))
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(json.dumps(rec))
