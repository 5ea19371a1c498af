"""Discrete-time VP teachers (DDPM / DDIM checkpoints) as denoisers in EDM sigma space.

A DDPM-style model predicts eps, v or x0 from `z_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps` at an integer
timestep t in 0..T-1. In EDM coordinates (Karras et al. 2022, Table 1) timestep t is the noise level

    sigma_t = sqrt((1 - abar_t) / abar_t)          (so abar_t = 1 / (1 + sigma_t^2)),

and `z_t = x_sigma / sqrt(1 + sigma^2)`. `DiscreteVPDenoiser` feeds the network `z = x / sqrt(1 + sigma^2)`
(always with the *requested* sigma) and a timestep chosen from sigma by one of two documented rules:

- `nearest` (default): the table entry whose log-sigma is closest to log(sigma). At the table's own levels this
  is exactly the training timestep, which is what diffusers' schedulers feed the network.
- `interp`: a fractional timestep, interpolating linearly in log-sigma between the two neighbouring table
  entries (k-diffusion's `sigma_to_t`), clamped to [0, T-1]. UNets with sinusoidal time embeddings accept it.

The output is converted to x0 with `diffusion.param` (eps: Ho et al. 2020 Eq. 15; v: Salimans & Ho 2022 §4).

Samplers can run on the teacher's own timesteps: `ddim_timesteps` reproduces diffusers'
`DDIMScheduler.set_timesteps` (and `DDPMScheduler`'s), and `discrete_sigmas_for` turns such a timestep list into
an EDM sigma grid ending in 0. Deterministic DDIM is then `samplers.sample_euler` on that grid (DDIM paper, §4.3:
a DDIM step in VP form is one Euler step on `x = z / alpha` followed by multiplication by alpha).

The VP prior: diffusers (and DDPM/DDIM) start from `z_T ~ N(0, I)` at the first timestep, i.e. from
`x_T = z_T / alpha_T = z_T sqrt(1 + sigma_T^2)` in EDM coordinates, not from EDM's `sigma_T z`. A denoiser
with `discrete_sigmas` is such a teacher: `samplers.initial_noise_scale` gives it this start, which
`samplers.sample` / `iter_samples` and the KD pairs (`methods.kd_pairs`) use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..diffusion import param
from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError

PREDICTIONS = ("epsilon", "v_prediction", "sample")
TIMESTEP_RULES = ("nearest", "interp")
SPACINGS = ("leading", "trailing", "linspace")


def sigma_to_timestep(sigma: Tensor, log_sigmas: Tensor, rule: str = "nearest") -> Tensor:
    """Timestep (float) for EDM level(s) `sigma` given the ascending table `log_sigmas` [T] (index = timestep).

    nearest: argmin_t |log sigma_t - log sigma|; interp: fractional t, linear in log-sigma, clamped to [0, T-1].
    sigma = 0 maps to timestep 0.
    """
    log_sigma = sigma.double().clamp_min(1e-30).log()
    log_sigmas = log_sigmas.to(device=sigma.device, dtype=torch.float64)
    if rule == "nearest":
        return (log_sigma[:, None] - log_sigmas[None]).abs().argmin(dim=1).double()
    if rule != "interp":
        raise DiffdistillError(f"unknown timestep rule {rule!r} ({', '.join(TIMESTEP_RULES)})")
    n = log_sigmas.numel()
    # index of the lower neighbour, so that log_sigmas[lo] <= log_sigma <= log_sigmas[lo + 1]
    lo = (torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1).clamp(0, n - 2)
    left, right = log_sigmas[lo], log_sigmas[lo + 1]
    w = ((log_sigma - left) / (right - left)).clamp(0, 1)
    t = lo.double() + w
    # beyond the table: clamp (w is already clamped inside [0, 1] of the end intervals)
    return t.clamp(0, n - 1)


class DiscreteVPDenoiser(Denoiser):
    """Adapts a network `model(z, t, cond) -> eps | v | x0` on DDPM's discrete timesteps to D(x, sigma, cond).

    `alphas_cumprod` [T] is the training schedule (abar_t, index = timestep). `prediction` is diffusers' name
    ('epsilon' | 'v_prediction' | 'sample'); `timestep_rule` how sigma becomes a timestep ('nearest' | 'interp').
    Subclasses adapt other calling conventions by overriding `run_model`.

    `ddpm_variance` is the per-step noise `samplers.sample_ddpm` draws for this teacher (DDPM's fixed_small =
    the posterior variance, or fixed_large = beta_t); diffusers teachers take their scheduler's variance_type.
    """

    ddpm_variance = "fixed_small"

    def __init__(self, model: nn.Module, shape, alphas_cumprod: Tensor, prediction: str = "epsilon",
                 timestep_rule: str = "nearest", label_dim: int = 0, sigma_data: float = 0.5):
        if prediction not in PREDICTIONS:
            raise DiffdistillError(f"unknown prediction type {prediction!r} ({', '.join(PREDICTIONS)})")
        if timestep_rule not in TIMESTEP_RULES:
            raise DiffdistillError(f"unknown timestep rule {timestep_rule!r} ({', '.join(TIMESTEP_RULES)})")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise DiffdistillError("alphas_cumprod must be strictly decreasing with values in (0, 1) "
                                   "(a zero-terminal-SNR schedule has no finite EDM sigma at its last timestep)")
        # sigma_t = sqrt((1 - abar_t) / abar_t): ascending in t (DDPM's linear betas: 0.0100005 ... 157.407)
        sigmas = ((1 - abar) / abar).sqrt()
        super().__init__(shape, float(sigmas[0]), float(sigmas[-1]), sigma_data, label_dim)
        self.model = model
        self.prediction = prediction
        self.timestep_rule = timestep_rule
        self.alphas_cumprod = abar
        self.discrete_sigmas = sigmas
        self._log_sigmas = sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def timestep(self, sigma: Tensor) -> Tensor:
        """The (float64) timestep the network is given at EDM level sigma [B], by `self.timestep_rule`."""
        return sigma_to_timestep(sigma, self._log_sigmas, self.timestep_rule)

    def run_model(self, z: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The raw network output at VP input z and timestep t [B] (float)."""
        return self.model(z, t, cond)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        s = param.append_dims(sigma.to(dtype), x.to(dtype))
        alpha, sigma_t = param.vp_from_edm(s)          # alpha = 1/sqrt(1+sigma^2), sigma_t = sigma * alpha
        z = alpha * x.to(dtype)
        out = self.run_model(z, self.timestep(sigma), cond).to(dtype)
        if self.prediction == "epsilon":
            x0 = param.x_from_eps(z, out, alpha, sigma_t)
        elif self.prediction == "v_prediction":
            x0 = param.x_from_v(z, out, alpha, sigma_t)
        else:
            x0 = out
        return x0.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# The teacher's own timesteps


