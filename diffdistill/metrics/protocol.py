"""The evaluation protocol shared by `diffdistill eval` and evaluation during training.

Samples are generated from per-sample seeds (image k depends on seed k only), streamed through a feature
network
and compared with a reference; every number becomes a JSON record saying what was measured, on how many
samples, from which seeds, against which reference file (sha256), with which feature network (weights sha256),
by which command and when.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffdistillError
from . import fid as fid_lib
from .features import FeatureNet, compute_features, dataset_batches, load_feature_net, sha256_file
from .inception_score import inception_score
from .kid import kid
from .precision_recall import precision_recall
from .toy import toy_metrics

IMAGE_METRICS = ("fid", "kid", "is", "pr")
TOY_SCALARS = ("mode_share_max_error", "modes_covered", "within_3std", "nll", "sliced_w2")
TOY_TRUE = {"mode_share_max_error": 0.0, "within_3std": "within_3std_true", "nll": "nll_true",
            "sliced_w2": "sliced_w2_noise_floor", "modes_covered": "num_modes"}


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in IMAGE_METRICS + ("toy",)]
    if unknown or not names:
        raise DiffdistillError(f"unknown metric {unknown[0] if unknown else text!r} "
                               f"(choose from {', '.join(IMAGE_METRICS)}, toy)")
    return list(dict.fromkeys(names))


@dataclass
class MetricOptions:
    """Settings of the image metrics (defaults: the usual published protocols)."""

    kid_subsets: int = 100           # number of random subsets KID averages over
    kid_subset_size: int = 1000      # rows per subset (torch-fidelity's default); lowered to the sample count
    is_splits: int = 10              # Inception Score splits
    pr_k: int = 3                    # k of the k-NN manifolds of precision/recall
    seed: int = 0                    # seed of the KID subsets


@dataclass
class Reference:
    """What image metrics compare against: FID statistics and, for KID/PR, the reference features."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    source: str | None = None         # the .npz file or the data spec
    sha256: str | None = None         # of the .npz file (None for a data spec)
    meta: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return dict(ref=self.source, ref_sha256=self.sha256, ref_n=self.meta.get("n"))


def reference_from_file(path: str | os.PathLike) -> Reference:
    """A reference `.npz` (mu, sigma; optionally features and meta)."""
    mu, sigma = fid_lib.load_ref_stats(path)
    features, meta = fid_lib.load_ref_extras(path)
    if features is not None and features.shape[1] != mu.shape[0]:
        raise DiffdistillError(f"{path}: 'features' have {features.shape[1]} dims but mu has {mu.shape[0]}")
    return Reference(mu, sigma, features, str(path), sha256_file(path), meta)


def reference_from_features(features: np.ndarray, source: str | None = None,
                            meta: dict | None = None) -> Reference:
    mu, sigma = fid_lib.feature_stats(features)
    return Reference(mu, sigma, features, source, None, dict(meta or {}, n=len(features)))


def open_images(spec: str):
    """A data set of images through `diffdistill.data.open_dataset` (a clear error for point data)."""
    from ..data import open_dataset

    ds = open_dataset(spec)
    if len(ds.shape) != 3:
        raise DiffdistillError(f"{spec}: image metrics need images [C, H, W], this data set holds shape "
                               f"{tuple(ds.shape)} (use the exact toy metrics for points)")
    return ds


def reference_from_data(spec: str, feature_net: FeatureNet, n: int | None = None, batch: int = 256,
                        progress: bool = False) -> Reference:
    """Features of (the first `n` items of) a data set; every rank computes them all."""
    ds = open_images(spec)
    feats, _ = compute_features(feature_net, dataset_batches(ds, batch, n), source=spec, gather=False,
                                progress=progress)
    return reference_from_features(feats, spec, dict(feature_net=feature_net.describe()))


