"""The evaluation protocol shared by `diffdistill eval` and evaluation during training.

It measures samples it is given: `evaluate(samples, ...)` takes an iterable of batches (images in [-1, 1],
[B, C, H, W]), streams them through a feature network and compares them with a reference; `evaluate_toy`
judges points against the analytic mixture the caller passes. Generating them (a model, its sampling recipe and
per-sample seeds: image k depends on seed k only) is `samplers.sample_batches`, done by the callers (`cli/eval.py`,
`train/evaluate.py`); this package imports neither samplers nor teachers. Every number becomes a JSON record
saying what was measured, on how many samples, from which seeds, against which reference file (sha256), with
which feature network (weights sha256), by which command and when, and a label that says the protocol where
numbers are read (`fid-10k [digits classifier, not Inception]`). A reference records the identity of the feature
network that made it (`FeatureNet.identity`: name, weights sha256, resize, normalisation); `check_reference`
refuses one made with another network. Subsets of data sets are seeded random draws (`features.subset_indices`,
EDM's rule).
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffdistillError
from . import fid as fid_lib
from .features import (
    FeatureNet,
    check_same_feature_net,
    compute_features,
    dataset_batches,
    load_feature_net,
    net_label,
    sha256_file,
    subset_indices,
    warn,
)
from .inception_score import inception_score, is_chunks
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
    is_splits: int = 10              # Inception Score: equal splits (Salimans et al., EDM, StyleGAN) ...
    pr_k: int = 3                    # k of the k-NN manifolds of precision/recall
    seed: int = 0                    # seed of the KID subsets (the KID record's `kid_seed`)
    is_split_size: int | None = None  # ... or this many images per split (guided-diffusion/ADM: 5000)

    def is_convention(self) -> str:
        """The Inception Score split convention, as tables say it."""
        if self.is_split_size:
            return f"{self.is_split_size} per split"
        return f"{self.is_splits} splits"


@dataclass
class Reference:
    """What image metrics compare against: FID statistics and, for KID/PR, the reference features.

    meta['feature_net'] is the identity of the network the statistics were made with (`FeatureNet.identity`;
    absent in pytorch-fid/EDM files); `images`, when set, is a data set whose features (computed with the
    network in use, by `reference_features`) serve KID and precision/recall: a guided-diffusion reference
    batch's `arr_0`."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    source: str | None = None         # the .npz file or the data spec
    sha256: str | None = None         # of the .npz file (None for a data spec)
    meta: dict = field(default_factory=dict)
    images: object | None = None

    def describe(self) -> dict:
        return dict(ref=self.source, ref_sha256=self.sha256, ref_n=self.meta.get("n"),
                    ref_feature_net=self.meta.get("feature_net"),
                    **{f"ref_{k}": self.meta[k] for k in ("layout", "subset_seed", "items") if k in self.meta})


def reference_from_file(path: str | os.PathLike) -> Reference:
    """A reference `.npz`: mu, sigma (optionally features and meta), or a guided-diffusion reference batch."""
    from .npz_layouts import ADM_REFERENCE, ADM_SAMPLES, NpzImages, npz_layout

    layout = npz_layout(path)
    if layout == ADM_SAMPLES:
        raise DiffdistillError(f"{path}: a guided-diffusion sample batch (arr_0 only, no mu/sigma): pass it with "
                               "--ref-data to compute the reference from its images")
    mu, sigma = fid_lib.load_ref_stats(path)
    if layout == ADM_REFERENCE:
        from .inception import adm_identity

        images = NpzImages(path, layout)
        meta = dict(layout=layout, feature_net=adm_identity(), images=len(images))
        return Reference(mu, sigma, None, str(path), sha256_file(path), meta, images)
    features, meta = fid_lib.load_ref_extras(path)
    if features is not None and features.shape[1] != mu.shape[0]:
        raise DiffdistillError(f"{path}: 'features' have {features.shape[1]} dims but mu has {mu.shape[0]}")
    return Reference(mu, sigma, features, str(path), sha256_file(path), meta)


def check_reference(ref: Reference, feature_net: FeatureNet) -> list[str]:
    """Refuse (one-line error) a reference made with another feature network than `feature_net`: another
    dimension, or another recorded identity (weights sha256, resize, normalisation); warn (and return the
    warnings) when the reference records no identity, so it cannot be checked."""
    if ref.mu.shape[0] != feature_net.feature_dim:
        raise DiffdistillError(f"{ref.source}: the reference has {ref.mu.shape[0]}-d features but feature network "
                               f"{feature_net.name!r} gives {feature_net.feature_dim} (made with another feature "
                               "network?)")
    made = ref.meta.get("feature_net")
    warnings = check_same_feature_net(made if isinstance(made, dict) else None, feature_net.identity(),
                                      str(ref.source))
    for w in warnings:
        warn(w)
    return warnings


