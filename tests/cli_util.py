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
