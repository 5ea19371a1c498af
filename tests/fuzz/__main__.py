"""`python -m tests.fuzz [--full | --n N] [--seed S] [--loader NAME ...]`: run the fuzz suite, print its table.

--full runs 120 variants per loader (the README's table); the default is a quick 10. Exit status 1 when any
run is not clean.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from .loaders import LOADERS
    from .runner import run, table

    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="120 variants per loader")
    p.add_argument("--n", type=int, default=None, help="variants per loader (default 10, --full 120)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random variants")
    p.add_argument("--loader", action="append", choices=list(LOADERS), help="only these loaders")
    p.add_argument("--quiet", action="store_true", help="only the table")
    args = p.parse_args(argv)
    n = args.n or (120 if args.full else 10)
    results = run(args.loader, n=n, seed=args.seed, progress=not args.quiet)
    print(table(results))
    return 0 if all(r.outcome == "clean" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
