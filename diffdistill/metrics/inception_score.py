"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), computed on `splits` consecutive
chunks of the samples; returns the mean and the std over chunks (the original protocol: 10 splits)."""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax

from .features import check_count


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the IS of logits [N, C] over `splits` chunks (each chunk's p(y) is its own mean)."""
    logits = np.asarray(logits, np.float64)
    check_count(logits.shape[0], max(splits, 1), f"the Inception Score with {splits} splits")
    log_p = log_softmax(logits, axis=1)
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]
        log_py = np.log(np.exp(chunk).mean(axis=0))                 # log p(y) of this chunk
        kl = (np.exp(chunk) * (chunk - log_py)).sum(axis=1).mean()  # E_x KL(p(y|x) || p(y))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