def ddim_timesteps(n: int, spacing: str = "leading", num_train_timesteps: int = 1000,
                   steps_offset: int = 0) -> list[int]:
    """Descending inference timesteps exactly as diffusers' DDIMScheduler/DDPMScheduler.set_timesteps(n).

    leading:  k * (T // n) + steps_offset, k = n-1..0;   trailing: round(T - k T/n) - 1, k = 0..n-1;
    linspace: round(linspace(0, T-1, n)) reversed (Lin et al. 2023, Table 2 names the three).
    """
    if not 1 <= n <= num_train_timesteps:
        raise DiffdistillError(f"number of steps must lie in 1..{num_train_timesteps}, got {n}")
    if spacing == "linspace":
        ts = np.linspace(0, num_train_timesteps - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = num_train_timesteps // n
        ts = (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / n
        ts = np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1
    else:
        raise DiffdistillError(f"unknown timestep spacing {spacing!r} ({', '.join(SPACINGS)})")
    return [int(t) for t in ts]


def discrete_sigmas_for(denoiser, timesteps, set_alpha_to_one: bool = True) -> Tensor:
    """EDM sigma grid (float64, descending, ending in 0) visiting the teacher's timesteps `timesteps` (descending).

    The levels are the table's: sigma_t = sqrt((1 - abar_t) / abar_t). The final step goes to sigma = 0
    (abar = 1, DDIM's `set_alpha_to_one=True` and DDPM's convention). With `set_alpha_to_one=False`, DDIM's last
    step lands on abar_0 instead: the grid then visits sigma_0 = discrete_sigmas[0] before 0, so the state at
    sigma_0 times alpha_0 is diffusers' output, and the sampler's final step from sigma_0 to 0 is one extra
    denoising step diffusers does not take. diffusers' DDIM steps from t to t - T//n; this equals the next listed
    timestep for 'leading' spacing and for 'trailing' with n dividing T (then the samplers reproduce it exactly).
    """
    table = getattr(denoiser, "discrete_sigmas", None)
    if table is None:
        raise DiffdistillError(f"{type(denoiser).__name__} has no discrete timesteps (discrete_sigmas is None)")
    table = torch.as_tensor(table, dtype=torch.float64).cpu()
    ts = torch.as_tensor(list(timesteps), dtype=torch.long)
    if ts.ndim != 1 or ts.numel() < 1:
        raise DiffdistillError("timesteps must be a non-empty list of integers")
    if int(ts.min()) < 0 or int(ts.max()) >= table.numel():
        raise DiffdistillError(f"timesteps must lie in 0..{table.numel() - 1}, got {ts.tolist()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise DiffdistillError(f"timesteps must be strictly descending, got {ts.tolist()}")
    sigmas = [table[ts]]
    if not set_alpha_to_one and int(ts[-1]) != 0:
        sigmas.append(table[:1])
    sigmas.append(torch.zeros(1, dtype=torch.float64))
    return torch.cat(sigmas)
