"""Exponential moving average of networks with EDM's half-life rule (official training_loop.py).

beta = 0.5 ** (batch / max(h, 1e-8)),  h = min(halflife_img, rampup * nimg)  (rampup None: h = halflife_img),
then p_ema <- lerp(p, p_ema, beta) after every optimiser step. Buffers are copied as they are.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def ema_beta(batch: int, nimg: int, halflife_kimg: float, rampup: float | None = 0.05) -> float:
    """EDM's per-step EMA decay for `batch` images when `nimg` images have been seen (after the step)."""
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, rampup * nimg)
    return 0.5 ** (batch / max(halflife, 1e-8))


class EMA:
    """EMA copies of named networks (eval mode, no grad); `modules` is what `Method.export(ema)` takes."""

    def __init__(self, targets: dict[str, nn.Module], halflife_kimg: float, rampup: float | None = 0.05):
        self.targets = dict(targets)
        self.halflife_kimg = float(halflife_kimg)
        self.rampup = rampup
        self.modules: dict[str, nn.Module] = {
            name: copy.deepcopy(net).eval().requires_grad_(False) for name, net in self.targets.items()}

    @torch.no_grad()
    def update(self, nimg: int, batch: int) -> float:
        """One EMA step after an optimiser step that brought the image count to `nimg`. Returns beta."""
        beta = ema_beta(batch, nimg, self.halflife_kimg, self.rampup)
        for name, net in self.targets.items():
            ema = self.modules[name]
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)
        return beta

    def state_dict(self) -> dict[str, Tensor]:
        """Flat {'<target>.<key>': tensor}."""
        return {f"{name}.{k}": v for name, m in self.modules.items() for k, v in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for name, m in self.modules.items():
            prefix = f"{name}."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            m.load_state_dict(sub)
