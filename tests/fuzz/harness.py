"""Running one variant: a sandbox folder, the CLI in a forked child, and the classification of what happened."""

from __future__ import annotations

import io
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OUTCOMES = ("clean", "traceback", "hang", "crash", "accepted", "unclear", "stray")
TIME_LIMIT = 30.0            # seconds per variant (a valid base runs in about a second)
MEMORY_BUDGET = 256 << 20    # DIFFDISTILL_MAX_BYTES in the child: declared sizes above it must be refused
ADDRESS_LIMIT = 6 << 30      # the child's address space may grow by this much before allocations fail


@dataclass
class Variant:
    """One malformed (or possibly still valid) input of a loader.

    mutate(sandbox): turns the sandbox's copy of the valid base into the variant (None: the base itself).
    expect: 'error' (malformed by construction: exit 0 is a silent acceptance) or 'any' (may still be valid).
    argv: the command line, when the variant changes it (CLI values); else the loader's.
    names: what the error line must name (default: the loader's input path).
    """

    name: str
    mutate: Callable[[Path], None] | None = None
    expect: str = "error"
    argv: list[str] | None = None
    names: tuple[str, ...] | None = None


@dataclass
class Result:
    loader: str
    variant: str
    outcome: str
    code: int | None
    stderr: str
    seconds: float
    detail: str = ""


