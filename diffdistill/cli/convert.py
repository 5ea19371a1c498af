"""`diffdistill convert FORMAT ...`: turn a foreign checkpoint into a snapshot (safetensors + JSON).

Each format is a sub-subcommand; add one by writing an `_add_<format>(subparsers)` function and listing it in
`FORMATS`.
"""

from __future__ import annotations

import argparse


def _run_edm(args) -> int:
    import json

    from ..io import SNAPSHOT_JSON
    from ..teachers.edm import EDM_SAMPLING, convert_edm_pickle

    out = convert_edm_pickle(args.pkl, args.out, key=args.key)
    meta = json.loads((out / SNAPSHOT_JSON).read_text())["meta"]
    print(f"converted {args.pkl} ({meta['edm_precond']}/{meta['edm_network']}, "
          f"{meta['num_parameters'] / 1e6:.2f}M parameters, {meta['num_tensors']} tensors) -> {out}  "
          f"[sampling: {EDM_SAMPLING}]")
    return 0


def _add_edm(sub) -> None:
    p = sub.add_parser(
        "edm",
        help="an NVlabs/edm pickle (network-snapshot-*.pkl or a published edm-*.pkl)",
        description="Convert an EDM pickle into a snapshot without executing it: only tensors, the "
                    "network's constructor arguments and its preconditioning are read; the pickled source "
                    "code is ignored. EDMPrecond/VPPrecond/VEPrecond around SongUNet (DDPM++/NCSN++) or "
                    "DhariwalUNet (ADM) are supported. The snapshot samples with EDM's 18-step Heun sampler "
                    "by default.",
        epilog="examples:\n  diffdistill convert edm edm-cifar10-32x32-uncond-vp.pkl teachers/edm-cifar10-uncond\n"
               "  diffdistill convert edm network-snapshot-200000.pkl teachers/mine --key ema\n"
               "  diffdistill sample figures grid.png teachers/edm-cifar10-uncond   # Heun, 18 steps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pkl", help="the EDM .pkl file")
    p.add_argument("out", help="output snapshot directory (must not exist, or be empty)")
    p.add_argument("--key", default="ema", help="which network of the pickle to convert (default: ema)")
    p.set_defaults(func=_run_edm)


FORMATS = [_add_edm]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a foreign checkpoint (EDM pickle, ...) into a snapshot",
        description="Convert a foreign checkpoint into a diffdistill snapshot directory "
                    "(model.safetensors + model.json). Nothing is written if anything fails.",
        epilog="examples:\n  diffdistill convert edm edm-cifar10-32x32-uncond-vp.pkl teachers/edm-cifar10-uncond",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="format", metavar="FORMAT", required=True, parser_class=type(parser))
    for add in FORMATS:
        add(sub)