def image_metrics(names: Sequence[str], features: np.ndarray, logits: np.ndarray | None,
                  ref: Reference | None, options: MetricOptions | None = None,
                  source: str | None = None) -> dict[str, dict]:
    """{metric: {'value': ..., extras}} for fid, kid, is, pr of generated features (and logits)."""
    options = options or MetricOptions()
    where = f"{source}: " if source else ""
    out: dict[str, dict] = {}
    for name in names:
        if name in ("fid", "kid", "pr") and ref is None:
            raise DiffdistillError(f"{name} needs a reference (--ref FILE.npz or --ref-data SPEC)")
        if name in ("fid", "kid", "pr") and ref.mu.shape[0] != features.shape[1]:
            raise DiffdistillError(f"{where}features have {features.shape[1]} dims but the reference "
                                   f"{ref.source} has {ref.mu.shape[0]} (made with another feature network?)")
        if name == "fid":
            stats = fid_lib.feature_stats(features)
            out["fid"] = dict(value=fid_lib.fid_from_stats(stats, (ref.mu, ref.sigma)))
        elif name in ("kid", "pr"):
            if ref.features is None:
                raise DiffdistillError(f"{name} needs the reference features: use --ref-data SPEC, or a "
                                       f"reference file written by `ref-stats --save-features` ({ref.source} "
                                       "has only mu/sigma)")
            if name == "kid":
                size = min(options.kid_subset_size, len(features), len(ref.features))
                mean, std = kid(features, ref.features, options.kid_subsets, size, options.seed)
                out["kid"] = dict(value=mean, std=std, subsets=options.kid_subsets, subset_size=size)
            else:
                pr = precision_recall(ref.features, features, options.pr_k)
                out["precision"] = dict(value=pr["precision"], k=options.pr_k)
                out["recall"] = dict(value=pr["recall"], k=options.pr_k)
        elif name == "is":
            if logits is None:
                raise DiffdistillError("the Inception Score needs a feature network with class logits")
            mean, std = inception_score(logits, options.is_splits)
            out["is"] = dict(value=mean, std=std, splits=options.is_splits)
    return out


# --------------------------------------------------------------------------------------------------
# Sampling a denoiser by its recipe


def seed_labels(seeds: Sequence[int], label_dim: int) -> torch.Tensor | None:
    """Class labels of class-conditional sampling: seed % label_dim (balanced, a function of the seed)."""
    return None if label_dim == 0 else torch.tensor([int(s) % label_dim for s in seeds], dtype=torch.long)


def generate(denoiser, sampling: dict, seeds: Sequence[int], device="cpu", batch: int = 256,
             clamp: bool = True) -> Iterator[torch.Tensor]:
    """Sample batches following a snapshot's recipe ({"sampler", "steps"} or explicit "sigmas"; other keys are
    sampler options), clamped to [-1, 1] for images."""
    from ..samplers import iter_samples

    recipe = dict(sampling or {})
    sampler, steps = recipe.pop("sampler", None), recipe.pop("steps", None)
    sigmas = recipe.pop("sigmas", None)
    labels = seed_labels(seeds, getattr(denoiser, "label_dim", 0))
    for x in iter_samples(denoiser, list(seeds), steps=steps, sampler=sampler, sigmas=sigmas, cond=labels,
                          device=device, batch=batch, **recipe):
        yield x.clamp(-1, 1) if clamp else x


