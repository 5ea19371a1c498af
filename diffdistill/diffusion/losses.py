"""The EDM denoising loss (Karras et al. 2022, Eq. 2 with Table 1's weight), the one copy that every method uses:
teacher training (`methods.teacher`) and the fake-score updates of Diff-Instruct, SiD and DMD2 (`methods.common`,
`methods.dmd2`)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import param, schedules
from .denoiser import Denoiser

REDUCTIONS = ("mean", "none")


def edm_loss(denoiser: Denoiser, x: Tensor, sigma: Tensor | None = None, cond: Tensor | None = None,
             sigma_data: float | None = None, *, reduction: str = "mean", p_mean: float = -1.2,
             p_std: float = 1.2) -> Tensor:
    """lambda(sigma) ||D(x + sigma n; sigma) - x||^2 summed over the elements of each sample, n ~ N(0, I).

    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (`param.edm_loss_weight`, Karras et al. 2022, Table 1), with
    sd = `sigma_data` (None: the denoiser's). sigma [B]: the levels; None draws EDM's training levels,
    ln sigma ~ N(p_mean, p_std^2) (Table 1), before the noise n. The error D - x is formed in x's dtype, at
    least float32 (a bf16 network's output is widened first). reduction: 'mean' = the sum over elements averaged
    over the batch (EDM's reduction: sum over pixels, mean over images), a scalar; 'none' = the per-sample
    sums [B].
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if sigma is None:
        sigma = schedules.sample_lognormal_sigma(x.shape[0], p_mean, p_std, device=x.device)
    sd = denoiser.sigma_data if sigma_data is None else sigma_data
    s = param.append_dims(sigma, x)
    denoised = denoiser(x + s * torch.randn_like(x), sigma, cond)
    weight = param.edm_loss_weight(s, sd)
    err = denoised.to(torch.promote_types(x.dtype, torch.float32)) - x
    per_sample = (weight * err ** 2).flatten(1).sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample
