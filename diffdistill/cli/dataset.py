"""`diffdistill dataset info SPEC` and `diffdistill dataset convert SRC DEST.zip`: thin wrappers of `data`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import UsageError

SPEC_HELP = ("SPEC is a folder of images, a .zip (EDM layout), cifar-10-python.tar.gz, a .npz, an LMDB "
             "folder, 'digits', 'toy:ring8' or 'gmm:PATH.json'; options after '?', e.g. mnist.npz?split=test")


DATASET_EXAMPLES = """\
examples:
  diffdistill dataset info digits
  diffdistill dataset info ~/data/cifar-10-python.tar.gz
  diffdistill dataset info ~/data/ffhq --resolution 64 --check
  diffdistill dataset convert ~/data/cifar-10-python.tar.gz cifar10-32x32.zip
  diffdistill dataset convert ~/data/lsun/church_outdoor_train_lmdb church-64x64.zip --resolution 64
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dataset", help="inspect a data set, or convert one to the EDM zip layout",
        description="Inspect a data set, or convert one to the EDM/StyleGAN zip layout (PNG + dataset.json).",
        epilog=DATASET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    info = actions.add_parser("info", help="print size, shape and labels of a data set",
                              description=SPEC_HELP,
                              epilog=DATASET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("spec", metavar="SPEC", help="the data set")
    info.add_argument("--resolution", type=int, metavar="R", help="centre-crop and resize to R x R")
    info.add_argument("--check", action="store_true",
                      help="open every image header now (finds unreadable images and mixed sizes)")
    info.set_defaults(func=run_info)

    convert = actions.add_parser("convert", help="write a data set as an EDM zip (PNG + dataset.json)",
                                 description=SPEC_HELP,
                              epilog=DATASET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("src", metavar="SRC", help="the data set to read")
    convert.add_argument("dest", metavar="DEST.zip", help="the zip to write (atomically)")
    convert.add_argument("--resolution", type=int, metavar="R",
                         help="centre-crop and resize to R x R (needed when image sizes differ)")
    convert.add_argument("--max-size", type=int, metavar="N",
                         help="keep a random subset of N images (seed 0)")
    convert.add_argument("--no-labels", action="store_true", help="write 'labels': null")
    convert.set_defaults(func=run_convert)


def _open(spec, args: argparse.Namespace, **kwargs):
    from ..data import open_dataset

    if args.resolution is not None and args.resolution < 1:
        raise UsageError(f"--resolution must be positive, got {args.resolution}")
    return open_dataset(spec, resolution=args.resolution, **kwargs)


def run_info(args: argparse.Namespace) -> int:
    ds = _open(args.spec, args, check=args.check)
    kind = "points" if ds.source.kind == "points" else "images"
    print(f"name:    {ds.name}")
    print(f"source:  {ds.source.where}")
    print(f"items:   {len(ds)} {kind}")
    print(f"shape:   {ds.shape}" + (f" (resolution {ds.resolution})" if ds.resolution else ""))
    if ds.label_dim:
        counts = np.bincount(ds.labels, minlength=ds.label_dim).tolist()
        print(f"labels:  {ds.label_dim} classes, counts {counts}")
    else:
        print("labels:  none")
    if args.check:
        same = "" if args.resolution else " and of the same size"
        print(f"check:   every image header is readable{same}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..data import write_edm_zip

    dest = Path(args.dest)
    if dest.suffix.lower() != ".zip":
        raise UsageError(f"{dest}: the destination must be a .zip file")
    if Path(args.src).exists() and Path(args.src).resolve() == dest.resolve():
        raise UsageError(f"{dest}: the destination is the source")
    if args.max_size is not None and args.max_size < 1:
        raise UsageError(f"--max-size must be positive, got {args.max_size}")
    ds = _open(args.src, args, use_labels=not args.no_labels, max_size=args.max_size)
    write_edm_zip(ds, dest, progress=True)
    print(f"wrote {dest}: {len(ds)} images of shape {ds.shape}, "
          + (f"{ds.label_dim} classes" if ds.label_dim else "no labels"))
    return 0
