"""Multi-step samplers of the probability-flow ODE (and DDPM's ancestral chain) in EDM sigma space.

Every sampler is a stateless function `fn(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None)`:
`noise` is unit Gaussian [B, *shape] and is scaled by sigmas[0]; `sigmas` descends and ends in 0. The state is
kept in float64 (as EDM's sampler does); the denoiser is called in its own dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..diffusion.schedules import check_sigmas


def denoiser_dtype(denoiser, default: torch.dtype) -> torch.dtype:
    """The dtype a denoiser computes in: its parameters' dtype, else `default` (parameter-free analytic ones)."""
    p = next(iter(denoiser.parameters()), None)
    return p.dtype if p is not None else default


def call_denoiser(denoiser, x: Tensor, sigma: Tensor | float, cond=None, dtype: torch.dtype | None = None) -> Tensor:
    """D(x; sigma) in the denoiser's dtype (`denoiser_dtype`, or `dtype` when the caller knows it), returned in
    x's dtype."""
    dtype = dtype or denoiser_dtype(denoiser, x.dtype)
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    return denoiser(x.to(dtype), s.expand(x.shape[0]) if s.ndim == 0 else s, cond).to(x.dtype)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """Gaussian noise like x; a list of generators gives one stream per sample (batch-size independent)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float32) for g in generator]).to(x)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=torch.float32, device=device).to(x)


def _start(noise: Tensor, sigmas) -> tuple[Tensor, Tensor]:
    sigmas = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64)).to(noise.device)
    return noise.to(torch.float64) * sigmas[0], sigmas


@torch.no_grad()
def sample_euler(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None):
    """Euler steps of dx/dsigma = (x - D)/sigma. Equals deterministic DDIM (algorithms.md §1.5, O7)."""
    x, sigmas = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        denoised = call_denoiser(denoiser, x, sigmas[i], cond)
        # x + (s' - s)(x - D)/s, written as D + (s'/s)(x - D): exact in floating point at huge s (cosine t=1).
        x = denoised + (sigmas[i + 1] / sigmas[i]) * (x - denoised)
        if callback is not None:
            callback(i, x, denoised)
    return x


sample_ddim = sample_euler


@torch.no_grad()
def sample_heun(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None,
                s_churn=0.0, s_min=0.0, s_max=math.inf, s_noise=1.0):
    """EDM Algorithm 2: Heun's 2nd-order method, Euler on the last step to 0; optional stochastic churn."""
    x, sigmas = _start(noise, sigmas)
    n = len(sigmas) - 1
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_min <= float(t_cur) <= s_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + (t_hat**2 - t_cur**2).sqrt() * s_noise * randn_like(x, generator)
        denoised = call_denoiser(denoiser, x, t_hat, cond)
        d = (x - denoised) / t_hat
        x_next = x + (t_next - t_hat) * d
        if t_next > 0:  # 2nd-order correction, skipped on the final step (algorithms.md §1.6)
            d2 = (x_next - call_denoiser(denoiser, x_next, t_next, cond)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None):
    """DDPM ancestral sampling (DDIM with eta=1, = the DDPM posterior q(x_s | x_t, x0)) in EDM coordinates.

    With sigma_up = s_next/s * sqrt(s^2 - s_next^2) and sigma_down = sqrt(s_next^2 - sigma_up^2), one step is
    x <- D + sigma_down (x - D)/s + sigma_up z. Noise is drawn (float32) only on steps that end above 0.
    """
    x, sigmas = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            sigma_up = s_next / s * (s**2 - s_next**2).sqrt()
            sigma_down = (s_next**2 - sigma_up**2).sqrt()
            x = denoised + sigma_down * (x - denoised) / s + sigma_up * randn_like(x, generator)
        if callback is not None:
            callback(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in lambda = -log sigma; the last step to 0 returns D."""
    x, sigmas = _start(noise, sigmas)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, s, cond)
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            d = denoised
            if old_denoised is not None:
                r = (sigmas[i - 1].log() - s.log()) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s_next / s) * x - torch.expm1(-h) * d
        old_denoised = denoised
        if callback is not None:
            callback(i, x, denoised)
    return x
