"""Paired FIDs of several models on the same samples' seeds: which differences are real.

    python -m benchmarks.paired --data digits --features digits --ref REF.npz [--n 50000 --parts 25
        --seed 2000000] RUN_OR_SNAPSHOT...

Each model draws n samples from the same seeds (seed .. seed+n-1, in its own snapshot's sampler) and is scored
as the converged benchmark scores its reported values (`quality.ImageScorer`): the FID of all n samples, its
standard error from the FIDs of `parts` disjoint equal parts, and, for every model after the first, the difference
from the first with the standard error of that difference. Part i of every model uses the same seeds, so the
differences of the parts' FIDs count what the shared seeds make two models' errors share (`converged._paired_error`);
a difference under about twice its error is not resolved by these samples.

The converged benchmark's digits ranking was checked with this (BENCHMARKS.md section 4): 50,000 samples in 25
parts, seeds from 2,000,000, none of them used by the benchmark.
"""

from __future__ import annotations

import argparse
import sys

from diffdistill.errors import DiffdistillError
from diffdistill.io import atomic_write_json

from .converged import _error, _paired_error
from .quality import ImageScorer, _load


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.paired", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="RUN_OR_SNAPSHOT",
                   help="runs or snapshots of this project; the first is the one the others are compared with")
    p.add_argument("--data", required=True, help="the data set of the reference (as --data elsewhere)")
    p.add_argument("--features", required=True, help="feature network spec (digits, or a classifier file)")
    p.add_argument("--ref", default=None, help="reference statistics of the data in these features (`diffdistill "
                                               "ref-stats`); default: computed from --data")
    p.add_argument("--n", type=int, default=50000, help="samples per model (default %(default)s)")
    p.add_argument("--parts", type=int, default=25, help="disjoint equal parts for the errors (default %(default)s)")
    p.add_argument("--seed", type=int, default=2_000_000, help="first sample seed (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return p


def compare(models: list[str], scorer, device: str = "cpu") -> list[dict]:
    """Score every model with `scorer` (an `ImageScorer` with parts); rows of model, fid, error, and for all but
    the first diff and diff_error (None where the parts cannot give one)."""
    rows, base = [], None
    for path in models:
        den, recipe, _ = _load(path)
        s = scorer(den, recipe, device)
        row = dict(model=path, fid=s["distance"], error=_error(s.get("spread")), parts=s.get("spread"))
        if base is not None:
            row.update(diff=s["distance"] - base["distance"],
                       diff_error=_paired_error(s.get("spread"), base.get("spread")))
        else:
            base = s
        rows.append(row)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.parts < 2 or args.n // args.parts < 2:
            raise DiffdistillError(f"--n {args.n} cannot make --parts {args.parts} parts of at least 2 samples")
        scorer = ImageScorer(args.features, args.data, args.n, args.device, ref_file=args.ref, seed=args.seed,
                             splits=args.parts)
        rows = compare(args.models, scorer, args.device)
    except DiffdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"FID of {args.n:,} samples (seeds from {args.seed:,}; errors from {args.parts} parts) in {args.features} "
          f"features")
    for r in rows:
        line = f"{r['model']:50s} {r['fid']:.3f} ± {_fmt(r['error'], '.3f')}"
        if "diff" in r:
            line += f"   vs first {r['diff']:+.3f} ± {_fmt(r['diff_error'], '.3f')}"
        print(line, flush=True)
    if args.json:
        atomic_write_json(args.json, dict(vars(args), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
