"""Options of the one training loop, shared by every command that trains (`train-teacher`, `distill METHOD`).

One definition of the options and their checks; each command gives its own defaults for the run's length and
batch (a preset's, or fixed) and fills in the periodic actions it does not get from the user. Evaluation during
training (`--metrics fid --ref REF.npz --eval-kimg K`) is set up here too (`training_evaluation`).
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from pathlib import Path

from ..errors import DiffdistillError, UsageError
from ..validate import (
    MAX_BATCH,
    MAX_MAGNITUDE,
    MAX_SAMPLES,
    MAX_SIDE,
    SEED_RANGE,
    count_value,
    device_value,
    float_value,
    kimg_value,
    seed_value,
)

# Options whose value is a length in kimg: positive, or (periodic actions) 0 to turn them off.
POSITIVE = ("kimg", "ema", "eval_kimg")
# Options of evaluation during training that mean nothing without --metrics.
EVAL_OPTIONS = ("ref", "features", "inception", "resize", "eval_n")
EVAL_N = 10_000                # samples per evaluation during training (--eval-n)
PERIODIC = ("tick_kimg", "checkpoint_kimg", "snapshot_kimg", "grid_kimg")
# Whole-number options of several commands (by their name), and the largest value each may take: beyond these a
# value allocates more than any machine holds, or builds networks for hours, before anything else could refuse.
SIZE_CAPS = {"channels": 1 << 14, "blocks": 64, "n": MAX_SAMPLES, "threads": 1024, "steps": 100_000}


# --------------------------------------------------------------------------------------------------
# Values of options (the argparse type functions are diffdistill.validate's: a bad value is a one-line usage error
# naming the option)


def ema_rampup_value(text: str) -> float | str:
    """--ema-rampup: a ratio in (0, 1], or 'none' (no ramp-up: the half-life is --ema from the first step)."""
    if text.strip().lower() == "none":
        return "none"
    value = float_value(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1] or none, got {text}")
    return value


def check_device(name: str, option: str = "--device") -> None:
    """A one-line error (exit 1) when this machine lacks the CUDA device `name` asks for."""
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DiffdistillError(f"{option} {name}: CUDA is not available on this machine")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise DiffdistillError(f"{option} {name}: this machine has {torch.cuda.device_count()} CUDA devices")


def check_option_values(actions, args) -> None:
    """Every option's value, whatever command defines it: numbers finite and of magnitude at most MAX_MAGNITUDE
    (`--lr inf`, `--lr 1e300`), seeds (options named *seed) in [0, 2^32), learning rates (*lr) positive,
    dropout probabilities in [0, 1], --device a device name (and one this machine has).
    `actions`: the argparse actions of the parsers `args` came from."""
    for action in actions:
        if not action.option_strings or not hasattr(args, action.dest):
            continue
        name, value = action.option_strings[-1], getattr(args, action.dest)
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, float) and (not math.isfinite(v) or abs(v) > MAX_MAGNITUDE):
                raise UsageError(f"{name} {v}: expected a finite number of magnitude at most {MAX_MAGNITUDE:g}")
            if action.dest.endswith("seed") and isinstance(v, int) and not isinstance(v, bool) \
                    and not 0 <= v < SEED_RANGE:
                raise UsageError(f"{name} {v}: expected a seed in [0, 2**32)")
            if action.dest.endswith("lr") and isinstance(v, int | float) and not v > 0:
                raise UsageError(f"{name} {v}: a learning rate must be positive")
            if "dropout" in action.dest and isinstance(v, float) and not 0 <= v <= 1:
                raise UsageError(f"{name} {v}: a dropout probability must lie in [0, 1]")
        if action.dest in SIZE_CAPS and isinstance(value, int) and not isinstance(value, bool) \
                and value > SIZE_CAPS[action.dest]:
            raise UsageError(f"{name} {value}: at most {SIZE_CAPS[action.dest]}")
        if action.dest == "resolution" and value is not None:
            sides = [int(s) for s in re.findall(r"\d+", str(value))]
            if any(s > MAX_SIDE for s in sides):
                raise UsageError(f"{name} {value}: image sides of at most {MAX_SIDE}")
        if action.dest == "seeds" and isinstance(value, str):
            _check_seed_list(name, value)
        if action.dest == "device" and isinstance(value, str):
            try:
                device_value(value)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{name}: {e}") from None
            check_device(value, name)


def _check_seed_list(name: str, text: str) -> None:
    """A seed list ('0-49999', '1,5,9') names seeds in [0, 2^32) and at most MAX_SAMPLES of them (its syntax is
    the command's to check)."""
    count = 0
    for part in text.split(","):
        numbers = [int(s) for s in re.findall(r"\d+", part)]
        if any(s >= SEED_RANGE for s in numbers):
            raise UsageError(f"{name} {text}: seeds must lie in [0, 2**32)")
        count += numbers[1] - numbers[0] + 1 if len(numbers) == 2 and numbers[1] >= numbers[0] else 1
    if count > MAX_SAMPLES:
        raise UsageError(f"{name} {text}: {count:,} seeds, at most {MAX_SAMPLES:,}")


def add_loop_arguments(p: argparse.ArgumentParser, *, kimg: float | None, batch: int | None,
                       default_note: str, ema_help: str) -> None:
    """The 'training loop' group. `kimg`/`batch` are the command's defaults (None: from elsewhere, said in
    `default_note`, e.g. "the preset's")."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, metavar="RUN", help="run directory")
    g.add_argument("--kimg", type=kimg_value(), default=kimg,
                   help=f"training length in thousands of images (default {kimg if kimg else default_note})")
    g.add_argument("--batch", type=count_value(1, MAX_BATCH), default=batch,
                   help=f"global batch size (default {batch if batch else default_note})")
    g.add_argument("--batch-gpu", type=count_value(1, MAX_BATCH), default=None,
                   help="per-process micro-batch (gradient accumulation)")
    g.add_argument("--ema", type=kimg_value(), default=None, metavar="KIMG", help=ema_help)
    g.add_argument("--ema-rampup", type=ema_rampup_value, default=None, metavar="RATIO",
                   help="with --ema: EDM's ramp-up, the half-life at most RATIO x the images seen so far, or none "
                        "(default 0.05; a longer EMA in a short run needs a larger ratio)")
    g.add_argument("--tick-kimg", type=kimg_value(zero_ok=True), default=None, metavar="KIMG",
                   help="a stats.jsonl line every this many kimg")
    g.add_argument("--checkpoint-kimg", type=kimg_value(zero_ok=True), default=None, metavar="KIMG",
                   help="checkpoint (for resuming) every this many kimg")
    g.add_argument("--snapshot-kimg", type=kimg_value(zero_ok=True), default=None, metavar="KIMG",
                   help="a sampler-ready snapshot RUN/snapshot-<kimg>/ every this many kimg (0: only RUN/model)")
    g.add_argument("--grid-kimg", type=kimg_value(zero_ok=True), default=None, metavar="KIMG",
                   help="save a sample grid RUN/samples-kimg<kimg>.png every this many kimg (distill's default: "
                        "one at the end, RUN/samples-final.png; 0: none)")
    g.add_argument("--resume", action="store_true", help="continue RUN even if its settings differ")
    g.add_argument("--force", action="store_true",
                   help="start RUN over (deletes its checkpoints and stats; only ever a run of this project, "
                        "never a folder of other files)")
    g.add_argument("--device", type=device_value, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--seed", type=seed_value, default=0,
                   help="random seed of everything: network initialisation, data order, noise, dropout (the same "
                        "command twice gives bit-identical weights on a CPU)")
    g.add_argument("--workers", type=count_value(0, 256), default=0, help="data-loading worker processes")
    g.add_argument("--max-steps", type=count_value(1, 2**40), default=None,
                   help="stop after this many optimiser steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    e = p.add_argument_group("evaluation during training")
    e.add_argument("--metrics", default=None, metavar="fid[,kid,is,pr]",
                   help="measure these on the exported (EMA) model every --eval-kimg and at the end; they go to "
                        "stats.jsonl and TensorBoard as eval/<metric>-<n>/<feature network> (e.g. "
                        "eval/fid-10k/inception), and RUN/best holds the snapshot with the best value of the "
                        "first of fid, kid, is")
    e.add_argument("--ref", default=None, metavar="REF.npz",
                   help="reference: a `diffdistill ref-stats` file made with the same --features (with "
                        "--save-features for kid and pr), or a guided-diffusion reference batch (Inception)")
    e.add_argument("--features", default=None, metavar="NET",
                   help="feature network: digits, inception, or a classifier/Inception weight file (default: "
                        "digits for 8x8 grey images, else inception)")
    e.add_argument("--inception", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (or set $DIFFDISTILL_INCEPTION)")
    e.add_argument("--resize", default=None, choices=["tf1", "pytorch-fid"],
                   help="Inception's resize to 299 (default tf1; must be the reference's)")
    e.add_argument("--eval-kimg", type=kimg_value(), default=None, metavar="KIMG",
                   help="evaluate every this many kimg (default: 10 times per run)")
    e.add_argument("--eval-n", type=int, default=None, metavar="N",
                   help=f"samples per evaluation, from seeds 0..N-1 every time (default {EVAL_N})")


def check_loop_arguments(args) -> None:
    """Usage errors for impossible values of the loop options."""
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in PERIODIC:
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be 0 (off) or positive, got {value}")
    # distill only (its parsers set `method`): without --ema a method's own EMA, ramp-up included, applies;
    # train-teacher always has a half-life (the preset's), which the ramp-up then caps
    if getattr(args, "ema_rampup", None) is not None and getattr(args, "ema", None) is None \
            and getattr(args, "method", None):
        raise UsageError("--ema-rampup needs --ema (without it the method's own EMA and ramp-up apply)")
    for name in ("batch", "batch_gpu", "max_steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_eval_arguments(args)


def refuse_existing_output(paths, force: bool) -> None:
    """Nothing is overwritten silently: an output file that exists (or a link where it goes) is refused unless
    --force, and a directory where a file is to be written always. With --force the file is replaced atomically
    (a link is replaced, never written through)."""
    for p in map(Path, paths):
        if p.is_dir() and not p.is_symlink():
            raise DiffdistillError(f"{p}: is a directory (expected a file to write)")
        if (p.exists() or p.is_symlink()) and not force:
            raise DiffdistillError(f"{p}: already exists; pass --force to overwrite it")


def check_eval_arguments(args) -> None:
    """Usage errors of the evaluation options (a missing or misnamed --ref, --metrics that do not exist, ...);
    whether the reference fits the feature network is checked when the evaluator is built."""
    from ..metrics.protocol import parse_metrics

    if getattr(args, "metrics", None) is None:
        for name in EVAL_OPTIONS:
            if getattr(args, name, None) is not None:
                raise UsageError(f"--{name.replace('_', '-')} needs --metrics (what to evaluate during training)")
        return
    try:
        names = parse_metrics(args.metrics)
    except DiffdistillError as e:
        raise UsageError(f"--metrics: {e}") from None
    if "toy" in names:
        raise UsageError("--metrics: the exact toy metrics are not measured during training (use `diffdistill "
                         "eval` on the snapshots)")
    if args.ref is None:
        raise UsageError("--metrics needs --ref REF.npz (`diffdistill ref-stats DATA --features NET --out "
                         "REF.npz`)")
    if Path(args.ref).suffix != ".npz":
        raise UsageError(f"--ref {args.ref}: expected a .npz file written by `diffdistill ref-stats`")
    if not Path(args.ref).is_file():
        raise UsageError(f"--ref {args.ref}: file not found")
    if args.eval_n is not None and args.eval_n < 2:
        raise UsageError(f"--eval-n must be at least 2, got {args.eval_n}")


def training_evaluator(args, shape, has_own: bool = False):
    """The `TrainEvaluator` of `--metrics` for samples of `shape` (None without --metrics). Loads the reference and
    the feature network, so that a mismatch fails before anything is built or trained. has_own: the method
    evaluates itself (KD), so --eval-kimg alone has a meaning."""
    from ..train.evaluate import make_train_evaluator
    from .eval import _default_features

    if args.metrics is None:
        if args.eval_kimg is not None and not has_own:
            raise UsageError("--eval-kimg needs --metrics (what to evaluate during training)")
        return None
    return make_train_evaluator(args.metrics, args.features or _default_features(shape), args.ref,
                                n=args.eval_n or EVAL_N, inception=args.inception, resize=args.resize or "tf1",
                                shape=shape, labelled=True)


def training_evaluation(args, cfg, evaluator=None, own=None, own_best: str | None = None):
    """The loop's evaluate hook (None when there is nothing to evaluate), with `cfg` (a TrainConfig) set to
    match (`train.evaluate.evaluation_plan`: eval_kimg from --eval-kimg, RUN/best's metric, the protocol in
    meta['eval']). evaluator: `training_evaluator`'s; own, own_best: the method's own evaluation and metric."""
    from ..train.evaluate import evaluation_plan

    fields, evaluate = evaluation_plan(evaluator, own, own_best, args.eval_kimg, cfg.total_kimg)
    if "meta_eval" in fields:
        cfg.meta = dict(cfg.meta, eval=fields.pop("meta_eval"))
    for key, value in fields.items():
        setattr(cfg, key, value)
    return evaluate


def command_line(args) -> str:
    """The `diffdistill ...` command that `args` were parsed from (`cli.main.main` keeps the argv it was given,
    whether from a shell, torchrun or a Python caller)."""
    return shlex.join(["diffdistill", *getattr(args, "argv", sys.argv[1:])])


def loop_settings(args) -> dict:
    """TrainConfig fields set by the command line: every option given (None ones left out) and the runtime ones."""
    given = dict(total_kimg=args.kimg, batch=args.batch, ema_halflife_kimg=args.ema,
                 **{name: getattr(args, name) for name in PERIODIC})
    out = {k: v for k, v in given.items() if v is not None}
    rampup = getattr(args, "ema_rampup", None)
    if rampup is not None:
        out["ema_rampup"] = None if rampup == "none" else rampup
    out.update(out=args.out, batch_gpu=args.batch_gpu, seed=args.seed, bf16=args.bf16, device=args.device,
               workers=args.workers, resume=args.resume, force=args.force, max_steps=args.max_steps,
               progress=not args.no_progress, command=command_line(args))
    return out
