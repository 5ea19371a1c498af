"""Few-step samplers of distilled students."""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.schedules import check_sigmas
from .ode import _start, call_denoiser, denoiser_dtype, randn_like


@torch.no_grad()
def sample_onestep(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None):
    """One network evaluation: x = D(sigmas[0] * z; sigmas[0]) (KD, DI, GDD, DMD2, SiD, 1-step CD).

    Nothing is integrated, so unlike the multi-step samplers no float64 state is kept: the input is made and
    the denoiser called in the denoiser's own dtype, and the result returned in that dtype, so that the
    sampling path costs next to nothing over the network's forward pass (benchmarks/speed.py).
    """
    s0 = float(check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64))[0])
    dtype = denoiser_dtype(denoiser, noise.dtype)
    x = call_denoiser(denoiser, noise.to(dtype) * s0, s0, cond, dtype)
    if callback is not None:
        callback(0, x, x)
    return x


def renoise(x0: Tensor, sigma: float, sigma_min: float, noise: Tensor) -> Tensor:
    """Multistep consistency sampling's step back up to level sigma (Song et al. 2023, Alg. 1):
    x0 + sqrt(sigma^2 - sigma_min^2) z with unit noise z (the root taken as 0 below sigma_min)."""
    return x0 + max(sigma**2 - sigma_min**2, 0.0) ** 0.5 * noise


@torch.no_grad()
def sample_multistep(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): denoise, then re-noise to the next level.

    x <- f(x, tau_i); x <- x + sqrt(tau_{i+1}^2 - sigma_min^2) z, for each nonzero level of `sigmas`.
    """
    x, sigmas = _start(noise, sigmas)
    eps = float(getattr(denoiser, "sigma_min", 0.0))
    levels = [s for s in sigmas.tolist() if s > 0]
    for i, s in enumerate(levels):
        if i > 0:
            x = renoise(x, s, eps, randn_like(x, generator))
        x = call_denoiser(denoiser, x, s, cond)
        if callback is not None:
            callback(i, x, x)
    return x
