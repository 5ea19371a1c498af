"""Helpers for tests that drive the command line in-process."""

from __future__ import annotations

from diffdistill.cli.main import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`diffdistill ARGV` in this process: (exit code, stdout, stderr); usage errors' SystemExit included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(err: str, *fragments: str) -> str:
    """The one 'error:' line of stderr (no traceback), holding every fragment."""
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def parse_distill(method: str, *options: str, teacher: str = "t", out: str = "unused"):
    """`diffdistill distill METHOD --teacher T --out OUT OPTIONS` parsed (with `argv`, as cli.main keeps it)."""
    from diffdistill.cli.main import build_parser

    argv = ["distill", method, "--teacher", teacher, "--out", out, *options]
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args


def cli_method(method: str, teacher, data=None, *options: str, recipe_teacher=None):
    """The Method that `diffdistill distill METHOD ... OPTIONS` builds for `teacher` (an already loaded denoiser),
    through the command line's own path: options parsed (a --recipe applied), settings resolved, seeded, built."""
    from diffdistill.cli import distill as cli_distill

    args = parse_distill(method, *options)
    if args.recipe is not None:
        args = cli_distill.with_recipe(args, teacher)
    return method_from_args(method, args, teacher, data)


def method_from_args(method: str, args, teacher, data=None):
    """The Method the parsed `distill METHOD` arguments `args` build for `teacher`, as the command line does."""
    from diffdistill.api import build_method, distill_loop
    from diffdistill.methods import get
    from diffdistill.methods.options import config_from_namespace

    spec = get(method)
    loop = distill_loop(out=args.out, total_kimg=args.kimg, batch=args.batch, seed=args.seed, device="cpu")
    return build_method(spec, config_from_namespace(spec.config, args), teacher, data, loop)[0]
