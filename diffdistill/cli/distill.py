"""`diffdistill distill METHOD`: distil a teacher with one method on the one loop; `diffdistill kd-pairs`.

The common options (teacher, data, run directory, length, batch, device, resume) live here; each method module
adds its own options (`add_arguments`) and builds its `Method` (`build`).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from ..errors import UsageError

METHODS = ["kd", "pd", "di", "gdd", "cd", "dmd2", "sid"]

EXAMPLES = """\
examples:
  # one-step students of the analytic 8-Gaussian ring teacher, on a laptop CPU
  diffdistill distill di  --teacher toy:ring8 --out runs/di-ring  --kimg 200 --batch 256
  diffdistill distill kd  --teacher toy:ring8 --out runs/kd-ring  --kimg 200 --batch 256
  diffdistill distill gdd --teacher toy:ring8 --data toy:ring8 --out runs/gdd-ring --kimg 200 --batch 256

  # a digits teacher trained with `diffdistill train-teacher --data digits --out runs/digits`
  diffdistill distill pd --teacher runs/digits --data digits --out runs/pd-digits --start-steps 16 --end-steps 1

  # an EDM teacher converted with `diffdistill convert edm edm-cifar10-32x32-uncond-vp.pkl teachers/cifar`,
  # on 8 GPUs (rerunning the same command resumes from the newest checkpoint)
  torchrun --nproc_per_node=8 -m diffdistill distill di --teacher teachers/cifar --out runs/di-cifar \\
      --batch 128 --kimg 200000 --init-sigma 1.0

The run directory gets config.json, command.txt, stats.jsonl, checkpoints/, sample grids and, at the end,
model/ (the EMA student with its sampling recipe: `diffdistill sample figures OUT.png RUN`).
"""


def _method_module(name: str):
    return importlib.import_module(f"diffdistill.methods.{name}")


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the loop shared by every method."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", required=True, metavar="RUN", help="run directory")
    g.add_argument("--kimg", type=float, default=100.0, help="training length in thousands of images (default 100)")
    g.add_argument("--batch", type=int, default=128, help="global batch size (default 128)")
    g.add_argument("--batch-gpu", type=int, default=None, help="per-process micro-batch (gradient accumulation)")
    g.add_argument("--ema", type=float, default=None, metavar="KIMG",
                   help="EMA half-life of the student in kimg (default: 5%% of the run)")
    g.add_argument("--tick-kimg", type=float, default=None, help="a stats.jsonl line every this many kimg")
    g.add_argument("--checkpoint-kimg", type=float, default=None, help="checkpoint every this many kimg")
    g.add_argument("--grid-kimg", type=float, default=None, help="save a sample grid every this many kimg")
    g.add_argument("--resume", action="store_true", help="continue RUN even if its settings differ")
    g.add_argument("--force", action="store_true", help="start RUN over (deletes its checkpoints and stats)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="distil a teacher into a 1-4 step student",
                              description="Distil a teacher into a fast student with one of the methods below.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="method", metavar="METHOD", required=True, parser_class=type(p))
    for name in METHODS:
        module = _method_module(name)
        mp = sub.add_parser(name, help=module.HELP, description=module.HELP + ".", epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mp.add_argument("--teacher", required=True, metavar="SPEC",
                        help="a run or snapshot of this project, a diffusers model folder, a converted EDM "
                             "teacher, toy:ring8 or gmm:PATH.json")
        mp.add_argument("--data", default=None, metavar="SPEC",
                        help="real data" + (" (required)" if module.NEEDS_DATA else " (not needed)"))
        mp.add_argument("--xflip", action="store_true", help="augment real images with horizontal flips")
        add_loop_arguments(mp)
        module.add_arguments(mp)
        mp.set_defaults(func=run, method_module=name)

    kd = _method_module("kd")
    pp = subparsers.add_parser("kd-pairs", help="generate (noise, teacher sample) pairs for knowledge distillation",
                               description="Generate the (x_T, teacher(x_T)) pairs of the Denoising Student as "
                                           "resumable shards.",
                               epilog="examples:\n"
                                      "  diffdistill kd-pairs --teacher runs/digits --pairs runs/digits-pairs "
                                      "--n-pairs 100000\n  torchrun --nproc_per_node=8 -m diffdistill kd-pairs "
                                      "--teacher ./ddpm-cifar10-32 --pairs pairs-cifar --n-pairs 1024000\n"
                                      "  diffdistill distill kd --teacher runs/digits --pairs runs/digits-pairs "
                                      "--out runs/kd-digits",
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    pp.add_argument("--teacher", required=True, metavar="SPEC", help="the teacher (see `distill --help`)")
    pp.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    pp.add_argument("--seed", type=int, default=0, help="random seed")
    kd.add_pairs_arguments(pp)
    pp.set_defaults(func=run_pairs)


def _check_positive(args) -> None:
    for name in ("kimg", "ema", "tick_kimg", "checkpoint_kimg", "grid_kimg"):
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("batch", "batch_gpu"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    from ..data import open_dataset
    from ..teachers import is_analytic_spec, load_teacher
    from ..train.loop import TrainConfig, train

    _check_positive(args)
    module = _method_module(args.method_module)
    if module.NEEDS_DATA and args.data is None:
        raise UsageError(f"{args.method_module} needs real data: pass --data SPEC (a folder, .zip, .npz, digits, "
                         "toy:ring8, ...)")
    teacher = load_teacher(args.teacher, device=_device(args))
    data = None
    if args.data is not None:
        data = open_dataset(args.data, xflip=args.xflip)
        if tuple(data.shape) != tuple(teacher.shape):
            raise UsageError(f"--data {args.data} has samples of shape {tuple(data.shape)}, the teacher "
                             f"{args.teacher} makes {tuple(teacher.shape)}")
    method = module.build(args, teacher, data)
    data_spec = args.data or (args.teacher if is_analytic_spec(args.teacher) else None)
    cfg = TrainConfig(
        out=args.out, total_kimg=args.kimg, batch=args.batch, batch_gpu=args.batch_gpu,
        ema_halflife_kimg=args.ema if args.ema is not None else 0.05 * args.kimg,
        seed=args.seed, tick_kimg=args.tick_kimg or max(args.kimg / 20, 1e-3),
        checkpoint_kimg=args.checkpoint_kimg or max(args.kimg / 4, 1e-3),
        grid_kimg=args.grid_kimg or 0.0, device=args.device, workers=args.workers, resume=args.resume,
        force=args.force, max_steps=args.max_steps, bf16=args.bf16, progress=not args.no_progress,
        command=shlex.join(["diffdistill", *sys.argv[1:]]),
        meta=dict(method=args.method_module, teacher=args.teacher, data=data_spec),
    )
    evaluate = getattr(module, "evaluate", None)  # a method's own model selection (KD: held-out loss)
    if evaluate is not None:
        cfg.eval_kimg = max(args.kimg / 10, 1e-3)
        cfg.best_metric = getattr(module, "BEST_METRIC", None)
    result = train(method, cfg, data, evaluate=evaluate)
    if result.get("interrupted"):
        print(f"stopped at step {result['step']} ({result['nimg'] / 1000:g} kimg); rerun the same command "
              "to continue", file=sys.stderr)
        return 130
    print(f"done: {result['model']}")
    return 0


def run_pairs(args) -> int:
    from ..teachers import load_teacher

    teacher = load_teacher(args.teacher, device=_device(args))
    return _method_module("kd").run_pairs(args, teacher)
