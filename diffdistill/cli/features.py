"""`diffdistill features`: train a small classifier to be the feature network of a data set, or show one."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DiffdistillError, UsageError
from .common import refuse_existing_output

if TYPE_CHECKING:
    import torch

HELP = """\
Feature networks for FID/KID/IS/precision-recall on data sets Inception-v3 does not suit (8x8 digits, MNIST):
a small CNN trained on the data's labels; its penultimate layer gives the features, its head the IS logits.
`train` warns when the held-out accuracy is below 0.9 (such features separate the classes badly, so metrics
computed with them miss class structure; see metrics.features.POOR_ACCURACY).

examples:
  diffdistill features train --data mnist.npz --out mnist-classifier.safetensors
  diffdistill features info mnist-classifier.safetensors
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("features", help="train or inspect a classifier used as a feature network",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="features_command", metavar="SUBCOMMAND")
    t = sub.add_parser("train", help="train a classifier on a labelled image data set",
                       epilog="examples:\n"
                              "  diffdistill features train --data mnist.npz --out mnist-classifier.safetensors\n"
                              "  diffdistill features train --data cifar-10-python.tar.gz --out cifar-clf.safetensors "
                              "--xflip\n  diffdistill eval runs/mnist --metrics fid --features "
                              "mnist-classifier.safetensors --ref-data mnist.npz",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--data", required=True, metavar="SPEC", help="labelled data (digits, .npz, CIFAR)")
    t.add_argument("--out", required=True, metavar="FILE", help="output .safetensors (+ a .json beside)")
    t.add_argument("--epochs", type=int, default=10, help="passes over the training split")
    t.add_argument("--batch-size", type=int, default=128, help="images per step")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    t.add_argument("--holdout", type=float, default=0.1, help="fraction held out to measure accuracy")
    t.add_argument("--shift", type=int, default=None,
                   help="random translation in pixels (default: 1 for images <= 16 px, else 2)")
    t.add_argument("--xflip", action="store_true", help="random horizontal flips (natural images only)")
    t.add_argument("--max-n", type=int, default=None, help="use at most this many images")
    t.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    t.add_argument("--force", action="store_true", help="overwrite an existing --out (and its .json)")
    t.set_defaults(func=run_train)
    i = sub.add_parser("info", help="print a classifier's config and training record",
                       epilog="examples:\n  diffdistill features info digits\n"
                              "  diffdistill features info mnist-classifier.safetensors",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("file", metavar="FILE", help="a classifier .safetensors, 'digits' or an Inception .pth")
    i.set_defaults(func=run_info)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _load_labelled(spec: str, max_n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    from ..metrics.features import to_uint8
    from ..metrics.protocol import open_images

    ds = open_images(spec)
    n = len(ds) if max_n is None else min(max_n, len(ds))
    if getattr(ds, "label_dim", 0) == 0:
        raise DiffdistillError(f"{spec}: the data set has no class labels; a classifier needs them")
    images = torch.empty((n, *ds.shape), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.long)
    for k in range(n):
        x, y = ds[k]
        images[k], labels[k] = to_uint8(torch.as_tensor(x)), int(y)
    if int(labels.min()) < 0:
        raise DiffdistillError(f"{spec}: some images have no class label")
    return images, labels


def run_train(args) -> int:
    from ..metrics.features import (
        ClassifierTraining,
        accuracy_warning,
        preset_for,
        save_classifier,
        train_classifier,
        warn,
    )

    if args.epochs < 1 or args.batch_size < 1 or not 0 <= args.holdout < 1:
        raise UsageError("--epochs and --batch-size must be positive and --holdout in [0, 1)")
    weights = Path(args.out) if Path(args.out).suffix == ".safetensors" else Path(args.out).with_suffix(".safetensors")
    refuse_existing_output([weights, weights.with_suffix(".json")], args.force)   # what save_classifier writes
    images, labels = _load_labelled(args.data, args.max_n)
    shift = args.shift if args.shift is not None else (1 if images.shape[-1] <= 16 else 2)
    training = ClassifierTraining(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  holdout=args.holdout, shift=shift, xflip=args.xflip, seed=args.seed)
    config = preset_for(images.shape[1:], int(labels.max()) + 1)
    start = time.time()
    net, result = train_classifier(images, labels, config, training)
    meta = dict(data=args.data, training=asdict(training), seconds=round(time.time() - start, 1), **result)
    warning = accuracy_warning(result)
    if warning:
        meta["warning"] = warning
    path = save_classifier(net, args.out, meta)
    if warning:
        warn(f"{path}: {warning}")
    print(json.dumps(dict(out=str(path), holdout_accuracy=result["holdout_accuracy"],
                          n_holdout=result["n_holdout"], feature_dim=config.feature_dim,
                          **({"warning": warning} if warning else {}))))
    return 0


def run_info(args) -> int:
    from ..metrics.features import load_feature_net

    net = load_feature_net(args.file)
    config = asdict(net.config) if hasattr(net, "config") else None
    info = dict(**net.describe(), config=config, meta=getattr(net, "meta", {}))
    print(json.dumps(info, indent=2))
    return 0
