"""`diffdistill` command line. Each command lives in its own module with `register(subparsers)`.

Expected errors (DiffdistillError, bad files, bad options) print one line and exit 1 (2 for usage errors);
`--debug` (before or after the command name) shows the traceback; `--threads N` sets the CPU threads of each
command that computes (default 1, see THREADS_HELP). An unknown option shows the usage of the
(sub)command it was given to; `--version` prints the version.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from .. import __version__
from ..errors import DiffdistillError, UsageError
from .common import count_value

# Command modules, in the order `--help` lists them. A module that is not written yet is skipped.
COMMANDS = ["demo", "sample", "train", "distill", "eval", "convert", "export", "dataset", "features", "bench"]


EXAMPLES = """\
examples:
  diffdistill demo --quick                                   # every method on a CPU in about two minutes
  diffdistill train-teacher --data digits --out runs/digits  # a small teacher on sklearn's 8x8 digits
  diffdistill distill di --teacher runs/digits --out runs/di-digits --kimg 50
  diffdistill sample figures grid.png runs/di-digits         # one step per image
  diffdistill eval runs/di-digits --metrics fid --features digits --ref-data digits

Run `diffdistill COMMAND --help` for each command's options and examples.
"""


class _Parser(argparse.ArgumentParser):
    """Every parser of the command tree (subparsers are made of the parser's own class): usage errors are one line
    with that parser's usage, and each takes `--debug`, so that it works after a command name too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a parser where it is not given leaves the value alone (main() defaults it to False)
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an error")

    def error(self, message):  # usage errors: one line (not the usage block of every option), exit 2
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown options from the top-level parser, with its usage; note the
        # deepest parser that met unknown options so that `main` can report them with that parser's usage.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(namespace, _UNKNOWN):
            setattr(namespace, _UNKNOWN, (self, list(extras)))
        return namespace, extras


_UNKNOWN = "_diffdistill_unknown_options"

# The commands that compute (with all their subcommands): each takes `--threads`, applied before it runs.
COMPUTING = ("train-teacher", "distill", "kd-pairs", "sample", "eval", "ref-stats", "features train", "demo", "bench",
             "export")

# On a 2-core machine with other work running (digits teacher, `train-teacher --preset digits`), one thread
# trained several times faster than two, and so did two runs at once with one thread each against two threads each.
# OpenMP threads that share a core with other work wait on each other, and the small networks a CPU trains gain
# little from a second thread, so one thread is the default.
THREADS_HELP = ("torch CPU threads (default: $OMP_NUM_THREADS if set, else 1: several threads gain little on the "
                "small networks a CPU trains and are many times slower when other work shares the cores)")


_threads = count_value(1, 1024)


def _computes(path: str) -> bool:
    return any(path == c or path.startswith(c + " ") for c in COMPUTING)


def _subparsers(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _add_threads(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Give `--threads` to each parser of a computing command (one that has its own keeps it)."""
    for action in _subparsers(parser):
        for name, child in action.choices.items():
            child_path = f"{path} {name}".strip()
            if _computes(child_path) and "--threads" not in child._option_string_actions:
                child.add_argument("--threads", type=_threads, default=argparse.SUPPRESS, metavar="N",
                                   help=THREADS_HELP)
            _add_threads(child, child_path)


def command_path(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The (sub)command names `args` was parsed for, e.g. 'distill di'."""
    names = []
    while True:
        chosen = [(a, getattr(args, a.dest, None)) for a in _subparsers(parser)]
        chosen = [(a, name) for a, name in chosen if name in a.choices]
        if not chosen:
            return " ".join(names)
        action, name = chosen[0]
        names.append(name)
        parser = action.choices[name]


def default_threads() -> int:
    """$OMP_NUM_THREADS when it is a positive whole number, else 1 (see THREADS_HELP)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "")))
    except ValueError:
        return 1


def apply_threads(count: int) -> None:
    """Use `count` CPU threads: torch's intra-op pool, its inter-op pool where torch still allows it (it can be set
    once, before any inter-op work), and OMP_NUM_THREADS for the processes this one starts later (benchmark
    subprocesses, data workers); the environment variable alone would not change this process, whose OpenMP
    runtime read it when torch was imported."""
    import torch

    if count < 1:
        raise UsageError(f"--threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    if torch.get_num_interop_threads() != count:
        try:
            torch.set_num_interop_threads(count)
        except RuntimeError:   # already set, or inter-op work already started: leave it
            pass
    os.environ["OMP_NUM_THREADS"] = str(count)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="diffdistill",
        description="Distil a diffusion model (the teacher) into a 1-4 step student.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"diffdistill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"diffdistill.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"diffdistill.cli.{name}":
                continue
            raise
        module.register(sub)
    _add_threads(parser)
    return parser


_OUT_OF_MEMORY = re.compile(r"can't allocate memory|out of memory|not enough memory", re.IGNORECASE)


def _one_line(e: BaseException) -> str:
    """An error's message as one line. A DataLoader worker's error arrives wrapped with the worker's traceback
    ('Caught DiffdistillError in DataLoader worker process 0.\\nOriginal Traceback ...'): its last line is the
    original message."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") and ": " in last else last
    return lines[0]


def _chosen_parsers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    """The parser and the (sub)command parsers `args` were parsed by, outermost first."""
    out = [parser]
    while True:
        chosen = [(a, getattr(args, a.dest, None)) for a in _subparsers(parser)]
        chosen = [(a, name) for a, name in chosen if name in a.choices]
        if not chosen:
            return out
        parser = chosen[0][0].choices[chosen[0][1]]
        out.append(parser)


def main(argv: list[str] | None = None, callback=None) -> int:
    """`diffdistill ARGV`; returns the exit status. callback: instrumentation of a `distill METHOD` run, as
    `diffdistill.distill`'s (`callback(event, obj)` with the teacher, the method and the loop's result)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args, extras = parser.parse_known_args(argv)
    where, unknown = getattr(args, _UNKNOWN, (parser, extras))
    if extras:
        where.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, _UNKNOWN):
        delattr(args, _UNKNOWN)
    args.debug = getattr(args, "debug", False)
    args.argv = argv   # what was parsed: runs record it as their command (also when called from Python)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from .common import check_option_values

        check_option_values([a for p in _chosen_parsers(parser, args) for a in p._actions], args)
        if _computes(command_path(parser, args)):
            if getattr(args, "threads", None) is None:   # not given (a command's own option may default to None)
                args.threads = default_threads()
            apply_threads(args.threads)
        result = args.func(args, callback=callback) if callback is not None else args.func(args)
        return int(result or 0)
    except UsageError as e:
        if args.debug:
            raise
        print(f"diffdistill {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (DiffdistillError, OSError) as e:   # OSError: a file system's answer (no such file, a loop, ...)
        if args.debug:
            raise
        print(f"diffdistill {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError as e:
        if args.debug:
            raise
        print(f"diffdistill {args.command}: error: out of memory ({_one_line(e) or 'MemoryError'})", file=sys.stderr)
        return 1
    except RuntimeError as e:   # torch's allocators: "... can't allocate memory", CUDA "out of memory"
        if args.debug or not _OUT_OF_MEMORY.search(str(e)):
            raise
        print(f"diffdistill {args.command}: error: out of memory ({_one_line(e)})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
