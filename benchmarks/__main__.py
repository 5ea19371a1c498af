"""`python -m benchmarks [--quick] [--only speed,quality,...]`: run the benchmarks, write their JSON records to
benchmarks/results/ and regenerate BENCHMARKS.md."""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

from . import BENCHMARKS

DEFAULT = [b for b in BENCHMARKS if b != "converged"]

# Nothing here imports torch at module level: `diffdistill bench` registers these options on every CLI start.
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def build_parser(prog: str = "python -m benchmarks") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Speed, cost and quality of diffdistill against NFE.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller runs (minutes, not an hour)")
    p.add_argument("--only", default=",".join(DEFAULT),
                   help=f"comma-separated benchmarks to run (default: {','.join(DEFAULT)}; converged, two hours "
                        "on a 2-core CPU, runs only when named)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"), metavar="PATH",
                   help="folder with mnist.npz and the CIFAR-10 test files (default ../shared/data)")
    for name in ("digits", "mnist", "cifar10"):
        p.add_argument(f"--{name}-teacher", default=None, metavar="RUN",
                       help=f"an existing {name} teacher (run or snapshot); default: train one under --work")
    p.add_argument("--real-data", default=None, metavar="NAMES",
                   help="quality_real: comma-separated data sets to run (mnist, cifar10; default all), the "
                        "others' tables kept from the existing record; converged: the data sets to run (ring, "
                        "digits, mnist16; default all)")
    p.add_argument("--jobs", type=int, default=2,
                   help="converged: worker processes training side by side, each with --threads threads "
                        "(default 2)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench"), metavar="DIR",
                   help="scratch folder for teachers, students and pairs (default runs/bench)")
    p.add_argument("--rerun", action="store_true",
                   help="train every student again (default: reuse a finished one made by the same command from "
                        "the same teacher weights under --work, with the compute it measured then)")
    p.add_argument("--results", default=str(RESULTS), metavar="DIR", help="where the JSON records go")
    p.add_argument("--report", default=str(ROOT / "BENCHMARKS.md"), metavar="FILE",
                   help="the markdown report to regenerate ('-' = none)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from the records")


def run(args, command: str) -> int:
    import torch

    from diffdistill.errors import UsageError

    from .common import Context, check_device, load_average, write_record
    from .report import write_report

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UsageError(f"--only: unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    check_device(args.device)
    ctx = Context(quick=args.quick, device=args.device, threads=args.threads, work=Path(args.work),
                  results=Path(args.results), shared_data=Path(args.shared_data),
                  teachers={k: v for k in ("digits", "mnist", "cifar10")
                            if (v := getattr(args, f"{k}_teacher")) is not None},
                  reuse=not args.rerun, command=command, jobs=args.jobs,
                  real_data=tuple(n.strip() for n in (args.real_data or "").split(",") if n.strip()))
    failed = []
    if not args.report_only:
        torch.set_num_threads(args.threads)
        ctx.work.mkdir(parents=True, exist_ok=True)
        for name in names:
            started, load = time.time(), load_average()
            ctx.log(f"== {name} (load {load})")
            module = importlib.import_module(f"benchmarks.{name}")
            try:
                payload = module.run(ctx)
            except Exception as e:  # keep the other benchmarks' records; say what failed
                ctx.log(f"{name}: failed: {type(e).__name__}: {e}")
                failed.append(name)
                continue
            path = write_record(ctx, name, started, load, payload)
            ctx.log(f"== {name}: {time.time() - started:.0f} s -> {path}")
    if args.report != "-":
        ctx.log(f"report: {write_report(ctx.results, Path(args.report))}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from diffdistill.errors import DiffdistillError, UsageError

    try:
        return run(args, shlex.join(["python", "-m", "benchmarks", *argv]))
    except DiffdistillError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
