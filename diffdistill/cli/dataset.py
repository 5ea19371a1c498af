"""`diffdistill dataset info SPEC` and `diffdistill dataset convert SRC DEST`: thin wrappers of `data`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import DiffdistillError, UsageError

SPEC_HELP = ("SPEC is a folder of images (class folders SRC/<class>/... give labels), a .zip (EDM layout), "
             "cifar-10-python.tar.gz, a .npz, an LMDB folder (LSUN's, or sized keys SIZE-00000 + length as "
             "progressive distillation's prepare_data.py writes: pick a size with DB?size=64), 'digits', "
             "'toy:ring8' or 'gmm:PATH.json'; options after '?', e.g. mnist.npz?split=test")

TRANSFORM_HELP = ("how images of another size become WxH, as EDM's dataset_tool: center-crop (the largest centred "
                  "square, resized), center-crop-wide (the centred band of the WxH aspect, resized, padded with "
                  "black to WxW; smaller images are skipped); without it an image is only resized, and only when "
                  "its aspect is W:H")

SIZE_SAMPLE = 100  # image headers `dataset info` reads without --check, spread over the data set


DATASET_EXAMPLES = """\
examples:
  diffdistill dataset info digits
  diffdistill dataset info ~/data/cifar-10-python.tar.gz
  diffdistill dataset info ~/data/ffhq --resolution 64x64 --check
  diffdistill dataset convert ~/data/cifar-10-python.tar.gz cifar10-32x32.zip
  diffdistill dataset convert ~/data/imagenet/train imagenet-64x64.zip --resolution 64x64 --transform center-crop
  diffdistill dataset convert ~/data/lsun/church_outdoor_train_lmdb church-64x64.zip --resolution 64x64 \\
      --transform center-crop
  diffdistill dataset convert ~/data/lsun/cat_lmdb cat-256x256.zip --resolution 256x192 --transform center-crop-wide
  diffdistill dataset convert ~/data/celeba celeba-64_lmdb --resolution 64x64 --transform center-crop
  diffdistill dataset info celeba-64_lmdb
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dataset", help="inspect a data set, or convert one to the EDM zip/folder layout or an LMDB",
        description="Inspect a data set, or convert one to the EDM/StyleGAN layout (PNG + dataset.json, as a zip "
                    "or a folder) or to an LMDB (sized keys, as progressive distillation's prepare_data.py).",
        epilog=DATASET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    info = actions.add_parser("info", help="print size, shape, image sizes and labels of a data set",
                              description=SPEC_HELP,
                              epilog=DATASET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("spec", metavar="SPEC", help="the data set")
    info.add_argument("--resolution", metavar="WxH", help="the size after --transform, e.g. 64x64 (or 64)")
    info.add_argument("--transform", choices=("center-crop", "center-crop-wide"), help=TRANSFORM_HELP)
    info.add_argument("--check", action="store_true",
                      help=f"open every image header (finds unreadable images and every size; without it the "
                           f"sizes of {SIZE_SAMPLE} images spread over the data set are shown)")
    info.set_defaults(func=run_info)

    convert = actions.add_parser("convert", help="write a data set as an EDM zip or folder, or an LMDB",
                                 description=SPEC_HELP,
                                 epilog=DATASET_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("src", metavar="SRC", help="the data set to read")
    convert.add_argument("dest", metavar="DEST",
                         help="what to write (atomically): NAME.zip (EDM zip), NAME.lmdb or NAME_lmdb (an LMDB "
                              "folder), a name without a suffix (an EDM folder); or say it with --format")
    convert.add_argument("--format", choices=("zip", "folder", "lmdb"), help="the output format (default: by DEST)")
    convert.add_argument("--resolution", metavar="WxH",
                         help="the output size, e.g. 64x64 (or 64); needed when image sizes differ")
    convert.add_argument("--transform", choices=("center-crop", "center-crop-wide"), help=TRANSFORM_HELP)
    convert.add_argument("--max-size", type=int, metavar="N",
                         help="keep a random subset of N images (seed 0)")
    convert.add_argument("--no-labels", action="store_true", help="write 'labels': null")
    convert.add_argument("--force", action="store_true", help="replace DEST if it exists")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(func=run_convert)


def _resize_options(args: argparse.Namespace) -> tuple[tuple[int, int] | None, str]:
    """(width, height) or None, and the ImageDataset transform, from --resolution and --transform."""
    from ..data.images import check_transform, parse_resolution

    if args.resolution is None:
        if args.transform is not None:
            raise UsageError(f"--transform {args.transform} needs --resolution WxH")
        return None, "center-crop"   # the library's default; it applies to nothing without a resolution
    try:
        size = parse_resolution(args.resolution)
    except DiffdistillError:
        raise UsageError(f"--resolution {args.resolution}: expected WxH with positive sizes, e.g. 64x64 "
                         "(or one size, 64)") from None
    transform = args.transform or "resize"  # no transform: resize only, and only at the same aspect
    try:
        check_transform(size, transform)
    except DiffdistillError as e:
        raise UsageError(f"--resolution {args.resolution} --transform {transform}: {e}") from None
    return size, transform


def _open(spec, args: argparse.Namespace, **kwargs):
    from ..data import open_dataset

    size, transform = _resize_options(args)
    return open_dataset(spec, resolution=size, transform=transform, **kwargs)


def _size_list(counts: dict[tuple[int, int], int]) -> str:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in ranked[:8])
    return text + (f" and {len(ranked) - 8} more sizes" if len(ranked) > 8 else "")


def run_info(args: argparse.Namespace) -> int:
    import numpy as np

    from ..data.images import image_sizes

    ds = _open(args.spec, args)
    kind = "points" if ds.source.kind == "points" else "images"
    print(f"name:    {ds.name}")
    print(f"source:  {ds.source.where}")
    for note in ds.source.notes:
        print(f"read:    {note}")
    print(f"items:   {len(ds)} {kind}")
    print(f"shape:   {ds.shape}" + (f" (resolution {ds.resolution})" if ds.resolution else ""))
    counts = {}
    if kind == "images":
        counts, looked, unique = image_sizes(ds, None if args.check else SIZE_SAMPLE)
        scope = f"all {looked}" if looked == unique else f"{looked} of {unique} spread over the data set"
        print(f"sizes:   {_size_list(counts)}  [{scope}]")
    if ds.label_dim:
        counts_by_class = np.bincount(ds.labels, minlength=ds.label_dim).tolist()
        print(f"labels:  {ds.label_dim} classes, counts {counts_by_class}")
        if ds.class_names:
            names = ", ".join(ds.class_names[:10]) + (", ..." if len(ds.class_names) > 10 else "")
            print(f"classes: {names}")
    else:
        print("labels:  none")
    if args.check:
        same = " and of one size" if len(counts) == 1 else ""
        print(f"check:   every image header is readable{same}")
    if len(counts) > 1:
        what = (f"--resolution makes them all {ds.shape[2]}x{ds.shape[1]}" if args.resolution else
                "training needs one size: convert with --resolution WxH (and --transform center-crop or "
                "center-crop-wide)")
        print(f"warning: images of {len(counts)} sizes: {_size_list(counts)}; {what}", file=sys.stderr)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..data.images import dest_format, write_dataset

    dest = Path(args.dest)
    try:
        fmt = dest_format(dest, args.format)
    except DiffdistillError as e:
        raise UsageError(str(e)) from None
    src = Path(args.src.split("?", 1)[0]).expanduser()
    if src.exists() and dest.exists() and src.resolve() == dest.resolve():
        raise UsageError(f"{dest}: the destination is the source")
    if args.max_size is not None and args.max_size < 1:
        raise UsageError(f"--max-size must be positive, got {args.max_size}")
    if (dest.exists() or dest.is_symlink()) and not args.force:  # before reading anything
        raise DiffdistillError(f"{dest}: already exists; pass --force to replace it")
    size, _ = _resize_options(args)
    ds = _open(args.src, args, use_labels=not args.no_labels, max_size=args.max_size)
    result = write_dataset(ds, dest, fmt, progress=not args.no_progress, force=args.force)
    labels = f"{ds.label_dim} classes" if ds.label_dim else "no labels"
    if ds.class_names and ds.source.notes:
        labels += f" ({ds.source.notes[0]})"
    print(f"wrote {dest} ({result.format}): {result.count} images of shape {ds.shape}, {labels}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} images too small for center-crop-wide to {size[0]}x{size[1]} "
              f"(first: {result.skipped[0]})")
    return 0
