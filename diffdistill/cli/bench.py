"""`diffdistill bench`: the benchmark runner of the repository (`python -m benchmarks`), from its root."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..errors import DiffdistillError
from .common import command_line


def _checkout_roots() -> list[Path]:
    """Where a checkout's benchmarks/ may sit: beside this package (editable install), or the working directory
    and its parents."""
    here = Path(__file__).resolve().parents[2]
    cwd = Path.cwd().resolve()
    return [here, cwd, *cwd.parents]


def _benchmarks():
    if importlib.util.find_spec("benchmarks") is None:
        for root in _checkout_roots():
            if (root / "benchmarks" / "__main__.py").is_file() and (root / "diffdistill").is_dir():
                sys.path.insert(0, str(root))
                break
    try:
        import benchmarks.__main__ as runner
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "benchmarks":
            raise DiffdistillError("the benchmarks package is not importable: run `diffdistill bench` from the "
                                   "root of a diffdistill checkout (it is not part of the installed package)") from None
        raise
    return runner


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks (from a repository checkout) and regenerate "
                                            "BENCHMARKS.md",
                              description="Speed, cost and quality against NFE: writes benchmarks/results/*.json "
                                          "and BENCHMARKS.md. Same options as `python -m benchmarks`.")
    try:
        runner = _benchmarks()
    except DiffdistillError:
        p.set_defaults(func=_missing)
        return
    runner.add_arguments(p)
    p.set_defaults(func=_run)


def _missing(args) -> int:
    _benchmarks()
    return 1


def _run(args) -> int:
    runner = _benchmarks()
    return runner.run(args, command_line(args))
