"""`diffdistill bench`: the benchmark runner of the repository (`python -m benchmarks`), from its root."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..errors import DiffdistillError
from .common import command_line


def _checkout_root() -> Path:
    """The checkout this package runs from (an editable install): only its own benchmarks/ is ever imported, never
    one found in the working directory or its parents."""
    return Path(__file__).resolve().parents[2]


def _benchmarks():
    if importlib.util.find_spec("benchmarks") is None:
        root = _checkout_root()
        if (root / "benchmarks" / "__main__.py").is_file() and (root / "diffdistill").is_dir():
            sys.path.insert(0, str(root))
    try:
        import benchmarks.__main__ as runner
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "benchmarks":
            raise DiffdistillError("the benchmarks are not part of the installed package: install diffdistill "
                                   "from a checkout (pip install -e .), or run `python -m benchmarks` from its "
                                   "root") from None
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
