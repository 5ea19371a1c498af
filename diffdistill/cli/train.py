"""`diffdistill train-teacher`: train a diffusion model on a data set with the one loop."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import UsageError

EXAMPLES = """\
examples:
  # a 2-D toy teacher in about a minute on a CPU (8 Gaussians on a ring)
  diffdistill train-teacher --data toy:ring8 --out runs/toy --preset toy

  # sklearn's 8x8 digits (class-conditional), a few minutes on a CPU
  diffdistill train-teacher --data digits --out runs/digits --preset digits

  # a v-prediction teacher on the cosine schedule, for progressive distillation
  diffdistill train-teacher --data digits --out runs/digits-v --preset digits --loss vp --pred v

  # EDM's CIFAR-10 recipe on 8 GPUs; rerunning the same command resumes from the newest checkpoint
  torchrun --nproc_per_node=8 -m diffdistill train-teacher --data cifar-10-python.tar.gz --out runs/cifar \\
      --preset cifar10 --batch-gpu 64

The run directory gets config.json, command.txt, stats.jsonl, checkpoints/, samples-*.png and, at the end,
model/ (the EMA network with its sampling recipe: `diffdistill sample figures OUT.png RUN`).
Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and stops; --resume continues.
"""


def register(subparsers) -> None:
    from ..methods import teacher
    from ..presets import PRESETS

    p = subparsers.add_parser("train-teacher", help=teacher.HELP, description=teacher.HELP + ".",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="data set: folder, .zip, cifar-10-python.tar.gz, .npz, LMDB, digits, toy:ring8, gmm:PATH")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="network and loop settings (default: by data shape: toy for points, digits up to 8x8, "
                        "mnist up to 28x28, else cifar10)")
    p.add_argument("--kimg", type=float, default=None, help="training length in thousands of images")
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--batch-gpu", type=int, default=None, help="per-process micro-batch (gradient accumulation)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--ema", type=float, default=None, metavar="KIMG", help="EMA half-life in kimg")
    p.add_argument("--xflip", action="store_true", help="augment images with horizontal flips")
    p.add_argument("--resume", action="store_true", help="continue RUN even if its settings differ")
    p.add_argument("--force", action="store_true", help="start RUN over (deletes its checkpoints and stats)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (testing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    teacher.add_arguments(p)
    p.set_defaults(func=run)


def default_preset(shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return "toy"
    size = max(shape[1:])
    return "digits" if size <= 8 else "mnist" if size <= 28 else "cifar10"


def run(args) -> int:
    from ..data import open_dataset
    from ..methods import teacher
    from ..presets import get_preset, train_config
    from ..train.loop import train

    for name in ("kimg", "lr", "ema"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    for name in ("batch", "batch_gpu"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    data = open_dataset(args.data, xflip=args.xflip, use_labels=not args.uncond)
    if args.preset is None:
        args.preset = default_preset(tuple(data.shape))
    preset = get_preset(args.preset)
    method = teacher.build(args, None, data)
    overrides = dict(batch_gpu=args.batch_gpu, seed=args.seed, bf16=args.bf16, device=args.device,
                     workers=args.workers, resume=args.resume, force=args.force, max_steps=args.max_steps,
                     progress=not args.no_progress, command=shlex.join(["diffdistill", *sys.argv[1:]]))
    if args.kimg is not None:
        overrides["total_kimg"] = args.kimg
    if args.batch is not None:
        overrides["batch"] = args.batch
    if args.ema is not None:
        overrides["ema_halflife_kimg"] = args.ema
    meta = dict(data=args.data, xflip=args.xflip, preset=preset.name, loss=method.cfg.loss,
                prediction=method.cfg.prediction, schedule=method.cfg.schedule, weighting=method.cfg.weighting,
                sigma_data=method.cfg.sigma_data, label_dropout=method.cfg.label_dropout,
                lr=method.cfg.optim.lr if method.cfg.optim else None, label_dim=method.denoiser.label_dim,
                sample_steps=args.sample_steps)
    cfg = train_config(preset, args.out, meta=meta, **overrides)
    result = train(method, cfg, data)
    if result["interrupted"]:
        print(f"stopped at step {result['step']} ({result['nimg'] / 1000:g} kimg); rerun the same command "
              "to continue", file=sys.stderr)
        return 130
    print(f"done: {result['model']}")
    return 0
