"""`diffdistill` command line. Each command lives in its own module with `register(subparsers)`.

Expected errors (DiffdistillError, bad files, bad options) print one line and exit 1 (2 for usage errors);
`--debug` (before or after the command name) shows the traceback. An unknown option shows the usage of the
(sub)command it was given to; `--version` prints the version.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import DiffdistillError, UsageError

# Command modules, in the order `--help` lists them. A module that is not written yet is skipped.
COMMANDS = ["demo", "sample", "train", "distill", "eval", "convert", "dataset", "features", "bench"]


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

    def error(self, message):  # usage errors: one line, exit 2
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        # argparse reports a subcommand's unknown options from the top-level parser, with its usage; note the
        # deepest parser that met unknown options so that `main` can report them with that parser's usage.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(namespace, _UNKNOWN):
            setattr(namespace, _UNKNOWN, (self, list(extras)))
        return namespace, extras


_UNKNOWN = "_diffdistill_unknown_options"


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
    return parser


def main(argv: list[str] | None = None) -> int:
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
        result = args.func(args)
        return int(result or 0)
    except UsageError as e:
        if args.debug:
            raise
        print(f"diffdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (DiffdistillError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        if args.debug:
            raise
        print(f"diffdistill {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
