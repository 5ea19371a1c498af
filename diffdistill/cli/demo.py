"""`diffdistill demo`: train small teachers, distil them with every method, and write a report."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError

DESCRIPTION = """\
The whole library on the embedded data, on a CPU: train a small class-conditional teacher on sklearn's
8x8 digits, distil it with every method (kd, pd, di, gdd, cd, dmd2, sid), do the same for the exact teacher
of a ring of 8 Gaussians (toy:ring8), sample every teacher at 1-18 steps and every student at 1 step (CD and
PD also at 2 and 4), and write DIR/index.html, DIR/report.md and DIR/results.json: a table of quality, NFE,
sampling and training time, a plot of quality against NFE, and sample grids.

Quality: on digits, FID with the shipped digits classifier's features (not Inception) against the data set; on
the ring, the exact metrics (modes covered, fraction within 3 std, sliced Wasserstein distance).
Each stage is the same run as a command a user would type (listed in the report), in DIR/runs/PROFILE/STAGE;
rerunning the demo reuses finished stages and resumes interrupted ones. A failing method becomes a row with
its error.
"""

EXAMPLES = """\
examples:
  diffdistill demo                       # 6-10 minutes on 2 CPU cores -> demo-report/index.html
  diffdistill demo --quick --out /tmp/d  # 2-3 minutes: short runs, numbers show the pipeline only
  diffdistill demo --methods di,cd --tracks ring
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="distil small teachers with every method and write a report",
                              description=DESCRIPTION, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-report", metavar="DIR",
                   help="report directory (default: demo-report)")
    p.add_argument("--quick", action="store_true",
                   help="short runs (2-3 minutes; the numbers show the pipeline, not the methods)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests: seconds, ring only
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="comma-separated methods (default: kd,pd,di,gdd,cd,dmd2,sid)")
    p.add_argument("--tracks", default=None, metavar="LIST",
                   help="comma-separated data sets: ring, digits (default: both)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--force", action="store_true",
                   help="retrain every stage instead of reusing finished ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _list(text: str | None, known: tuple[str, ...], what: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in items if s not in known]
    if bad or not items:
        raise UsageError(f"--{what} {text!r}: expected a comma-separated list of {', '.join(known)}")
    return items


def run(args) -> int:
    from ..demo import METHODS, DemoConfig, run_demo
    from ..demo.pipeline import TRACKS

    if args.quick and args.tiny:
        raise UsageError("--quick and --tiny exclude each other")
    cfg = DemoConfig(out=args.out, profile="tiny" if args.tiny else "quick" if args.quick else "default",
                     methods=_list(args.methods, METHODS, "methods") or METHODS,
                     tracks=_list(args.tracks, TRACKS, "tracks"), device=args.device,
                     progress=not args.no_progress, force=args.force, threads=args.threads)
    results = run_demo(cfg)
    failed = [s["key"] for s in results["stages"] if not s.get("ok")]
    bad_rows = sum(r.get("status") != "ok" for r in results["rows"])
    print(f"report: {args.out}/index.html ({len(results['rows'])} rows, {results['seconds'] / 60:.1f} min)")
    if failed or bad_rows:
        print(f"warning: {len(failed)} stage(s) failed ({', '.join(failed) or 'none'}), {bad_rows} row(s) "
              "without numbers; see the report", file=sys.stderr)
    return 0
