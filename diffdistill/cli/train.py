"""`diffdistill train-teacher`: train a diffusion model on a data set with the one loop."""

from __future__ import annotations

import argparse

from .common import (
    add_loop_arguments,
    check_loop_arguments,
    loop_settings,
    training_evaluation,
    training_evaluator,
)

EXAMPLES = """\
examples:
  # a 2-D toy teacher in about a minute on a CPU (8 Gaussians on a ring)
  diffdistill train-teacher --data toy:ring8 --out runs/toy --preset toy

  # sklearn's 8x8 digits (class-conditional), a few minutes on a CPU
  diffdistill train-teacher --data digits --out runs/digits --preset digits

  # FID against the digits reference every 2 kimg (2000 samples) in stats.jsonl; RUN/best: the lowest FID
  diffdistill ref-stats digits --features digits --out digits-ref.npz
  diffdistill train-teacher --data digits --out runs/digits --preset digits \\
      --metrics fid --ref digits-ref.npz --features digits --eval-kimg 2 --eval-n 2000

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

    p = subparsers.add_parser("train-teacher", help=teacher.HELP, description=teacher.HELP + ".",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="data set: folder, .zip, cifar-10-python.tar.gz, .npz, LMDB, digits, toy:ring8, gmm:PATH")
    p.add_argument("--xflip", action="store_true", help="augment images with horizontal flips")
    add_loop_arguments(p, kimg=None, batch=None, default_note="the preset's",
                       ema_help="EMA half-life in kimg (default: the preset's)")
    teacher.add_arguments(p)       # --preset, --lr, --loss, --channels, ...: TrainTeacherConfig's fields
    p.set_defaults(func=run)


def network_summary(preset: str, denoiser) -> str:
    """'preset digits: UNet, 64 channels x 1,2,2 (3 levels), 2 blocks per level; 1.2M parameters' (MLP: width and
    layers)."""
    net = getattr(denoiser, "backbone", denoiser)
    cfg = getattr(net, "_config", {})
    count = sum(p.numel() for p in net.parameters())
    size = f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"
    if "model_channels" in cfg:
        mult = cfg["channel_mult"]
        what = (f"{type(net).__name__}, {cfg['model_channels']} channels x {','.join(map(str, mult))} "
                f"({len(mult)} levels), {cfg['num_blocks']} block{'s' * (cfg['num_blocks'] != 1)} per level")
    elif "hidden" in cfg:
        what = f"{type(net).__name__}, width {cfg['hidden']}, {cfg['num_layers']} layers"
    else:
        what = type(net).__name__
    return f"preset {preset}: {what}; {size} parameters"


def describe_network(preset: str, denoiser, shape: tuple[int, ...], device: str | None) -> None:
    """Say which network trains, before training (rank 0 only), and warn when the 56M cifar10 network would train
    on a CPU (many seconds per step: see its CPU forward speed in BENCHMARKS.md, section 1)."""
    import os
    import sys

    import torch

    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(network_summary(preset, denoiser), flush=True)
    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    if preset == "cifar10" and on_cpu:
        print(f"warning: the cifar10 preset trains EDM's full CIFAR-10 UNet, many seconds per step on a CPU; for "
              f"{'x'.join(map(str, shape))} data on a CPU use --preset cifar10-small", file=sys.stderr, flush=True)


def run(args) -> int:
    """`diffdistill train-teacher`: the same path as `diffdistill.train_teacher` (api.prepare_teacher)."""
    from ..api import prepare_teacher
    from ..data import open_dataset
    from ..methods.options import config_from_namespace
    from ..methods.teacher import TrainTeacherConfig
    from ..train.loop import train

    check_loop_arguments(args)
    settings = config_from_namespace(TrainTeacherConfig, args)
    settings.check()
    data = open_dataset(args.data, xflip=args.xflip, use_labels=not args.uncond)
    evaluator = training_evaluator(args, tuple(data.shape))   # a bad reference fails before anything is built
    overrides = loop_settings(args)     # out, and the loop options given: over the preset's
    method, cfg, settings = prepare_teacher(settings, data, overrides, data_spec=args.data, xflip=args.xflip)
    describe_network(settings.preset, method.denoiser, tuple(data.shape), args.device)
    evaluate = training_evaluation(args, cfg, evaluator)
    result = train(method, cfg, data, evaluate=evaluate)
    from .distill import report_result

    return report_result(result)   # rank 0 only: "done: RUN/model" or "stopped at step ..."