def rank_shard(seeds: Sequence[int]) -> list[int]:
    """This rank's contiguous block of the seeds, so that gathering in rank order restores the seed order."""
    from ..train.dist import rank, world_size

    n, r, w = len(seeds), rank(), world_size()
    return list(seeds)[r * n // w:(r + 1) * n // w]


def module_device(module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Records


def describe_seeds(seeds: Sequence[int]) -> str | list[int]:
    """'A-B' for a contiguous range (inclusive), else the list."""
    seeds = [int(s) for s in seeds]
    if seeds and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return seeds


def result_record(metric: str, value, *, n: int, seeds, ref: dict | None = None,
                  feature_net: dict | None = None, command: str | None = None, **extra) -> dict:
    """One result: metric, value, sample count, seeds, reference and feature network (with sha256), command,
    time (UTC, ISO 8601), plus any extras (e.g. std, subset size, the true value of an exact metric)."""
    return dict(metric=metric, value=value, n=int(n),
                seeds=describe_seeds(seeds) if seeds is not None else None,
                **(ref or dict(ref=None, ref_sha256=None)), feature_net=feature_net,
                command=command if command is not None else " ".join(sys.argv),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra)


def toy_records(values: dict, *, seeds, ref_name: str, command: str | None = None, **common) -> list[dict]:
    """Records of the scalar exact toy metrics, each with its true value beside it."""
    records = []
    for name in TOY_SCALARS:
        true = TOY_TRUE[name]
        extra = dict(common, true_value=true if isinstance(true, float) else values[true])
        if name == "mode_share_max_error":
            extra.update(mode_share=values["mode_share"], mode_weight=values["mode_weight"],
                         binomial_se=values["mode_share_max_se"])
        records.append(result_record(f"toy/{name}", values[name], n=values["n"], seeds=seeds,
                                     ref=dict(ref=ref_name, ref_sha256=None), feature_net=None,
                                     command=command, **extra))
    return records


# --------------------------------------------------------------------------------------------------
# Evaluation during training


def make_train_evaluator(metric: str | Sequence[str], feature_net: FeatureNet | str | None = None, ref=None,
                         n: int = 10_000, seeds: Sequence[int] | None = None, *, batch: int = 256,
                         inception: str | None = None, options: MetricOptions | None = None
                         ) -> Callable[..., dict]:
    """`evaluate(method, ema, nimg) -> {name: float}` for the training loop's evaluation hook.

    metric: 'fid', 'kid', 'is', 'pr' (comma-separated or a list) or 'toy'. ref: a reference `.npz`, a data
    spec,
    a `Reference`, or, for 'toy', a `GaussianMixture` or an analytic spec. The student is
    `method.export(ema)`,
    sampled by its own recipe from `seeds` (default 0..n-1), split across ranks; every rank returns the same
    dict.
    """
    from ..teachers.analytic import GaussianMixture, is_analytic_spec, load_analytic

    names = parse_metrics(metric)
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) < n:
        raise DiffdistillError(f"evaluation needs {n} seeds, got {len(seeds)}")
    seeds = seeds[:n]
    if "toy" in names:
        if names != ["toy"]:
            raise DiffdistillError("the exact 'toy' metrics cannot be combined with image metrics")
        if isinstance(ref, str) and is_analytic_spec(ref):
            ref = load_analytic(ref)
        if not isinstance(ref, GaussianMixture):
            raise DiffdistillError("the 'toy' metrics need the analytic data (a GaussianMixture or a "
                                   "toy:/gmm: spec)")
    else:
        if isinstance(feature_net, str) or feature_net is None:
            feature_net = load_feature_net(feature_net or "inception", inception=inception)
        if isinstance(ref, (str, os.PathLike)):
            ref = reference_from_file(ref) if Path(ref).suffix == ".npz" and Path(ref).is_file() \
                else reference_from_data(str(ref), feature_net)
    options = options or MetricOptions()

    @torch.no_grad()
    def evaluate(method, ema=None, nimg: int | None = None) -> dict:
        denoiser, sampling = method.export(ema)
        was_training = denoiser.training
        denoiser.eval()
        try:
            device = module_device(denoiser)
            batches = generate(denoiser, sampling, rank_shard(seeds), device, batch, clamp="toy" not in names)
            if "toy" in names:
                from ..train.dist import all_gather_cat
                samples = all_gather_cat(torch.cat([b for b in batches]).to(device)).cpu()
                values = toy_metrics(ref, samples)
                return {name: float(values[name]) for name in TOY_SCALARS}
            feature_net.to(device)
            feats, logits = compute_features(feature_net, batches)
            results = image_metrics(names, feats, logits, ref, options)
            return {name: float(r["value"]) for name, r in results.items()}
        finally:
            denoiser.train(was_training)

    return evaluate
