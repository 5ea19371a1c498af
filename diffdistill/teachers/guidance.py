"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, Eq. 6, written for x0-predictions).

    D_cfg(x, sigma, c) = D(x, sigma, 0) + w (D(x, sigma, c) - D(x, sigma, 0))

An all-zero one-hot row is the unconditional label. Since every denoiser is affine in its output, guidance on x0
equals guidance on eps or on the score at the same (x, sigma). w = 1 is the conditional denoiser (returned as is,
with no second evaluation), w = 0 the unconditional one. Both branches run in one batched call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError
from ..io import build_denoiser


class CFGDenoiser(Denoiser):
    """Classifier-free guided `denoiser` with guidance scale `scale` (w); a Denoiser itself."""

    def __init__(self, denoiser: Denoiser, scale: float):
        if denoiser.label_dim == 0:
            raise DiffdistillError("classifier-free guidance needs a class-conditional denoiser (label_dim > 0)")
        super().__init__(denoiser.shape, denoiser.sigma_min, denoiser.sigma_max, denoiser.sigma_data,
                         denoiser.label_dim)
        self.denoiser = denoiser
        self.scale = float(scale)
        self.discrete_sigmas = denoiser.discrete_sigmas

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, sigma, cond)
        uncond = torch.zeros_like(cond)
        # one call on [x; x] with labels [0; c]: first half unconditional, second half conditional
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([uncond, cond]))
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + self.scale * (d_cond - d_uncond)

    def config(self) -> dict:
        return dict(type="cfg", scale=self.scale, denoiser=self.denoiser.config())


def build_cfg(config: dict) -> CFGDenoiser:
    if "denoiser" not in config or "scale" not in config:
        raise DiffdistillError("a 'cfg' denoiser config needs 'denoiser' and 'scale'")
    return CFGDenoiser(build_denoiser(config["denoiser"]), float(config["scale"]))
