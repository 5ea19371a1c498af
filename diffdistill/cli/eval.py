"""`diffdistill eval` (FID, KID, IS, precision/recall, exact toy metrics) and `diffdistill ref-stats`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DiffdistillError, UsageError
from .common import refuse_existing_output

if TYPE_CHECKING:
    import torch

EVAL_HELP = """\
Evaluate a run, a snapshot or a set of images (folder, .zip, .npz).

A run directory (RUN/model) or snapshot is sampled by its own recipe from seeds SEED..SEED+N-1; image data
(a data set, a guided-diffusion sample batch `arr_0`, or what `diffdistill sample npz` writes: its raw samples
are clamped to [-1, 1] and quantised as `eval RUN` does) gives a random subset of N images, drawn with SEED as
EDM's fid.py does (all of them when it holds at most N). Images are streamed through the feature network and
compared with the reference: --ref (diffdistill's ref-stats, pytorch-fid/EDM statistics, a guided-diffusion
reference batch) or --ref-data (images; features computed now). A reference that records another feature
network (weights, resize, normalisation) is refused. Each number is printed with its protocol, e.g.
`fid-50k [Inception-v3 FID weights, tf1 resize]` or `fid-10k [digits classifier, not Inception]`.
Analytic data (toy:ring8, gmm:PATH.json) gets the exact metrics instead (mode shares, fraction within 3 std, NLL,
sliced Wasserstein).

examples:
  diffdistill eval runs/kd-digits --ref-data digits --features digits --metrics fid,kid,is,pr --n 2000
  diffdistill eval runs/cd/model --ref cifar10-32x32.npz --features inception --inception pt_inception.pth
  diffdistill eval runs/toy --ref-data toy:ring8 --n 10000
  # guided-diffusion's evaluator protocol: its sample and reference batches, 5000 images per IS split
  diffdistill eval samples_50000x64x64x3.npz --ref VIRTUAL_imagenet64_labeled.npz --metrics fid,is,pr \\
      --inception pt_inception.pth --is-split-size 5000