def reference_features(ref: Reference, feature_net: FeatureNet, batch: int = 256,
                       progress: bool = False) -> Reference:
    """Fill `ref.features` from `ref.images` (a guided-diffusion reference batch's `arr_0`) with `feature_net`,
    for KID and precision/recall; the identity must match (`check_reference`) since mu/sigma stay the file's."""
    if ref.features is None and ref.images is not None:
        check_reference(ref, feature_net)
        ref.features, _ = compute_features(feature_net, dataset_batches(ref.images, batch), source=ref.source,
                                           limit=len(ref.images), gather=False, progress=progress)
    return ref


def reference_from_features(features: np.ndarray, source: str | None = None,
                            meta: dict | None = None) -> Reference:
    mu, sigma = fid_lib.feature_stats(features)
    return Reference(mu, sigma, features, source, None, dict(meta or {}, n=len(features)))


def open_images(spec: str):
    """A data set of images: a guided-diffusion batch or `sample npz` file (`npz_layouts.NpzImages`), else
    `diffdistill.data.open_dataset` (a clear error for point data)."""
    from ..data import open_dataset
    from .npz_layouts import NpzImages, npz_layout

    layout = npz_layout(spec)
    ds = NpzImages(spec, layout) if layout else open_dataset(spec)
    if len(ds.shape) != 3:
        raise DiffdistillError(f"{spec}: image metrics need images [C, H, W], this data set holds shape "
                               f"{tuple(ds.shape)} (use the exact toy metrics for points)")
    return ds


def describe_subset(total: int, idx, seed: int) -> dict:
    """What a record says about the items of a data set it used: their range when all, else the subset seed."""
    if len(idx) == total:
        return dict(items=f"0-{total - 1}")
    return dict(items=f"random {len(idx)} of {total} (seed {seed})", subset_seed=int(seed))


def reference_from_data(spec: str, feature_net: FeatureNet, n: int | None = None, batch: int = 256,
                        progress: bool = False, seed: int = 0) -> Reference:
    """Features of a data set, or of a seeded random subset of `n` of its items (`subset_indices`, EDM's rule);
    every rank computes them all."""
    ds = open_images(spec)
    idx = subset_indices(len(ds), n, seed)
    feats, _ = compute_features(feature_net, dataset_batches(ds, batch, indices=idx), source=spec, gather=False,
                                limit=len(idx), progress=progress)
    meta = dict(feature_net=feature_net.describe(), data=spec, **describe_subset(len(ds), idx, seed))
    if getattr(ds, "layout", None):
        meta["layout"] = ds.layout
    return reference_from_features(feats, spec, meta)


def metric_label(metric: str, n: int, feature_net: dict | None, detail: str | None = None) -> str:
    """How a table names a number: metric, sample count, feature network (and e.g. the IS split convention):
    'fid-10k [digits classifier, not Inception]', 'is-50k [Inception-v3 FID weights, tf1 resize; 10 splits]'."""
    return f"{metric}-{count_label(n)} [{net_label(feature_net)}{'; ' + detail if detail else ''}]"


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
                out["kid"] = dict(value=mean, std=std, subsets=options.kid_subsets, subset_size=size,
                                  kid_seed=options.seed)
            else:
                pr = precision_recall(ref.features, features, options.pr_k)
                out["precision"] = dict(value=pr["precision"], k=options.pr_k)
                out["recall"] = dict(value=pr["recall"], k=options.pr_k)
        elif name == "is":
            if logits is None:
                raise DiffdistillError("the Inception Score needs a feature network with class logits")
            mean, std = inception_score(logits, options.is_splits, options.is_split_size)
            splits = len(is_chunks(len(logits), options.is_splits, options.is_split_size))
            out["is"] = dict(value=mean, std=std, splits=splits, split_size=options.is_split_size,
                             split_convention=options.is_convention())
    return out


# --------------------------------------------------------------------------------------------------
# Measuring generated samples


