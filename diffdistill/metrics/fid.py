"""Fréchet Inception Distance (Heusel et al. 2017, eq. 6) and reference statistics files.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), with (mu, S) the mean and the unbiased covariance
of the features. Only the trace of the square root is needed, and it is the sum of the square roots of the
eigenvalues of S1 S2 (`trace_sqrt_product`), so no matrix square root is formed (pytorch-fid, clean-fid and
EDM call scipy's `sqrtm`, which gives the same value on full-rank 2048-d statistics, as tests/test_metrics.py
checks, in several times the time).

Reference files are `.npz` with `mu` [F] and `sigma` [F, F] (the pytorch-fid / EDM layout; EDM's refs hold
exactly these two). diffdistill may add `features` [N, F] (for KID and precision/recall) and `meta` (a JSON
string: the feature network's identity, the data, n, the subset seed, the command); all are plain arrays, read
with `allow_pickle=False`. guided-diffusion's reference batches (`arr_0` images beside `mu`, `sigma`, `mu_s`,
`sigma_s`) are read too: see `metrics/npz_layouts.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from ..errors import DiffdistillError
from ..guard import NpzFile, check_alloc
from .features import check_count


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], unbiased covariance [F, F]) of features [N, F], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise DiffdistillError(f"features must be a 2-D array [N, F], got shape {features.shape}")
    check_count(features.shape[0], 2, "FID statistics")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric positive semi-definite S1, S2, by symmetric eigendecompositions.

    S1 S2 is similar to M = S1^(1/2) S2 S1^(1/2) (S1 S2 = R (R S2 R) R^-1 with R = S1^(1/2)), and M is symmetric
    positive semi-definite, so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)). With S1 = V diag(w) V^T (`eigh`),
    M is orthogonally similar to W^T S2 W, W = V diag(sqrt(w)) (two matrix products), whose eigenvalues come from
    `eigvalsh`. Symmetric eigensolvers are backward stable and return real eigenvalues, while
    the eigenvalues of the non-symmetric product S1 S2 (what `sqrtm` or `eigvals(S1 @ S2)` work on) can turn
    complex or ill-conditioned where S1 S2 is singular. Eigenvalues below zero are rounding errors (|lambda| ~
    1e-16 ||M||) and count as zero. On full-rank statistics this agrees with sqrtm; on rank-deficient ones (fewer
    samples than dimensions) it stays close to the exact value, the nuclear norm of the centred cross-feature
    product, where sqrtm drifts further (tests/test_metrics.py checks both cases).
    """
    w, v = np.linalg.eigh(sigma1)
    root = v * np.sqrt(np.clip(w, 0, None))
    m = root.T @ (sigma2 @ root)
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the trace term by `trace_sqrt_product`)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise DiffdistillError(f"feature means have different or bad shapes: {mu1.shape} vs {mu2.shape} "
                               "(statistics from different feature networks?)")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DiffdistillError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise DiffdistillError("FID: the feature statistics contain NaN or inf")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def fid_from_stats(stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray]) -> float:
    """FID from two (mu, sigma) pairs."""
    return frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return fid_from_stats(feature_stats(features1), feature_stats(features2))


def save_ref_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
                   features: np.ndarray | None = None, meta: dict | None = None) -> Path:
    """Write a reference `.npz` (atomically): mu, sigma, optionally features and a JSON `meta` string, and
    `sha256`, the checksum of the arrays (`load_ref_stats` checks it: a flipped byte is found, not measured)."""
    from ..io import atomic_write

    arrays = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    arrays["sha256"] = np.array(_arrays_sha256(arrays))
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    path = Path(path)
    atomic_write(path, write)
    return path


WHAT = "reference statistics file"
CHECKED = ("mu", "sigma", "features")   # the arrays a reference's `sha256` covers


def _arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the CHECKED arrays present (the buffers themselves:
    a memory-mapped member is hashed without a copy)."""
    h = hashlib.sha256()
    for k in CHECKED:
        if k in arrays:
            a = np.ascontiguousarray(arrays[k])
            h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
            h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _numbers(npz, key: str, path: Path, ndim: int) -> np.ndarray:
    """Array `key` as finite float64 numbers of `ndim` dimensions (header checked first: `guard.NpzFile`)."""
    shape, dtype = npz.header(key)
    if dtype == np.bool_ or not (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)):
        raise DiffdistillError(f"{path}: {key!r} must hold numbers, got dtype {dtype}")
    if len(shape) != ndim:
        raise DiffdistillError(f"{path}: {key!r} must have {ndim} dimensions, got shape {shape}")
    check_alloc(math.prod(shape) * 8, path, f"{key!r} as float64")
    a = np.asarray(npz.array(key), dtype=np.float64)
    if not np.isfinite(a).all():
        raise DiffdistillError(f"{path}: {key!r} holds {int((~np.isfinite(a)).sum())} NaN or inf values")
    return a


def load_ref_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a reference `.npz`; a one-line error names the file and what is wrong (a damaged or
    truncated member, a header that declares more than the file holds, NaN or inf, wrong shapes)."""
    path = Path(path)
    with NpzFile(path, WHAT) as npz:
        if not {"mu", "sigma"} <= set(npz.keys):
            raise DiffdistillError(f"{path}: reference statistics need arrays 'mu' and 'sigma' (has {npz.keys})")
        mu = _numbers(npz, "mu", path, 1)
        sigma = _numbers(npz, "sigma", path, 2)
        if "sha256" in npz:   # written by save_ref_stats: the arrays must be the ones it wrote
            shape, dtype = npz.header("sha256")
            recorded = str(npz.array("sha256", mmap=False)) if shape == () and dtype.kind == "U" else ""
            if recorded != _arrays_sha256({k: npz.array(k) for k in CHECKED if k in npz}):
                raise DiffdistillError(f"{path}: checksum mismatch (the file is damaged: make it again with "
                                       "`diffdistill ref-stats`)")
    if sigma.shape != (mu.shape[0], mu.shape[0]) or not mu.shape[0]:
        raise DiffdistillError(f"{path}: mu must be [F] and sigma [F, F], got {mu.shape} and {sigma.shape}")
    return mu, sigma


def load_ref_extras(path: str | os.PathLike) -> tuple[np.ndarray | None, dict]:
    """(features [N, F] or None, meta dict) of a reference `.npz` written by `save_ref_stats`."""
    from ..schema import parse_json

    path = Path(path)
    with NpzFile(path, WHAT) as npz:
        features = _numbers(npz, "features", path, 2) if "features" in npz else None
        meta = {}
        if "meta" in npz:
            shape, dtype = npz.header("meta")
            if shape != () or dtype.kind != "U":
                raise DiffdistillError(f"{path}: 'meta' must be a JSON string, got {dtype} of shape {shape}")
            meta = parse_json(str(npz.array("meta", mmap=False)), f"{path}: 'meta'", "JSON string")
            if not isinstance(meta, dict):
                raise DiffdistillError(f"{path}: 'meta' must be a JSON object")
    return features, meta

