"""Running loaders' variants and summarising them (the table of the README's reliability section)."""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from .harness import OUTCOMES, Loader, Result, Variant, remove, run_variant
from .loaders import LOADERS


def prepare() -> None:
    """Import in this process what the children use, so that each forked child starts at once: the CLI with
    every command, diffusers, lmdb, PIL's plugins; one torch thread."""
    import importlib

    import PIL.Image
    import torch

    torch.set_num_threads(1)
    PIL.Image.init()
    from diffdistill.cli.main import build_parser

    build_parser()
    for name in ("diffusers", "lmdb", "diffdistill.teachers.diffusers", "diffdistill.teachers.edm",
                 "diffdistill.data.pairs", "diffdistill.methods.kd", "diffdistill.metrics.protocol",
                 "diffdistill.metrics.features", "diffdistill.samplers", "safetensors.torch", "tqdm"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def make_base(loader: Loader, root: Path) -> Path:
    """The loader's valid base, written into root/<loader>/."""
    import contextlib
    import io

    base = root / loader.name.replace(" ", "-")
    base.mkdir(parents=True)
    with contextlib.redirect_stdout(io.StringIO()):   # what the commands that make some bases print
        loader.base(base)
    return base


def variants_of(loader: Loader, n: int, seed: int) -> list[Variant]:
    """The base itself (which must be accepted), then `n` variants: all when `n` is None, else a seeded sample
    that keeps the structured variants' variety."""
    rng = random.Random(f"{loader.name}:{seed}")
    found = loader.variants(rng, n)
    if len(found) > n:
        found = random.Random(f"{loader.name}:pick:{seed}").sample(found, n)
    return [Variant("the valid base", None, "any")] + found


def run(names: Iterable[str] | None = None, n: int = 100, seed: int = 0, workdir: Path | None = None,
        progress: bool = True, time_limit: float | None = None) -> list[Result]:
    """Run `n` variants (plus the valid base) of each loader; returns every result."""
    from . import harness

    prepare()
    names = list(names or LOADERS)
    results: list[Result] = []
    root = Path(tempfile.mkdtemp(prefix="diffdistill-fuzz-", dir=workdir))
    try:
        for name in names:
            loader = LOADERS[name]
            start = time.monotonic()
            base = make_base(loader, root / "bases")
            work = root / "work" / loader.name.replace(" ", "-")
            work.mkdir(parents=True)
            variants = variants_of(loader, n, seed)
            for v in variants:
                r = run_variant(loader, v, base, work, time_limit or harness.TIME_LIMIT)
                results.append(r)
                if progress and r.outcome != "clean":
                    print(f"  [{name}] {r.outcome}: {v.name}: {r.detail}", flush=True)
            if progress:
                print(f"{name}: {len(variants)} runs in {time.monotonic() - start:.1f} s", flush=True)
    finally:
        remove(root)
    return results


def table(results: list[Result]) -> str:
    """The summary as a Markdown table: per loader, runs, how many of each outcome, and how many of the clean
    ones were inputs still valid after the mutation (accepted with sane output; the valid base among them)."""
    loaders = list(dict.fromkeys(r.loader for r in results))
    head = "| loader | runs | " + " | ".join(OUTCOMES) + " | of which still valid | seconds per run |"
    rows = [head, "|" + "---|" * (len(OUTCOMES) + 4)]

    def row(name, mine):
        counts = [sum(r.outcome == o for r in mine) for o in OUTCOMES]
        valid = sum(r.outcome == "clean" and r.code == 0 for r in mine)
        seconds = f"{sum(r.seconds for r in mine) / len(mine):.2f}" if name != "all" else ""
        return f"| {name} | {len(mine)} | " + " | ".join(map(str, counts)) + f" | {valid} | {seconds} |"
    rows += [row(name, [r for r in results if r.loader == name]) for name in loaders]
    rows.append(row("all", results))
    return "\n".join(rows)