@dataclass
class Loader:
    """A loader under test: how its valid base is made, the command that reads it, and its variants.

    base(folder): writes the valid base into `folder` (the sandbox's input folder `in/`), once per run.
    argv(sandbox): the command; paths inside the sandbox (inputs under in/, outputs under out/).
    names(sandbox): fragments of which the error line must contain one.
    variants(rng, n): at least n variants (structured ones first, then random truncations and flips).
    check_output(sandbox): after exit 0, None when the output is sane, else what is wrong with it.
    writable: folders of the sandbox the command may write besides out/ (none by default).
    """

    name: str
    base: Callable[[Path], None]
    argv: Callable[[Path], list[str]]
    names: Callable[[Path], tuple[str, ...]]
    variants: Callable[..., list[Variant]]
    check_output: Callable[[Path], str | None] = lambda sandbox: None
    writable: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# The sandbox


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """{relative path: (kind, size, mtime_ns, link target)} of everything under `root`, symlinks not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        if any(rel_dir == s or rel_dir.startswith(s + os.sep) for s in skip):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if any(rel == s or rel.startswith(s + os.sep) for s in skip):
                continue
            st = os.lstat(os.path.join(dirpath, name))
            link = os.readlink(os.path.join(dirpath, name)) if os.path.islink(os.path.join(dirpath, name)) else ""
            kind = "dir" if os.path.isdir(os.path.join(dirpath, name)) and not link else st.st_mode >> 12
            out[rel] = (kind, st.st_size if kind != "dir" else 0, st.st_mtime_ns if kind != "dir" else 0, link)
    return out


def make_sandbox(root: Path, base: Path) -> Path:
    """root/box: in/ (a copy of the base, symlinks kept), out/ (empty), cwd/ (the command's working folder)."""
    box = root / "box"
    if box.exists() or box.is_symlink():
        remove(box)
    box.mkdir(parents=True)
    shutil.copytree(base, box / "in", symlinks=True)
    (box / "out").mkdir()
    (box / "out" / KEEP).write_text("an earlier output: never overwritten\n")
    (box / "cwd").mkdir()
    return box


KEEP = "earlier-output.txt"   # in the output folder before every run: it must be left as it is


def remove(path: Path) -> None:
    """Remove a sandbox, whatever a variant left in it (FIFOs, read-only folders, symlink loops)."""
    for dirpath, dirnames, _ in os.walk(path, followlinks=False):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Running the CLI in a child


def _child(argv: list[str], box: Path, err_path: Path) -> None:
    """In the forked child: limits, the sandbox as working folder, stderr to a file at fd level; never returns."""
    code = 97
    try:
        os.chdir(box / "cwd")
        os.environ["DIFFDISTILL_MAX_BYTES"] = str(MEMORY_BUDGET)
        os.environ["HOME"] = str(box / "cwd")
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + ADDRESS_LIMIT, resource.RLIM_INFINITY))
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        out_fd = os.open(err_path.with_name("stdout.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
        from diffdistill.cli.main import main

        try:
            code = int(main(argv) or 0)
        except SystemExit as e:   # argparse: usage errors (2), --help (0)
            code = e.code if isinstance(e.code, int) else 2
        except BaseException:     # noqa: BLE001  (escaped main: the worst outcome, shown as a traceback)
            import traceback

            traceback.print_exc()
            code = 98
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def run_cli(argv: list[str], box: Path, time_limit: float = TIME_LIMIT) -> tuple[int | None, str, str, float]:
    """(exit code or None, stderr, 'hang'/'crash <signal>'/'' , seconds) of `main(argv)` in a forked child."""
    err_path = box.parent / "stderr.txt"
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(argv, box, err_path)
    status, what = None, ""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > time_limit:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            what = "hang"
            break
        time.sleep(0.005)
    seconds = time.monotonic() - start
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    if what:
        return None, stderr, what, seconds
    if os.WIFSIGNALED(status):
        return None, stderr, f"crash {signal.Signals(os.WTERMSIG(status)).name}", seconds
    return os.WEXITSTATUS(status), stderr, "", seconds


# --------------------------------------------------------------------------------------------------
# Classification


def classify(code: int | None, stderr: str, what: str, variant: Variant, names: tuple[str, ...],
             output_problem: str | None, stray: list[str]) -> tuple[str, str]:
    """(outcome, detail) of one run; see the package doc for the outcomes."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if what == "hang":
        return "hang", f"still running after {TIME_LIMIT:g} s"
    if what.startswith("crash"):
        return "crash", what
    if "Traceback (most recent call last)" in stderr or code in (97, 98):
        return "traceback", (lines[-1] if lines else "")[:300]
    if stray:
        return "stray", ", ".join(stray[:3])
    if code == 0:
        if variant.expect == "error":
            return "accepted", "exit 0 on a malformed input"
        if output_problem:
            return "accepted", output_problem
        return "clean", "accepted (still valid)"
    if code not in (1, 2):
        return "unclear", f"exit code {code}"
    if len(lines) != 1:
        return "unclear", f"{len(lines)} stderr lines: " + " | ".join(lines[:3])[:300]
    if "out of memory" in lines[0] or "MemoryError" in lines[0]:
        return "unclear", "an allocation failed instead of a refusal: " + lines[0][:300]
    if not any(n in lines[0] for n in names):
        return "unclear", "does not name the file: " + lines[0][:300]
    return "clean", lines[0][:300]


def strays(before: dict, after: dict) -> list[str]:
    """Paths created, changed or removed between two `tree`s."""
    changed = [p for p in after if p not in before or after[p] != before[p]]
    removed = [p for p in before if p not in after]
    return sorted(changed + [f"{p} (removed)" for p in removed])


def run_variant(loader: Loader, variant: Variant, base: Path, work: Path,
                time_limit: float = TIME_LIMIT) -> Result:
    """Build the variant in a fresh sandbox under `work`, run it, classify it, remove the sandbox."""
    box = make_sandbox(work, base)
    try:
        if variant.mutate is not None:
            variant.mutate(box)
        skip = ("out", *loader.writable)
        outputs = ("stderr.txt", "stdout.txt")
        before = tree(work, skip=tuple(os.path.join("box", s) for s in skip) + outputs)
        argv = variant.argv if variant.argv is not None else loader.argv(box)
        argv = [a.replace("{box}", str(box)) for a in argv]
        code, stderr, what, seconds = run_cli(argv, box, time_limit)
        after = tree(work, skip=tuple(os.path.join("box", s) for s in skip) + outputs)
        names = variant.names if variant.names is not None else loader.names(box)
        problem = loader.check_output(box) if code == 0 else None
        stray = strays(before, after)
        keep = box / "out" / KEEP
        if keep.is_symlink() or not keep.is_file() or keep.read_text() != "an earlier output: never overwritten\n":
            stray.append(f"out/{KEEP} (an earlier output) was changed")
        outcome, detail = classify(code, stderr, what, variant, names, problem, stray)
        return Result(loader.name, variant.name, outcome, code, stderr, seconds, detail)
    finally:
        remove(box)
