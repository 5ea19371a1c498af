"""Parameterisations: VP <-> EDM coordinates, x0/eps/v/score conversions, preconditioning scalings.

Each formula lives here once. Notation follows Salimans & Ho 2022 (VP) and Karras et al. 2022 (EDM, Table 1):
VP coordinates  z_t = alpha_t x + sigma_t eps  (alpha^2 + sigma^2 = 1),
EDM coordinates x_sigma = x + sigma n, with  x_sigma = z_t / alpha_t  and  sigma = sigma_t / alpha_t.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Shapes


def append_dims(v: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast a per-sample quantity (scalar, [] or [B]) against x of shape [B, ...]."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    if v.ndim != 1 or v.shape[0] != x.shape[0]:
        raise ValueError(f"sigma of shape {tuple(v.shape)} does not match a batch of shape {tuple(x.shape)}")
    return v.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------------------------------
# VP (alpha, sigma) <-> EDM sigma  (Karras et al. 2022, Table 1: VP scaling s = 1/sqrt(1 + sigma^2))


def vp_from_edm(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """EDM noise level -> VP (alpha_t, sigma_t): alpha = 1/sqrt(1+sigma^2), sigma_t = sigma*alpha."""
    alpha = (1 + sigma**2).rsqrt()
    return alpha, sigma * alpha


def edm_from_vp(alpha: Tensor, sigma_t: Tensor) -> Tensor:
    """VP (alpha_t, sigma_t) -> EDM noise level sigma_t/alpha_t (= exp(-logSNR/2))."""
    return sigma_t / alpha


def edm_from_logsnr(logsnr: Tensor) -> Tensor:
    return torch.exp(-0.5 * logsnr)


def logsnr_from_edm(sigma: Tensor) -> Tensor:
    return -2 * torch.log(sigma)


def alpha_sigma_from_logsnr(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (Kingma et al. 2021)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


# --------------------------------------------------------------------------------------------------
# Prediction conversions in VP coordinates (Salimans & Ho 2022, §4 and Appendix; dpm.py of the official code)


def x_from_eps(z: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    return (z - sigma * eps) / alpha


def eps_from_x(z: Tensor, x: Tensor, alpha, sigma) -> Tensor:
    return (z - alpha * x) / sigma


def v_from_x_eps(x: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """v = alpha*eps - sigma*x."""
    return alpha * eps - sigma * x


def x_from_v(z: Tensor, v: Tensor, alpha, sigma) -> Tensor:
    return alpha * z - sigma * v


def eps_from_v(z: Tensor, v: Tensor, alpha, sigma) -> Tensor:
    return sigma * z + alpha * v


def x_from_both(z: Tensor, x_head: Tensor, eps_head: Tensor, alpha, sigma) -> Tensor:
    """'both' output: sigma^2 * x_head + alpha * (z - sigma*eps_head) (dpm.py, mean_type='both')."""
    return sigma**2 * x_head + alpha * (z - sigma * eps_head)


# --------------------------------------------------------------------------------------------------
# EDM sigma space: eps of a denoiser


def eps_from_denoised(x: Tensor, denoised: Tensor, sigma) -> Tensor:
    return (x - denoised) / sigma


# --------------------------------------------------------------------------------------------------
# Preconditioning (Karras et al. 2022, Table 1). Each returns (c_skip, c_out, c_in, c_noise).


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def boundary_scalings(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Consistency-model / GDD scalings (Song et al. 2023 App. C): f(x, sigma_min) = x exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def vp_scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """VP wrapper with an eps-predicting backbone: D = x - sigma*F(x/sqrt(1+sigma^2)). (c_skip, c_out, c_in)."""
    return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt()


def ve_scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1/c_out^2 (Karras et al. 2022, Table 1).

    On the x-space error, with SNR = 1/sigma^2 this is SNR + 1/sd^2: the SNR weightings below are its relatives
    for VP losses (sd = 1 gives 'snr+1'), but EDM's weight keeps its own form and sigma_data."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


# --------------------------------------------------------------------------------------------------
# SNR weightings of an x-space MSE (Salimans & Ho 2022, §4: the 'truncated SNR' and 'SNR+1' weightings)

SNR_WEIGHTINGS = ("snr_trunc", "snr", "snr+1", "v_mse", "constant")


def snr_weight(sigma: Tensor, weighting: str = "snr_trunc") -> Tensor:
    """Per-example weight of an x-space MSE, in float64, with SNR = alpha^2/sigma_t^2 = 1/sigma^2 in EDM
    coordinates. At a fixed z_t, ||eps - eps_hat||^2 = SNR ||x - x_hat||^2 and ||v - v_hat||^2 = (1 + SNR)
    ||x - x_hat||^2 (Salimans & Ho 2022, §4 and Appendix), so the weightings are:
      snr_trunc: max(SNR, 1) = max(x-MSE, eps-MSE), Salimans & Ho's 'truncated SNR' weighting;
      snr: SNR, the eps-MSE (Ho et al. 2020's L_simple);
      snr+1 (= v_mse): 1 + SNR, the v-MSE, Salimans & Ho's 'SNR+1' weighting;
      constant: 1, the x-MSE.
    """
    snr = sigma.double() ** -2
    if weighting == "snr_trunc":
        return snr.clamp_min(1.0)
    if weighting == "snr":
        return snr
    if weighting in ("snr+1", "v_mse"):
        return snr + 1
    if weighting == "constant":
        return torch.ones_like(snr)
    from ..errors import DiffdistillError
    raise DiffdistillError(f"unknown weighting {weighting!r} (known: {', '.join(SNR_WEIGHTINGS)})")


# --------------------------------------------------------------------------------------------------
# Network time inputs (c_noise) of VP-type backbones


def cosine_time_from_edm(sigma: Tensor, logsnr_min: float = -20.0, logsnr_max: float = 20.0) -> Tensor:
    """t of the cosine logSNR schedule that gives EDM level sigma ('inv_cos' input of PD's official unet.py).

    lambda(t) = -2 log tan(a t + b); the code clips lambda to [logsnr_min, logsnr_max] and feeds
    arctan(exp(-lambda/2)) / (pi/2), which is t for the untrimmed schedule.
    """
    logsnr = logsnr_from_edm(sigma).clamp(logsnr_min, logsnr_max)
    return torch.atan(torch.exp(-0.5 * logsnr)) / (math.pi / 2)
