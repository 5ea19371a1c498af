"""Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1-3).

Each set's manifold is the union of balls around its samples, with radius the distance to the sample's k-th
nearest other sample. Precision = fraction of fake samples inside the real manifold; recall = fraction of real
samples inside the fake manifold. Distances are computed exactly, in row blocks (memory O(block * N)).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffdistillError
from .features import check_count


def _sq_dists(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1, keepdim=True) + b_sq[None] - 2 * a @ b.T).clamp_min_(0)


def knn_radii(features: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Squared distance of each row to its k-th nearest other row."""
    sq = (features * features).sum(1)
    out = torch.empty(features.shape[0], dtype=features.dtype)
    for lo in range(0, features.shape[0], block):
        d = _sq_dists(features[lo:lo + block], features, sq)
        out[lo:lo + block] = d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the row itself (0)
    return out


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of query rows inside at least one ball (support_j, radius_j)."""
    sq = (support * support).sum(1)
    inside = 0
    for lo in range(0, queries.shape[0], block):
        d = _sq_dists(queries[lo:lo + block], support, sq)
        inside += int((d <= radii[None]).any(dim=1).sum())
    return inside / queries.shape[0]


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     block: int = 1024) -> dict[str, float]:
    """{'precision', 'recall'} of fake features [M, F] against real features [N, F] (k-NN manifolds)."""
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DiffdistillError(f"precision/recall needs two feature arrays [N, F] of the same F, got "
                               f"{tuple(real.shape)} and {tuple(fake.shape)}")
    check_count(min(real.shape[0], fake.shape[0]), k + 1, f"precision/recall with k={k}")
    real_r, fake_r = knn_radii(real, k, block), knn_radii(fake, k, block)
    return dict(precision=_coverage(fake, real, real_r, block), recall=_coverage(real, fake, fake_r, block))
