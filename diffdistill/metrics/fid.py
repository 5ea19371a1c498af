"""Fréchet Inception Distance (Heusel et al. 2017, eq. 6) and reference statistics files.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), with (mu, S) the mean and the unbiased covariance
of the features. The matrix square root follows pytorch-fid: scipy's `sqrtm` on S1 S2; when the result is not
finite, retry with eps * I added to both covariances; drop a negligible imaginary part.

Reference files are `.npz` with `mu` [F] and `sigma` [F, F] (the pytorch-fid / EDM layout; EDM's refs hold
exactly these two). diffdistill may add `features` [N, F] (for KID and precision/recall) and `meta` (a JSON
string); all are plain arrays, read with `allow_pickle=False`.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
from scipy import linalg

from ..errors import DiffdistillError
from .features import check_count

EPS = 1e-6


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], unbiased covariance [F, F]) of features [N, F], in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise DiffdistillError(f"features must be a 2-D array [N, F], got shape {features.shape}")
    check_count(features.shape[0], 2, "FID statistics")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def _sqrtm(a: np.ndarray) -> np.ndarray:
    out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (pytorch-fid's numerics)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise DiffdistillError(f"feature means have different or bad shapes: {mu1.shape} vs {mu2.shape} "
                               "(statistics from different feature networks?)")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DiffdistillError(f"covariances must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on singular products; the fallback below handles them
        covmean = _sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # Singular product: regularise both covariances (pytorch-fid's fallback).
            offset = np.eye(d) * eps
            covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DiffdistillError(f"FID: the covariance square root has an imaginary component "
                                   f"{np.abs(covmean.imag).max():.3g} (degenerate statistics?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_stats(stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray]) -> float:
    """FID from two (mu, sigma) pairs."""
    return frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return fid_from_stats(feature_stats(features1), feature_stats(features2))


def save_ref_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
                   features: np.ndarray | None = None, meta: dict | None = None) -> Path:
    """Write a reference `.npz` (atomically): mu, sigma, optionally features and a JSON `meta` string."""
    from ..io import atomic_write

    arrays = dict(mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    path = Path(path)
    atomic_write(path, write)
    return path


def _open_npz(path: Path):
    if not path.is_file():
        raise DiffdistillError(f"{path}: reference statistics file not found")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DiffdistillError(f"{path}: not a readable .npz file ({e})") from None


def load_ref_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from a reference `.npz`; a one-line error names the file and what is wrong."""
    path = Path(path)
    npz = _open_npz(path)
    try:
        if not isinstance(npz, np.lib.npyio.NpzFile) or not {"mu", "sigma"} <= set(npz.files):
            have = sorted(npz.files) if hasattr(npz, "files") else "a single array"
            raise DiffdistillError(f"{path}: reference statistics need arrays 'mu' and 'sigma' (has {have})")
        try:
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
        except ValueError as e:
            raise DiffdistillError(f"{path}: unreadable mu/sigma ({e})") from None
    finally:
        if hasattr(npz, "close"):
            npz.close()
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DiffdistillError(f"{path}: mu must be [F] and sigma [F, F], got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DiffdistillError(f"{path}: mu/sigma contain NaN or inf")
    return mu, sigma


def load_ref_extras(path: str | os.PathLike) -> tuple[np.ndarray | None, dict]:
    """(features [N, F] or None, meta dict) of a reference `.npz` written by `save_ref_stats`."""
    path = Path(path)
    npz = _open_npz(path)
    try:
        files = set(npz.files) if hasattr(npz, "files") else set()
        features = npz["features"].astype(np.float64) if "features" in files else None
        meta = {}
        if "meta" in files:
            try:
                meta = json.loads(str(npz["meta"]))
            except (json.JSONDecodeError, ValueError):
                raise DiffdistillError(f"{path}: 'meta' is not a JSON string") from None
    finally:
        if hasattr(npz, "close"):
            npz.close()
    if features is not None and features.ndim != 2:
        raise DiffdistillError(f"{path}: 'features' must be [N, F], got shape {features.shape}")
    return features, meta
