"""Analytic teachers: exact denoisers of Gaussians and isotropic Gaussian mixtures (Tweedie's formula).

For p = sum_k pi_k N(mu_k, s_k^2 I), the noised density is p_sigma = sum_k pi_k N(mu_k, (s_k^2 + sigma^2) I) and
the exact denoiser is D*(x; sigma) = sum_k r_k(x) [mu_k + s_k^2/(s_k^2+sigma^2) (x - mu_k)], with the
responsibilities r_k computed by log-sum-exp. Works for vectors (shape (D,)) and image-shaped tensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError
from ..schema import GMM_SPEC, load_json

TOY_SPECS = {"ring8": "eight isotropic 2-D Gaussians on the unit circle, std 0.1, equal weights"}


class GaussianMixture(Denoiser):
    """Exact denoiser, sampler and log-density of an isotropic Gaussian mixture (float64 inside)."""

    def __init__(self, means, stds, weights=None, sigma_min=0.002, sigma_max=80.0, name: str | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise DiffdistillError(f"means must be [K, *shape] with K >= 1, got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        weights = torch.ones(k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if stds.numel() != k or weights.numel() != k:
            raise DiffdistillError(f"mismatched lengths: {k} means, {stds.numel()} stds, {weights.numel()} weights")
        if not (bool(torch.isfinite(means).all()) and bool(torch.isfinite(stds).all())
                and bool(torch.isfinite(weights).all())):
            raise DiffdistillError("means, stds and weights must be finite (NaN or inf found)")
        if not bool((stds > 0).all()):
            raise DiffdistillError("every std must be positive")
        if bool((weights < 0).any()) or not float(weights.sum()) > 0:
            raise DiffdistillError("weights must be non-negative and sum to a positive number")

        data_std = float(((means - means.mean(0)) ** 2).mean().add((stds**2 * weights / weights.sum()).sum()).sqrt())
        super().__init__(means.shape[1:], sigma_min, sigma_max, sigma_data=data_std)
        self.register_buffer("means", means, persistent=False)
        self.register_buffer("stds", stds, persistent=False)
        self.register_buffer("weights", weights / weights.sum(), persistent=False)
        self.name = name

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    # -- exact quantities ---------------------------------------------------------------------------
    def _log_resp(self, x: Tensor, sigma: Tensor) -> Tensor:
        """log pi_k N(x; mu_k, (s_k^2+sigma^2) I), shape [B, K]."""
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2                   # [B, K]
        d2 = ((x.flatten(1)[:, None, :] - self.means.flatten(1)[None]) ** 2).sum(-1)  # [B, K]
        return self.weights.log()[None] - 0.5 * d2 / var - 0.5 * self.dim * torch.log(2 * math.pi * var)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        dtype = x.dtype
        x, sigma = x.double(), sigma.double()
        r = torch.softmax(self._log_resp(x, sigma), dim=1)                    # responsibilities [B, K]
        shrink = self.stds[None] ** 2 / (self.stds[None] ** 2 + sigma[:, None] ** 2)  # [B, K]
        xf, mf = x.flatten(1), self.means.flatten(1)
        per_mode = mf[None] + shrink[..., None] * (xf[:, None] - mf[None])    # [B, K, D]
        return (r[..., None] * per_mode).sum(1).reshape(x.shape).to(dtype)

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """log p_sigma(x) per sample (sigma = 0: the data density)."""
        x = x.double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        return torch.logsumexp(self._log_resp(x, sigma), dim=1)

    def mode_of(self, x: Tensor) -> Tensor:
        """Index of the most responsible mode at sigma = 0 (the nearest mode for equal stds)."""
        x = x.double()
        return self._log_resp(x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)).argmax(1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples (float32): a mode by its weight, then mu_k + s_k * N(0, I)."""
        k = torch.multinomial(self.weights.float().cpu(), n, replacement=True, generator=generator)
        z = torch.randn(n, *self.shape, generator=generator, dtype=torch.float64)
        return (self.means.cpu()[k] + self.stds.cpu()[k].reshape(-1, *([1] * len(self.shape))) * z).float()

    def config(self) -> dict:
        return dict(type="gmm", means=self.means.tolist(), stds=self.stds.tolist(), weights=self.weights.tolist(),
                    sigma_min=self.sigma_min, sigma_max=self.sigma_max, name=self.name)


def Gaussian(mean, std, **kwargs) -> GaussianMixture:
    """An isotropic Gaussian N(mean, std^2 I): the one-component mixture."""
    return GaussianMixture(torch.as_tensor(mean, dtype=torch.float64)[None], [float(std)], [1.0], **kwargs)


def build_gmm(config: dict) -> GaussianMixture:
    return GaussianMixture(config["means"], config["stds"], config["weights"], config.get("sigma_min", 0.002),
                           config.get("sigma_max", 80.0), config.get("name"))


def ring8() -> GaussianMixture:
    """`toy:ring8`: means (cos 2 pi k/8, sin 2 pi k/8), k=0..7, std 0.1, equal weights."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return GaussianMixture(torch.stack([ang.cos(), ang.sin()], 1), [0.1] * 8, [1.0] * 8, name="toy:ring8")


def is_analytic_spec(spec) -> bool:
    return isinstance(spec, str) and (spec.startswith("toy:") or spec.startswith("gmm:"))


def load_analytic(spec: str) -> GaussianMixture:
    """`toy:NAME` or `gmm:PATH.json` ({"means": K lists, "stds": K numbers, "weights": K numbers})."""
    if spec.startswith("toy:"):
        name = spec[4:]
        if name != "ring8":
            raise DiffdistillError(f"unknown toy data set {spec!r} (known: {', '.join('toy:' + k for k in TOY_SPECS)})")
        return ring8()
    if not spec.startswith("gmm:"):
        raise DiffdistillError(f"not an analytic spec: {spec!r} (toy:ring8 or gmm:PATH.json)")
    path = Path(spec[4:])
    cfg = load_json(path, GMM_SPEC, "gmm spec")   # finite means, positive stds, K x D within bounds
    mixture = GaussianMixture(cfg["means"], cfg["stds"], cfg["weights"], name=f"gmm:{path.name}")
    mixture.source = str(path)   # named by errors of what it produces (samplers.iter_samples)
    return mixture
