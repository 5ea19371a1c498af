"""Exact metrics for analytic data (isotropic Gaussian mixtures, `teachers/analytic.py`).

With the true density known, samples are judged directly, without a feature network:
- mode shares: the fraction of samples whose most responsible mode is k, against the true weight pi_k
  (a mode-collapse detector, e.g. for the reverse-KL methods DI/DMD2/SiD: |share_k - pi_k| within a binomial CI);
- the fraction of samples within 3 standard deviations of their mode, ||x - mu_k|| <= 3 s_k; for separated
  modes its true value is P(chi^2_D <= 9) (0.98889 in 2-D);
- the mean negative log-likelihood under the true density (its true value is the entropy H(p), estimated here
by
  a fixed-seed Monte Carlo over exact samples);
- the sliced 2-Wasserstein distance to exact samples, over fixed seeded random directions.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chi2

from ..errors import DiffdistillError
from .features import check_count

NLL_REF_SAMPLES = 200_000
NLL_REF_SEED = 1234


def _flat(gmm, samples) -> torch.Tensor:
    x = torch.as_tensor(samples).double().cpu()
    if tuple(x.shape[1:]) != tuple(gmm.shape):
        raise DiffdistillError(f"samples of shape {tuple(x.shape[1:])} given for data of shape "
                               f"{tuple(gmm.shape)}")
    return x


def _assign(gmm, x: torch.Tensor, nstd: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mode index of each sample, whether it lies within nstd * s_k of that mode's mean)."""
    k = gmm.mode_of(x.to(gmm.means.device)).cpu()
    dist = (x.flatten(1) - gmm.means.cpu().flatten(1)[k]).norm(dim=1)
    return k, dist <= nstd * gmm.stds.cpu()[k]


def mode_shares(gmm, samples) -> np.ndarray:
    """Fraction of samples assigned (most responsible mode at sigma=0) to each mode, [K]."""
    x = _flat(gmm, samples)
    counts = torch.bincount(_assign(gmm, x)[0], minlength=gmm.means.shape[0])
    return (counts.double() / x.shape[0]).numpy()


def within_nstd(gmm, samples, nstd: float = 3.0) -> float:
    """Fraction of samples with ||x - mu_k|| <= nstd * s_k for their mode k."""
    return float(_assign(gmm, _flat(gmm, samples), nstd)[1].double().mean())


def within_nstd_true(dim: int, nstd: float = 3.0) -> float:
    """P(||z|| <= nstd) for z ~ N(0, I_dim): the exact value of `within_nstd` for well-separated modes."""
    return float(chi2.cdf(nstd**2, dim))


def mean_nll(gmm, samples) -> float:
    """-E log p(x) under the true density (nats)."""
    return float(-gmm.log_prob(_flat(gmm, samples).to(gmm.means.device)).mean())


def reference_nll(gmm, n: int = NLL_REF_SAMPLES, seed: int = NLL_REF_SEED) -> float:
    """The true value of `mean_nll`, the entropy H(p), by Monte Carlo over `n` exact samples (fixed seed)."""
    return mean_nll(gmm, gmm.sample(n, generator=torch.Generator().manual_seed(seed)))


def projections(dim: int, count: int = 128, seed: int = 0) -> np.ndarray:
    """`count` fixed random unit directions [count, dim] (uniform on the sphere, seeded)."""
    z = np.random.default_rng(seed).standard_normal((count, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _w2_sq_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact squared W2 between the empirical distributions of the columns of a [n1, L] and b [n2, L]:
    the integral over u of (F_a^-1(u) - F_b^-1(u))^2, piecewise constant between the breakpoints k/n."""
    a, b = np.sort(a, axis=0), np.sort(b, axis=0)
    n1, n2 = a.shape[0], b.shape[0]
    u = np.union1d(np.arange(1, n1 + 1) / n1, np.arange(1, n2 + 1) / n2)
    width = np.diff(np.concatenate([[0.0], u]))
    mid = u - width / 2
    ia = np.minimum((mid * n1).astype(np.int64), n1 - 1)
    ib = np.minimum((mid * n2).astype(np.int64), n2 - 1)
    return (width[:, None] * (a[ia] - b[ib]) ** 2).sum(axis=0)


def sliced_wasserstein(x, y, num_projections: int = 128, seed: int = 0) -> float:
    """Sliced W2: sqrt of the mean over fixed directions theta of W2^2(theta.x, theta.y)."""
    x = np.asarray(torch.as_tensor(x).double().flatten(1))
    y = np.asarray(torch.as_tensor(y).double().flatten(1))
    if x.shape[1] != y.shape[1]:
        raise DiffdistillError(f"sliced Wasserstein: dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    theta = projections(x.shape[1], num_projections, seed)
    return float(np.sqrt(_w2_sq_1d(x @ theta.T, y @ theta.T).mean()))


def toy_metrics(gmm, samples, seed: int = 0, num_projections: int = 128) -> dict:
    """Every exact metric of `samples` [N, *shape] against the mixture `gmm`, with the true values beside
    them.

    Exact reference samples for the sliced Wasserstein distance come from `seed` (the same N as `samples`);
    the
    noise floor is the same distance between two independent exact sample sets."""
    x = _flat(gmm, samples)
    n = x.shape[0]
    check_count(n, 2, "exact toy metrics")
    if not bool(torch.isfinite(x).all()):
        raise DiffdistillError(f"{int((~torch.isfinite(x)).any(dim=tuple(range(1, x.ndim))).sum())} of {n} "
                               "samples are NaN or inf")
    weights = gmm.weights.cpu().numpy()
    shares = mode_shares(gmm, x)
    err = np.abs(shares - weights)
    gen = torch.Generator().manual_seed(seed)
    ref_a, ref_b = gmm.sample(n, generator=gen), gmm.sample(n, generator=gen)
    dim = int(np.prod(gmm.shape))
    modes, inside = _assign(gmm, x)
    covered = (torch.bincount(modes[inside], minlength=len(weights)) > 0).sum()
    return dict(
        n=n,
        num_modes=len(weights),
        modes_covered=int(covered),                              # modes with >= 1 sample within 3 std
        mode_share=shares.tolist(),
        mode_weight=weights.tolist(),
        mode_share_error=err.tolist(),
        mode_share_max_error=float(err.max()),
        mode_share_max_se=float(np.sqrt(weights * (1 - weights) / n).max()),  # binomial std of a share
        within_3std=within_nstd(gmm, x),
        within_3std_true=within_nstd_true(dim),
        nll=mean_nll(gmm, x),
        nll_true=reference_nll(gmm),
        sliced_w2=sliced_wasserstein(x, ref_a, num_projections, seed),
        sliced_w2_noise_floor=sliced_wasserstein(ref_b, ref_a, num_projections, seed),
    )