def evaluate(samples: Iterable[torch.Tensor], names: Sequence[str], feature_net: FeatureNet,
             ref: Reference | None = None, options: MetricOptions | None = None, *, source: str | None = None,
             limit: int | None = None, progress: bool = False) -> tuple[dict[str, dict], int]:
    """Image metrics of generated images: `samples` is an iterable of batches [B, C, H, W] in [-1, 1] (this
    rank's shard under torchrun: the features are gathered across ranks in rank order), streamed through
    `feature_net` (at most `limit` images). Returns ({metric: {'value': ..., extras}} as `image_metrics`, the
    number of images measured). Sampling them is the caller's (`samplers.sample_batches`)."""
    feats, logits = compute_features(feature_net, samples, source=source, limit=limit, progress=progress)
    return image_metrics(names, feats, logits, ref, options, source), len(feats)


def evaluate_toy(samples: Iterable[torch.Tensor], mixture, seed: int = 0) -> dict:
    """The exact metrics (`toy.toy_metrics`) of generated points: `samples` is an iterable of batches [B, D] (or
    [B, *shape]; this rank's shard under torchrun, gathered across ranks in rank order), `mixture` the analytic
    data they should follow (a `teachers.analytic.GaussianMixture`, given by the caller). `seed`: of the exact
    reference samples."""
    from ..dist import all_gather_cat

    batches = [torch.as_tensor(b) for b in samples]
    if not batches:
        raise DiffdistillError("exact toy metrics: no samples were given")
    return toy_metrics(mixture, all_gather_cat(torch.cat(batches)).cpu(), seed=seed)


def is_mixture(obj) -> bool:
    """Whether `obj` is analytic data the exact toy metrics can judge against (a GaussianMixture: exact samples,
    log-density and mode assignment)."""
    return all(callable(getattr(obj, name, None)) for name in ("sample", "log_prob", "mode_of"))