"""

N_INCEPTION, N_CLASSIFIER = 50_000, 10_000  # default sample counts: EDM's fid.py / the papers; small classifiers



def _add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default=None, metavar="NET",
                   help="feature network: digits, inception, or a classifier/Inception weight file "
                        "(default: digits for 8x8 grey images, else inception)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (or set $DIFFDISTILL_INCEPTION)")
    p.add_argument("--resize", default="tf1", choices=["tf1", "pytorch-fid"],
                   help="Inception's resize to 299: TF1 bilinear (torch-fidelity, TF FID) or pytorch-fid's")
    p.add_argument("--batch", type=int, default=256, help="images per batch (never changes the result)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show progress bars (default: on; --no-progress hides them)")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="measure FID/KID/IS/precision-recall or exact toy metrics",
                              description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="RUN_OR_FOLDER_OR_NPZ", help="run dir, snapshot dir, or image data spec")
    p.add_argument("--metrics", default=None,
                   help="comma-separated: fid, kid, is, pr (default fid; toy data: the exact metrics)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref", default=None, metavar="REF.npz", help="reference statistics (mu, sigma)")
    ref.add_argument("--ref-data", default=None, metavar="SPEC",
                     help="reference data set (features computed now), or toy:/gmm: analytic data")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of samples to generate / images to read (default: {N_INCEPTION} with Inception, "
                        f"as EDM's fid.py and the papers; {N_CLASSIFIER} with a classifier)")
    p.add_argument("--seed", type=int, default=0,
                   help="samples use seeds SEED..SEED+N-1; for image data, the seed of the random subset of N")
    p.add_argument("--ref-n", type=int, default=None,
                   help="images of --ref-data to use: a random subset drawn with --ref-seed (default: all)")
    p.add_argument("--ref-seed", type=int, default=0, help="seed of the --ref-n subset (default 0)")
    p.add_argument("--kid-subsets", type=int, default=100, help="KID: number of subsets")
    p.add_argument("--kid-subset-size", type=int, default=1000,
                   help="KID: samples per subset (lowered to the number of samples when fewer)")
    p.add_argument("--kid-seed", type=int, default=0, help="KID: seed of the random subsets (default 0)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--is-splits", type=int, default=10,
                       help="Inception Score: this many equal splits (default 10: the original code, EDM, StyleGAN)")
    split.add_argument("--is-split-size", type=int, default=None, metavar="N",
                       help="Inception Score: splits of N images instead (guided-diffusion/ADM: 5000)")
    p.add_argument("--pr-k", type=int, default=3, help="precision/recall: k of the k-NN radii")
    p.add_argument("--out", default=None, metavar="result.json", help="write the JSON records here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    _add_feature_args(p)
    p.set_defaults(func=run_eval)

    r = subparsers.add_parser("ref-stats", help="write reference FID statistics (mu, sigma) of a data set",
                              description="Compute the feature mean and covariance of a data set and write "
                                          "them as .npz (mu, sigma; the pytorch-fid/EDM layout), with a record "
                                          "of the feature network (name, weights sha256, resize, "
                                          "normalisation) that `eval` checks, and of the images used.",
                              epilog="examples:\n  diffdistill ref-stats digits --features digits --out digits-ref.npz "
                                     "--save-features\n  diffdistill ref-stats cifar10-32x32.zip --features inception "
                                     "--inception pt_inception-2015-12-05-6726825d.pth --out cifar10-ref.npz",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("data", metavar="DATA", help="data set spec (folder, .zip, .npz, CIFAR tarball, digits)")
    r.add_argument("--out", required=True, metavar="FILE.npz", help="output file")
    r.add_argument("--force", action="store_true", help="overwrite an existing --out")
    r.add_argument("--n", type=int, default=None,
                   help="use a random subset of N images, drawn with --seed as EDM does (default: all)")
    r.add_argument("--seed", type=int, default=0, help="seed of the --n subset (default 0)")
    r.add_argument("--save-features", action="store_true",
                   help="also store the features (needed for KID and precision/recall against this file)")
    _add_feature_args(r)
    r.set_defaults(func=run_ref_stats)


# --------------------------------------------------------------------------------------------------


def _device(name: str | None) -> torch.device:
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _default_features(shape) -> str:
    return "digits" if tuple(shape) == (1, 8, 8) else "inception"


def _snapshot_dir(target: str) -> Path | None:
    """The snapshot directory of a run (RUN/latest when interrupted, else RUN/model) or snapshot, or None when
    `target` is image data."""
    from ..io import find_snapshot

    snapshot = find_snapshot(target)   # RUN/latest of an interrupted run, else RUN/model
    if snapshot is not None:
        return snapshot
    path = Path(target)
    if path.is_dir() and not any(path.iterdir()):
        raise DiffdistillError(f"{path}: empty directory (not a run, a snapshot or an image folder)")
    return None


def _command(args, name: str, positional: str) -> str:
    """The command line that reproduces this result (rebuilt from the parsed options)."""
    parts = ["diffdistill", name, str(getattr(args, positional))]
    for key, value in sorted(vars(args).items()):
        if key in (positional, "func", "command", "debug", "argv") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def _print_table(records: list[dict]) -> None:
    width = max([28] + [len(r.get("label") or r["metric"]) for r in records])
    print(f"{'metric':<{width}} {'value':>14} {'std':>10} {'true':>12} {'n':>7}")
    for r in records:
        value = r["value"]
        std = r.get("std")
        true = r.get("true_value")
        print(f"{r.get('label') or r['metric']:<{width}} {value:>14.6g} {'' if std is None else f'{std:.3g}':>10} "
              f"{'' if true is None else f'{true:.6g}':>12} {r['n']:>7}")


def _positive(name: str, value) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be positive, got {value}")


def run_eval(args) -> int:
    import torch

    from .. import dist
    from ..io import atomic_write_json, load_snapshot
    from ..metrics import protocol
    from ..metrics.features import dataset_batches, load_feature_net, subset_indices
    from ..samplers import sample_batches
    from ..teachers.analytic import GaussianMixture, is_analytic_spec, load_analytic

    for name in ("n", "ref_n", "kid_subsets", "kid_subset_size", "is_splits", "is_split_size", "pr_k", "batch"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.out:
        refuse_existing_output([args.out], args.force)      # before any work
    dist.init_from_env(args.device)
    device = _device(args.device)
    if dist.is_dist() and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    snap_path = _snapshot_dir(args.target)
    progress = args.progress and dist.is_main()

    if snap_path is not None:
        denoiser, sampling, meta = load_snapshot(snap_path, device=device)
        shape = tuple(denoiser.shape)
        is_points = len(shape) != 3
        analytic = args.ref_data if args.ref_data and is_analytic_spec(args.ref_data) else None
        if analytic is None and is_points:
            data_spec = meta.get("data") if isinstance(meta, dict) else None
            if isinstance(data_spec, str) and is_analytic_spec(data_spec):
                analytic = data_spec
            elif isinstance(denoiser, GaussianMixture):
                analytic = denoiser
            else:
                raise DiffdistillError(f"{snap_path}: samples of shape {shape} are points; give their "
                                       "analytic data with --ref-data toy:NAME or gmm:PATH.json")
        if analytic is not None:
            # Exact toy metrics: no feature network, the true density is the reference.
            if args.metrics not in (None, "toy"):
                raise UsageError("analytic data gets the exact toy metrics: leave out --metrics")
            args.n = args.n or N_CLASSIFIER
            seeds = list(range(args.seed, args.seed + args.n))
            gmm = analytic if isinstance(analytic, GaussianMixture) else load_analytic(analytic)
            samples = sample_batches(denoiser, protocol.rank_shard(seeds), sampling, device, args.batch, clamp=False)
            values = protocol.evaluate_toy(samples, gmm, seed=args.seed)
            ref_name = analytic if isinstance(analytic, str) else (gmm.name or "the snapshot's own mixture")
            records = protocol.toy_records(values, seeds=seeds, ref_name=ref_name,
                                           command=_command(args, "eval", "target"), target=args.target,
                                           sampling=sampling)
            return _finish(records, args, atomic_write_json, dist)
    else:
        if args.ref_data and is_analytic_spec(args.ref_data):
            raise UsageError("exact toy metrics need a run or snapshot to sample, not a data set")
        ds = protocol.open_images(args.target)
        shape = tuple(ds.shape)

    names = protocol.parse_metrics(args.metrics or "fid")
    if "toy" in names:
        raise UsageError("the exact toy metrics need analytic data: --ref-data toy:NAME or gmm:PATH.json")
    net = load_feature_net(args.features or _default_features(shape), inception=args.inception, device=device,
                           resize=args.resize)
    net.check_images(torch.zeros((1, *shape), dtype=torch.uint8))
    args.n = args.n or (N_INCEPTION if net.name == "inception" else N_CLASSIFIER)
    ref = None
    if args.ref:
        ref = protocol.reference_from_file(args.ref)
        protocol.check_reference(ref, net)
        if {"kid", "pr"} & set(names):
            protocol.reference_features(ref, net, args.batch, progress)
    elif args.ref_data:
        ref = protocol.reference_from_data(args.ref_data, net, args.ref_n, args.batch, progress, args.ref_seed)

    if snap_path is not None:
        seeds = list(range(args.seed, args.seed + args.n))
        images = sample_batches(denoiser, protocol.rank_shard(seeds), sampling, device, args.batch, clamp=True)
        source, count = str(snap_path), len(protocol.rank_shard(seeds))
        extra_info = dict(sampling=sampling)
    else:
        idx = subset_indices(len(ds), args.n, args.seed)
        if len(idx) < args.n:
            print(f"note: {args.target} holds {len(ds)} images; using all of them", file=sys.stderr)
        extra_info = protocol.describe_subset(len(ds), idx, args.seed)
        seeds = None  # images of a data set: the record names their items (and the subset seed) instead
        if getattr(ds, "seeds", None) is not None:  # `sample npz` output: the samples' own seeds
            seeds = [int(s) for s in ds.seeds[idx]]
        if getattr(ds, "layout", None):
            extra_info.update(layout=ds.layout, conversion=ds.note)
            if dist.is_main():
                print(f"note: {args.target}: {ds.note}", file=sys.stderr)
        w, r = dist.world_size(), dist.rank()
        shard = idx[r * len(idx) // w:(r + 1) * len(idx) // w]
        images = dataset_batches(ds, args.batch, indices=shard)
        source, count = args.target, len(shard)

    command = _command(args, "eval", "target")
    options = protocol.MetricOptions(args.kid_subsets, args.kid_subset_size, args.is_splits, args.pr_k,
                                     args.kid_seed, args.is_split_size)
    results, n = protocol.evaluate(images, names, net, ref, options, source=source, limit=count, progress=progress)
    ref_info = ref.describe() if ref is not None else None
    records = [protocol.result_record(name, r.pop("value"), n=n, seeds=seeds, ref=ref_info,
                                      feature_net=net.describe(), command=command, target=args.target,
                                      **extra_info, **r)
               for name, r in results.items()]
    return _finish(records, args, atomic_write_json, dist)


def _finish(records, args, atomic_write_json, dist) -> int:
    if dist.is_main():
        _print_table(records)
        if args.out:
            atomic_write_json(args.out, dict(records=records))
            print(f"wrote {args.out}")
    return 0


def run_ref_stats(args) -> int:
    import datetime

    from ..metrics import protocol
    from ..metrics.features import compute_features, dataset_batches, load_feature_net, subset_indices
    from ..metrics.fid import feature_stats, save_ref_stats

    device = _device(args.device)
    if not args.out.endswith(".npz"):
        raise UsageError(f"--out must end in .npz, got {args.out}")
    if args.n is not None and args.n < 2:
        raise UsageError(f"--n must be at least 2, got {args.n}")
    refuse_existing_output([args.out], args.force)          # before any work
    ds = protocol.open_images(args.data)
    net = load_feature_net(args.features or _default_features(ds.shape), inception=args.inception,
                           device=device, resize=args.resize)
    idx = subset_indices(len(ds), args.n, args.seed)
    feats, _ = compute_features(net, dataset_batches(ds, args.batch, indices=idx), source=args.data, gather=False,
                                limit=len(idx), progress=args.progress)
    mu, sigma = feature_stats(feats)
    meta = dict(data=args.data, n=len(feats), **protocol.describe_subset(len(ds), idx, args.seed),
                feature_net=net.describe(), command=_command(args, "ref-stats", "data"),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if getattr(ds, "layout", None):
        meta.update(layout=ds.layout, conversion=ds.note)
    save_ref_stats(args.out, mu, sigma, feats if args.save_features else None, meta)
    print(json.dumps(dict(out=args.out, n=len(feats), feature_dim=int(mu.shape[0]), feature_net=net.label(),
                          items=meta["items"])))
    return 0
