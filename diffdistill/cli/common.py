"""Options of the one training loop, shared by every command that trains (`train-teacher`, `distill METHOD`).

One definition of the options and their checks; each command gives its own defaults for the run's length and
batch (a preset's, or fixed) and fills in the periodic actions it does not get from the user.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import UsageError

# Options whose value is a length in kimg: positive, or (periodic actions) 0 to turn them off.
POSITIVE = ("kimg", "ema")
PERIODIC = ("tick_kimg", "checkpoint_kimg", "snapshot_kimg", "grid_kimg")


def add_loop_arguments(p: argparse.ArgumentParser, *, kimg: float | None, batch: int | None,
                       default_note: str, ema_help: str) -> None:
    """The 'training loop' group. `kimg`/`batch` are the command's defaults (None: from elsewhere, said in
    `default_note`, e.g. "the preset's")."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, metavar="RUN", help="run directory")
    g.add_argument("--kimg", type=float, default=kimg,
                   help=f"training length in thousands of images (default {kimg if kimg else default_note})")
    g.add_argument("--batch", type=int, default=batch,
                   help=f"global batch size (default {batch if batch else default_note})")
    g.add_argument("--batch-gpu", type=int, default=None, help="per-process micro-batch (gradient accumulation)")
    g.add_argument("--ema", type=float, default=None, metavar="KIMG", help=ema_help)
    g.add_argument("--tick-kimg", type=float, default=None, metavar="KIMG",
                   help="a stats.jsonl line every this many kimg")
    g.add_argument("--checkpoint-kimg", type=float, default=None, metavar="KIMG",
                   help="checkpoint (for resuming) every this many kimg")
    g.add_argument("--snapshot-kimg", type=float, default=None, metavar="KIMG",
                   help="a sampler-ready snapshot RUN/snapshot-<kimg>/ every this many kimg (0: only RUN/model)")
    g.add_argument("--grid-kimg", type=float, default=None, metavar="KIMG",
                   help="save a sample grid every this many kimg (0: none)")
    g.add_argument("--resume", action="store_true", help="continue RUN even if its settings differ")
    g.add_argument("--force", action="store_true", help="start RUN over (deletes its checkpoints and stats)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_loop_arguments(args) -> None:
    """Usage errors for impossible values of the loop options."""
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    for name in PERIODIC:
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {value}")
    for name in ("batch", "batch_gpu", "max_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def command_line(args) -> str:
    """The `diffdistill ...` command that `args` were parsed from (`cli.main.main` keeps the argv it was given,
    whether from a shell, torchrun or a Python caller)."""
    return shlex.join(["diffdistill", *getattr(args, "argv", sys.argv[1:])])


def loop_settings(args) -> dict:
    """TrainConfig fields set by the command line: every option given (None ones left out) and the runtime ones."""
    given = dict(total_kimg=args.kimg, batch=args.batch, ema_halflife_kimg=args.ema,
                 **{name: getattr(args, name) for name in PERIODIC})
    out = {k: v for k, v in given.items() if v is not None}
    out.update(out=args.out, batch_gpu=args.batch_gpu, seed=args.seed, bf16=args.bf16, device=args.device,
               workers=args.workers, resume=args.resume, force=args.force, max_steps=args.max_steps,
               progress=not args.no_progress, command=command_line(args))
    return out
