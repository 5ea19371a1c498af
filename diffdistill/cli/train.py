"""`diffdistill train-teacher`: train a diffusion model on a data set with the one loop."""

from __future__ import annotations

import argparse

from ..api import seed_everything
from ..errors import UsageError
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
    from ..presets import PRESETS

    p = subparsers.add_parser("train-teacher", help=teacher.HELP, description=teacher.HELP + ".",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="data set: folder, .zip, cifar-10-python.tar.gz, .npz, LMDB, digits, toy:ring8, gmm:PATH")
    p.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="network and loop settings (default: by data shape: toy for points, digits up to 8x8, "
                        "mnist up to 28x28, else cifar10)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--warmup", type=float, default=None, metavar="KIMG",
                   help="linear learning-rate warm-up in kimg (default: the preset's)")
    p.add_argument("--xflip", action="store_true", help="augment images with horizontal flips")
    add_loop_arguments(p, kimg=None, batch=None, default_note="the preset's",
                       ema_help="EMA half-life in kimg (default: the preset's)")
    g = p.add_argument_group("network (overrides of the preset's)")
    g.add_argument("--channels", type=int, default=None,
                   help="base channel count of a UNet (counts GroupNorm cannot split are refused up front); "
                        "width of the MLP")
    g.add_argument("--channel-mult", type=_int_list, default=None, metavar="M1,M2,...",
                   help="UNet channel multiplier per resolution level, e.g. 1,2,2 (one level each)")
    g.add_argument("--blocks", type=int, default=None, help="residual blocks per level (UNet), layers (MLP)")
    g.add_argument("--attn", type=_int_list, default=None, metavar="R1,R2,...|none",
                   help="UNet resolutions with self-attention, e.g. 16 or 8,16, or none")
    g.add_argument("--dropout", type=float, default=None, help="dropout probability in the residual blocks")
    teacher.add_arguments(p)
    p.set_defaults(func=run)


def _int_list(text: str) -> list[int]:
    """'1,2,2' -> [1, 2, 2]; 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (or 'none'), got {text!r}")
    return values


def default_preset(shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return "toy"
    size = max(shape[1:])
    return "digits" if size <= 8 else "mnist" if size <= 28 else "cifar10"


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
    on a CPU (issue 19 measured 17.7 s per step on a 2-core CPU)."""
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
    from ..data import open_dataset
    from ..methods import teacher
    from ..presets import get_preset, network_options, train_config
    from ..train.loop import train

    check_loop_arguments(args)
    if args.lr is not None and not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if args.warmup is not None and not args.warmup >= 0:
        raise UsageError(f"--warmup must be 0 (none) or positive, got {args.warmup}")
    data = open_dataset(args.data, xflip=args.xflip, use_labels=not args.uncond)
    if args.preset is None:
        args.preset = default_preset(tuple(data.shape))
    preset = get_preset(args.preset)
    evaluator = training_evaluator(args, tuple(data.shape))
    seed_everything(args.seed)             # the fresh network's initialisation too
    method = teacher.build(args, None, data)
    describe_network(preset.name, method.denoiser, tuple(data.shape), args.device)
    overrides = loop_settings(args)
    overrides.pop("out")
    meta = dict(data=args.data, xflip=args.xflip, preset=preset.name, loss=method.cfg.loss,
                prediction=method.cfg.prediction, schedule=method.cfg.schedule, weighting=method.cfg.weighting,
                sigma_data=method.cfg.sigma_data, label_dropout=method.cfg.label_dropout,
                lr=method.cfg.optim.lr, warmup_kimg=method.cfg.optim.warmup_kimg,
                label_dim=method.denoiser.label_dim, sample_steps=args.sample_steps,
                network=network_options(args))
    cfg = train_config(preset, args.out, meta=meta, **overrides)
    evaluate = training_evaluation(args, cfg, evaluator)
    result = train(method, cfg, data, evaluate=evaluate)
    from .distill import report_result

    return report_result(result)   # rank 0 only: "done: RUN/model" or "stopped at step ..."
