"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), computed on chunks of the samples (each
chunk's p(y) is its own mean); returns the mean and the std over chunks.

Two chunking conventions are in use, and they give different numbers for the same samples (the score of a
chunk grows with its size): `splits` equal consecutive chunks (the original code, EDM, StyleGAN, torch-fidelity:
10 splits), or consecutive chunks of `split_size` images, the last one possibly shorter (guided-diffusion's
evaluator, used by ADM, consistency models and most ImageNet papers: 5000 images per split).
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from ..errors import DiffdistillError
from .features import check_count


def is_chunks(n: int, splits: int = 10, split_size: int | None = None) -> list[slice]:
    """The chunks of n samples: `split_size` images each (the last may be shorter), else `splits` equal ones
    (sizes differing by at most one)."""
    if split_size is not None:
        if split_size < 1:
            raise DiffdistillError(f"the Inception Score split size must be positive, got {split_size}")
        return [slice(lo, min(lo + split_size, n)) for lo in range(0, n, split_size)]
    if splits < 1:
        raise DiffdistillError(f"the Inception Score needs at least 1 split, got {splits}")
    return [slice(i * n // splits, (i + 1) * n // splits) for i in range(splits)]


def inception_score(logits: np.ndarray, splits: int = 10, split_size: int | None = None) -> tuple[float, float]:
    """(mean, std) of the IS of logits [N, C] over `splits` equal chunks, or over chunks of `split_size`."""
    logits = np.asarray(logits, np.float64)
    if split_size is None:
        check_count(logits.shape[0], max(splits, 1), f"the Inception Score with {splits} splits")
    else:
        check_count(logits.shape[0], 1, "the Inception Score")
    log_p = log_softmax(logits, axis=1)
    scores = []
    for chunk in is_chunks(logits.shape[0], splits, split_size):
        chunk = log_p[chunk]
        log_py = np.log(np.exp(chunk).mean(axis=0))                 # log p(y) of this chunk
        kl = (np.exp(chunk) * (chunk - log_py)).sum(axis=1).mean()  # E_x KL(p(y|x) || p(y))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