def rank_shard(seeds: Sequence[int]) -> list[int]:
    """This rank's contiguous block of the seeds, so that gathering in rank order restores the seed order."""
    from ..dist import rank, world_size

    n, r, w = len(seeds), rank(), world_size()
    return list(seeds)[r * n // w:(r + 1) * n // w]


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
    """One result: metric, its label (`metric_label`: metric, n, feature network, for image metrics), value,
    sample count, seeds, reference and feature network (with sha256), command, time (UTC, ISO 8601), plus any
    extras (e.g. std, subset size, the true value of an exact metric)."""
    label = metric if feature_net is None else metric_label(metric, n, feature_net, extra.get("split_convention"))
    return dict(metric=metric, label=label, value=value, n=int(n),
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

LOWER_IS_BETTER = {"fid": True, "kid": True, "is": False, "precision": False, "recall": False}


def count_label(n: int) -> str:
    """A sample count as metric names write it: 10000 -> '10k', 256 -> '256'."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


class TrainMetrics:
    """The protocol of evaluation during training, made by `make_train_metrics`: which metrics, on samples from
    which seeds, with which feature network, against which reference; `measure(samples)` gives the numbers of
    the samples generated from those seeds. The training loop's hook that samples the student
    (`diffdistill.train.evaluate.TrainEvaluator`) holds one.

    Keys are the metric names ('fid', 'precision', ...), or with `labelled` the protocol too: 'fid-10k/inception'
    (metric, number of samples, feature network), so that a training log says what its numbers are.
    """

    def __init__(self, names: list[str], feature_net: FeatureNet | None, ref, seeds: list[int], batch: int,
                 options: MetricOptions, labelled: bool):
        self.names, self.feature_net, self.ref, self.seeds = names, feature_net, ref, seeds
        self.batch, self.options, self.labelled = batch, options, labelled

    @property
    def toy(self) -> bool:
        """Whether these are the exact toy metrics (points, never clamped) rather than image metrics."""
        return "toy" in self.names

    def key(self, name: str) -> str:
        """The key of metric `name` ('fid', 'kid', 'is', 'precision', 'recall' or a toy scalar)."""
        if not self.labelled or self.toy:
            return name
        return f"{name}-{count_label(len(self.seeds))}/{self.feature_net.name}"

    def best(self) -> tuple[str, str] | None:
        """(key, 'min' | 'max') of the first single-number image metric asked for (None: only 'pr' or 'toy')."""
        for name in self.names:
            if name in LOWER_IS_BETTER:
                return self.key(name), "min" if LOWER_IS_BETTER[name] else "max"
        return None

    def describe(self) -> dict:
        """The protocol, for config.json: metrics, their keys, n, seeds, feature network, reference."""
        keys = [k for name in self.names for k in (("precision", "recall") if name == "pr" else (name,))]
        if self.toy:
            return dict(metrics=["toy"], n=len(self.seeds), seeds=describe_seeds(self.seeds),
                        ref=getattr(self.ref, "name", None))
        net = self.feature_net.describe()
        return dict(metrics=self.names, keys={k: self.key(k) for k in keys},
                    labels={self.key(k): metric_label(k, len(self.seeds), net, self.options.is_convention()
                                                      if k == "is" else None) for k in keys}, n=len(self.seeds),
                    seeds=describe_seeds(self.seeds), feature_net=net,
                    **(self.ref.describe() if self.ref is not None else {}),
                    kid_subsets=self.options.kid_subsets, kid_subset_size=self.options.kid_subset_size,
                    kid_seed=self.options.seed, is_splits=self.options.is_convention(), pr_k=self.options.pr_k)

    @torch.no_grad()
    def measure(self, samples: Iterable[torch.Tensor], device=None) -> dict[str, float]:
        """{key: value} of the samples generated from `self.seeds` (this rank's `rank_shard` of them under
        torchrun; every rank returns the same dict): an iterable of batches, images in [-1, 1] [B, C, H, W] or
        points [B, D]. device: where the feature network runs (default: where it is)."""
        if self.toy:
            values = evaluate_toy(samples, self.ref)
            return {name: float(values[name]) for name in TOY_SCALARS}
        if device is not None:
            self.feature_net.to(device)
        results, _ = evaluate(samples, self.names, self.feature_net, self.ref, self.options)
        return {self.key(name): float(r["value"]) for name, r in results.items()}


def make_train_metrics(metric: str | Sequence[str], feature_net: FeatureNet | str | None = None, ref=None,
                       n: int = 10_000, seeds: Sequence[int] | None = None, *, batch: int = 256,
                       inception: str | None = None, resize: str = "tf1", options: MetricOptions | None = None,
                       shape: Sequence[int] | None = None, labelled: bool = False) -> TrainMetrics:
    """The protocol of evaluation during training (`TrainMetrics`), checked now.

    metric: 'fid', 'kid', 'is', 'pr' (comma-separated or a list) or 'toy'. feature_net: a `FeatureNet` or a
    `load_feature_net` spec (with `inception`, `resize`). ref: a reference `.npz`, a data spec or a `Reference`,
    or, for 'toy', the analytic mixture itself (a `GaussianMixture`). Samples come from `seeds` (default
    0..n-1). shape: the samples' shape, checked against the feature network now. Everything that would fail at
    the first evaluation fails here instead: a reference made with another feature network (its recorded
    network, or its dimension), KID/PR without reference features, IS without class logits.
    """
    names = parse_metrics(metric)
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) < n:
        raise DiffdistillError(f"evaluation needs {n} seeds, got {len(seeds)}")
    seeds = seeds[:n]
    options = options or MetricOptions()
    if "toy" in names:
        if names != ["toy"]:
            raise DiffdistillError("the exact 'toy' metrics cannot be combined with image metrics")
        if not is_mixture(ref):
            raise DiffdistillError("the 'toy' metrics need the analytic data (a GaussianMixture)")
        return TrainMetrics(names, None, ref, seeds, batch, options, labelled)
    if n < 2:
        raise DiffdistillError(f"image metrics need at least 2 samples, got n={n}")
    if isinstance(feature_net, str) or feature_net is None:
        feature_net = load_feature_net(feature_net or "inception", inception=inception, resize=resize)
    if shape is not None:
        feature_net.check_images(torch.zeros((1, *shape), dtype=torch.uint8))
    if isinstance(ref, (str, os.PathLike)):
        ref = reference_from_file(ref) if Path(ref).suffix == ".npz" and Path(ref).is_file() \
            else reference_from_data(str(ref), feature_net)
    if "is" in names and feature_net.num_classes == 0:
        raise DiffdistillError(f"the Inception Score needs class logits; feature network {feature_net.name!r} "
                               "has none")
    if {"fid", "kid", "pr"} & set(names):
        if ref is None:
            raise DiffdistillError(f"{', '.join(m for m in names if m != 'is')} need a reference")
        check_reference(ref, feature_net)
        if {"kid", "pr"} & set(names):
            ref = reference_features(ref, feature_net, batch)      # a guided-diffusion reference batch's images
            if ref.features is None:
                raise DiffdistillError(f"{ref.source}: KID and precision/recall need the reference features "
                                       "(write the reference with `diffdistill ref-stats --save-features`)")
    return TrainMetrics(names, feature_net, ref, seeds, batch, options, labelled)
