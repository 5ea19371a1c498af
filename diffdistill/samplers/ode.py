"""Multi-step samplers of the probability-flow ODE (and DDPM's ancestral chain) in EDM sigma space.

Every sampler is a stateless function `fn(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None)`:
`noise` is unit Gaussian [B, *shape] and is scaled by sigmas[0] (`samplers.sample` first rescales it to a VP
teacher's prior, `prior_scale`); `sigmas` descends and ends in 0. The state is
kept in float64 (as EDM's sampler does); the denoiser is called in its own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..diffusion import param
from ..diffusion.schedules import check_sigmas
from ..errors import DiffdistillError


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


# --------------------------------------------------------------------------------------------------
# Single steps of the probability-flow ODE dx/dsigma = (x - D(x; sigma))/sigma (Karras et al. 2022, §2 with
# sigma(t) = t), at one level (a 0-dim sigma) or at per-sample levels ([B]). The samplers below and the
# methods that step a teacher (progressive distillation's target, consistency distillation's teacher step) use
# these, so each step is written once.


def ddim_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor,
              eps_denoised: Tensor | None = None) -> Tensor:
    """One deterministic DDIM step sigma -> sigma_next (Song et al. 2021, Eq. 12 with eta = 0), in EDM form:
    D + (sigma_next/sigma)(x - D), which equals the Euler step x + (sigma_next - sigma)(x - D)/sigma and is exact
    in floating point at huge sigma (cosine t = 1).

    eps_denoised: the x-prediction D' whose eps (x - D')/sigma the step keeps, D + (sigma_next/sigma)(x - D')
    (default: D itself); diffusers' DDIM with a clipped D keeps the network's unclipped eps."""
    base = denoised if eps_denoised is None else eps_denoised
    return denoised + param.append_dims(sigma_next / sigma, x) * (x - base)


def heun_step(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor, sigma_next: Tensor,
              second_order: bool = True) -> tuple[Tensor, Tensor]:
    """One step sigma -> sigma_next of Heun's method as Karras et al. 2022 (Algorithms 1-2) take it: the Euler step
    x' = x + (sigma_next - sigma) d with d = (x - D(x; sigma))/sigma, then, with `second_order`, the trapezoidal
    correction x + (sigma_next - sigma)(d/2 + d'/2), d' = (x' - D(x'; sigma_next))/sigma_next (needs
    sigma_next > 0). `denoise(x, sigma)` gives D. Returns (x_next, D(x; sigma))."""
    s, s_next = param.append_dims(sigma, x), param.append_dims(sigma_next, x)
    denoised = denoise(x, sigma)
    d = param.eps_from_denoised(x, denoised, s)
    x_next = x + (s_next - s) * d
    if second_order:
        d2 = param.eps_from_denoised(x_next, denoise(x_next, sigma_next), s_next)
        x_next = x + (s_next - s) * (0.5 * d + 0.5 * d2)
    return x_next, denoised


def _start(noise: Tensor, sigmas) -> tuple[Tensor, Tensor]:
    sigmas = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64)).to(noise.device)
    return noise.to(torch.float64) * sigmas[0], sigmas


def clip_limit(clip_denoised: bool | float) -> float | None:
    """The clipping range of the denoised prediction: None (off), 1.0 for True (images in [-1, 1]), or a
    positive number (diffusers' clip_sample_range, progressive distillation's clipping_value)."""
    if not clip_denoised:
        return None
    lim = 1.0 if clip_denoised is True else float(clip_denoised)
    if not 0 < lim < math.inf:
        raise DiffdistillError(f"clip_denoised must be true, false or a positive range, got {clip_denoised!r}")
    return lim


def x0_clipper(clip_denoised: bool | float = False, dynamic_threshold: float | None = None,
               threshold_max: float = 1.0):
    """The treatment of the denoised prediction D at each step, as a function D -> D_c, or None (none).

    clip_denoised: clamp to [-c, c] (`clip_limit`). dynamic_threshold (a ratio p in (0, 1]; takes precedence, as
    in diffusers): Imagen's dynamic thresholding, diffusers' `_threshold_sample`: per sample,
    s = clamp(quantile_p(|D|), 1, threshold_max) (linear interpolation, as torch.quantile), then D_c =
    clamp(D, -s, s) / s (threshold_max: diffusers' sample_max_value)."""
    if dynamic_threshold is None:
        lim = clip_limit(clip_denoised)
        return None if lim is None else (lambda d: d.clamp(-lim, lim))
    p, top = float(dynamic_threshold), float(threshold_max)
    if not 0 < p <= 1 or not 1 <= top < math.inf:
        raise DiffdistillError(f"dynamic thresholding needs a ratio in (0, 1] and a max value >= 1, got "
                               f"dynamic_threshold={dynamic_threshold!r}, threshold_max={threshold_max!r}")

    def threshold(d: Tensor) -> Tensor:
        flat = d.reshape(d.shape[0], -1)
        ranked = flat.abs().sort(dim=1).values       # torch.quantile without its input-size limit
        pos = p * (flat.shape[1] - 1)
        lo, frac = int(math.floor(pos)), pos - math.floor(pos)
        hi = min(lo + 1, flat.shape[1] - 1)
        s = (ranked[:, lo] + frac * (ranked[:, hi] - ranked[:, lo])).clamp(1.0, top)[:, None]
        return (torch.minimum(torch.maximum(flat, -s), s) / s).reshape(d.shape)
    return threshold


@torch.no_grad()
def sample_euler(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None,
                 clip_denoised: bool | float = False, clip_keeps_eps: bool = False,
                 dynamic_threshold: float | None = None, threshold_max: float = 1.0):
    """Euler steps of dx/dsigma = (x - D)/sigma. Equals deterministic DDIM (Song, Meng & Ermon 2021, §4.3).

    clip_denoised: clip D to [-1, 1] (or [-c, c]) at every step. The step is then D_c + (s'/s)(x - D_c), i.e.
    eps is recomputed from the clipped x-hat: the official PD sampler (`dpm.py: _run_model(clip_x=True)`,
    `eval_clip_denoised=True`) and diffusers' DDIM with use_clipped_model_output=True. clip_keeps_eps: the
    step keeps the network's unclipped eps, D_c + (s'/s)(x - D): diffusers' DDIMScheduler default
    (clip_sample=True, use_clipped_model_output=False), which DDIMPipeline runs. dynamic_threshold /
    threshold_max: diffusers' thresholding instead of the clamp (`x0_clipper`), with the same eps rule.
    """
    clip = x0_clipper(clip_denoised, dynamic_threshold, threshold_max)
    x, sigmas = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        denoised = call_denoiser(denoiser, x, sigmas[i], cond)
        base = denoised
        if clip is not None:
            denoised = clip(denoised)
            base = base if clip_keeps_eps else denoised
        x = ddim_step(x, denoised, sigmas[i], sigmas[i + 1], eps_denoised=base)
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
        # the 2nd-order correction is skipped on the final step to 0 (Karras et al. 2022, Algorithm 2)
        x, denoised = heun_step(lambda y, s: call_denoiser(denoiser, y, s, cond), x, t_hat, t_next,
                                second_order=bool(t_next > 0))
        if callback is not None:
            callback(i, x, denoised)
    return x


DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")


@torch.no_grad()
def sample_ddpm(denoiser, noise, sigmas, *, cond=None, generator=None, callback=None,
                variance: str | None = None, clip_denoised: bool | float = False,
                dynamic_threshold: float | None = None, threshold_max: float = 1.0):
    """DDPM ancestral sampling: x_s ~ q(x_s | x_t, x0 = D) in EDM coordinates (Ho et al. 2020, Eq. 6-7).

    The mean is D + (s'/s)^2 (x - D) for every variance; the noise std (x space) is, by `variance` (default:
    the denoiser's `ddpm_variance`, diffusers' scheduler variance_type, else 'fixed_small'):
      fixed_small (= fixed_small_log): the posterior's, s'/s sqrt(s^2 - s'^2) (= DDIM with eta=1);
      fixed_large: DDPM's beta_t = 1 - abar_t/abar_s with abar = 1/(1 + sigma^2), i.e. z-space std
      sqrt(beta_t), x-space sqrt((s^2 - s'^2)(1 + s'^2)/(1 + s^2)) (diffusers' DDPMScheduler, PD's 'large').
    Learned variances (the network's second output) are refused. clip_denoised clips D (diffusers'
    clip_sample; dynamic_threshold / threshold_max: its thresholding, `x0_clipper`). Noise is drawn (float32)
    only on steps that end above 0; the last step returns D.
    """
    kind = variance or getattr(denoiser, "ddpm_variance", None) or "fixed_small"
    if kind not in DDPM_VARIANCES:
        raise DiffdistillError(f"DDPM sampling with variance_type {kind!r} is not supported (only fixed_small "
                               "and fixed_large: a learned variance needs the network's variance output); "
                               "sample with euler/ddim instead")
    clip = x0_clipper(clip_denoised, dynamic_threshold, threshold_max)
    x, sigmas = _start(noise, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = call_denoiser(denoiser, x, s, cond)
        if clip is not None:
            denoised = clip(denoised)
        if s_next == 0:
            x = denoised
        else:
            if kind == "fixed_large":
                std = ((s**2 - s_next**2) * (1 + s_next**2) / (1 + s**2)).sqrt()
            else:
                std = s_next / s * (s**2 - s_next**2).sqrt()
            x = denoised + (s_next / s) ** 2 * (x - denoised) + std * randn_like(x, generator)
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
