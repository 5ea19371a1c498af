"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 estimate with the cubic polynomial
kernel k(x, y) = (x.y / F + 1)^3, averaged over random subsets (torch-fidelity's protocol: for each subset
draw
`subset_size` rows of each set without replacement from `np.random.RandomState(seed)`, first set 1, then set
2).
"""

from __future__ import annotations

import numpy as np

from ..errors import DiffdistillError
from .features import check_count


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: np.ndarray, k_xy: np.ndarray, k_yy: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) for equal set sizes m: the within-set sums skip the
    diagonal (divided by m(m-1)); the cross term keeps every pair (divided by m^2), as torch-fidelity does."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kid(features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, degree: int = 3, gamma: float | None = None,
        coef0: float = 1.0) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over `subsets` random subsets."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise DiffdistillError(f"KID needs two feature arrays [N, F] of the same F, got {f1.shape} and "
                               f"{f2.shape}")
    if subset_size < 2 or subsets < 1:
        raise DiffdistillError(f"KID needs subset_size >= 2 and subsets >= 1, got {subset_size} and "
                               f"{subsets}")
    check_count(min(len(f1), len(f2)), subset_size, f"KID with subset size {subset_size}")
    rng = np.random.RandomState(seed)
    values = np.zeros(subsets)
    for i in range(subsets):
        a = f1[rng.choice(len(f1), subset_size, replace=False)]
        b = f2[rng.choice(len(f2), subset_size, replace=False)]
        k = dict(degree=degree, gamma=gamma, coef0=coef0)
        values[i] = mmd2_unbiased(polynomial_kernel(a, a, **k), polynomial_kernel(a, b, **k),
                                  polynomial_kernel(b, b, **k))
    return float(values.mean()), float(values.std())
