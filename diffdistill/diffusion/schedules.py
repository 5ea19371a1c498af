"""Noise schedules: sampling grids (descending, ending in 0) and training-time noise-level densities.

All grids are in EDM sigma space. References: Karras et al. 2022 (Eq. 5, Table 1), Ho et al. 2020 (linear betas),
Salimans & Ho 2022 / Kingma et al. 2021 (cosine logSNR).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Sampling grids


def karras_sigmas(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype=torch.float64
) -> Tensor:
    """EDM time steps (Karras et al. 2022, Eq. 5): n levels from sigma_max to sigma_min, then 0. Length n+1."""
    if n < 1:
        raise ValueError(f"the number of steps must be at least 1, got {n}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n == 1:
        return torch.tensor([sigma_max, 0.0], dtype=dtype)
    i = torch.arange(n, dtype=dtype)
    smax, smin = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (smax + i / (n - 1) * (smin - smax)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_index_sigma(k: Tensor, n: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> Tensor:
    """sigma of (possibly fractional) index k of an n-level Karras grid, k=0 -> sigma_max."""
    smax, smin = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (smax + k / (n - 1) * (smin - smax)) ** rho


def vp_sigma(t: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """VP-SDE noise level in EDM space: sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    sigma = torch.as_tensor(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


def vp_sigmas(n: int, eps_s: float = 1e-3, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    """The VP sampler's grid (EDM ablation sampler): t uniform from 1 to eps_s, mapped to sigma, then 0."""
    t = torch.linspace(1.0, eps_s, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
    return torch.cat([vp_sigma(t, beta_d, beta_min), torch.zeros(1, dtype=torch.float64)])


def ddpm_alphas_cumprod(
    n_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear"
) -> Tensor:
    """abar_t = prod(1 - beta) for DDPM's discrete schedules (Ho et al. 2020; Nichol & Dhariwal 2021).

    kind: 'linear' (Ho et al.), 'scaled_linear' (linear in sqrt(beta), Stable Diffusion) or
    'squaredcos_cap_v2' (iDDPM cosine with s=0.008, betas capped at 0.999).
    """
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, n_timesteps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n_timesteps, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor(
            [min(1 - abar((i + 1) / n_timesteps) / abar(i / n_timesteps), 0.999) for i in range(n_timesteps)],
            dtype=torch.float64,
        )
    else:
        raise ValueError(f"unknown beta schedule {kind!r} (linear, scaled_linear, squaredcos_cap_v2)")
    return torch.cumprod(1 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """EDM level of each discrete timestep: sigma_t = sqrt((1 - abar_t) / abar_t)."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def cosine_logsnr(t: Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Tensor:
    """Cosine logSNR schedule (schedules.py of Progressive Distillation): lambda(t) = -2 log tan(a t + b)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    return -2 * torch.log(torch.tan(a * t + b))


def cosine_sigmas(n: int, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Tensor:
    """n uniform steps t = 1, (n-1)/n, ..., 1/n of the cosine schedule in EDM space, then 0 (PD's DDIM grid)."""
    t = torch.arange(n, 0, -1, dtype=torch.float64) / n
    return torch.cat([torch.exp(-0.5 * cosine_logsnr(t, logsnr_min, logsnr_max)), torch.zeros(1, dtype=torch.float64)])


def check_sigmas(sigmas: Tensor) -> Tensor:
    """Validate a sampling grid: 1-D, at least two entries, strictly descending, ending in 0."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"a sigma grid must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    # Checked on Python floats: a grid has tens of entries, and per-element tensor ops would cost more than a
    # one-step student's sampling path may (benchmarks/speed.py). NaN fails both checks.
    values = sigmas.tolist()
    if values[-1] != 0:
        raise ValueError(f"a sigma grid must end in 0, got last value {values[-1]:g}")
    if not all(b < a for a, b in zip(values, values[1:])):
        raise ValueError("a sigma grid must be strictly descending")
    return sigmas


# --------------------------------------------------------------------------------------------------
# Training-time noise-level densities


def sample_lognormal_sigma(
    n: int, p_mean: float = -1.2, p_std: float = 1.2, generator=None, device=None
) -> Tensor:
    """EDM training density: ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""
    return (torch.randn(n, generator=generator, device=device) * p_std + p_mean).exp()


def sample_vp_sigma(n: int, eps_t: float = 1e-5, generator=None, device=None) -> Tensor:
    """VP training density: t ~ U(eps_t, 1), sigma = sigma_VP(t)."""
    t = torch.rand(n, generator=generator, device=device, dtype=torch.float64) * (1 - eps_t) + eps_t
    return vp_sigma(t).float()
