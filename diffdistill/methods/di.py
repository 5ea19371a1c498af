"""Diff-Instruct (Luo et al., NeurIPS 2023): a one-step generator by integral-KL distribution matching.

Three denoisers (official pkulwj1994/diff_instruct, `di_train.py`): the frozen teacher D_p; an online fake
score D_phi trained with the teacher's EDM loss on generator samples (official `training/di_loss.py:
DI_EDMLoss.__call__`); and the generator x_g = G(init_sigma z; init_sigma) (`di_train.py`, --init_sigma),
updated with the surrogate of the official `DI_EDMLoss.gloss`, L = sum_pixels sg(D_phi(x_s) - D_p(x_s)) * x_g
with x_s = x_g + sigma n, whose gradient is the IKL gradient E[sigma^2 (s_phi - s_p)^T dx_g/dtheta]. Data-free.

The fake score trains on generator samples passed through EDM's augmentation pipeline (`augment.AugmentPipe`,
p = 0.12: `di_train.py`'s default, which the official command keeps), with the augment labels as conditioning
when its network takes them (EDM teachers: augment_dim 9); the generator's own update is not augmented.

For analytic teachers (no network to copy) the generator and the fake score are fresh `Precond(MLP)`s; the
fake score is then first fitted alone to the initial generator for `fake_warmup_steps` steps (the generator's
optimiser is reset when its updates begin), standing in for "initialised from the teacher".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import dist
from ..diffusion import param
from ..diffusion.denoiser import Denoiser
from . import MethodSpec, common
from .base import Batch, Group, Method, OptimConfig, Recipe
from .options import option

EMA_HELP = ("EMA half-life of the generator in kimg (default: the official 500 kimg, i.e. --ema 0.5 Mimg, with "
            "EDM's ramp-up 0.05)")

RECIPES = {
    "cifar10": Recipe(
        source="pkulwj1994/diff_instruct README.md (CIFAR-10 uncond command) with di_train.py's defaults: batch "
               "128, lr = glr = 1e-5, Adam betas (0, 0.999), init_sigma 1.0, augment 0.12, ls = sgls = 1, no LR "
               "warm-up, 200 Mimg, EMA 0.5 Mimg with ramp-up 0.05, dropout kept (0.13)",
        options=dict(batch=128, gen_lr=1e-5, fake_lr=1e-5, betas=(0.0, 0.999), init_sigma=1.0, augment=0.12,
                     loss_scale=1.0, fake_loss_scale=1.0, gen_every=1, teacher_dropout="shared", fake_warmup_steps=0,
                     total_kimg=200000, ema_halflife_kimg=500)),
}


@dataclass
class DIConfig(common.ScoreDistillationConfig):
    """Diff-Instruct settings; defaults are the official CIFAR-10 recipe (Luo et al. 2023, section 4 and the
    official di_train.py)."""

    init_sigma: float = option(1.0, "generator noise level, the same at sampling (default %(default)s)")
    gen_lr: float = option(1e-5, "generator learning rate, the official glr (default %(default)s)")
    fake_lr: float = option(1e-5, "fake-score learning rate, the official lr (default %(default)s)")
    betas: tuple[float, float] = option((0.0, 0.999), "Adam betas of both networks (default %(default)s, official)",
                                        metavar=("B1", "B2"))
    gen_every: int = option(1, "update the generator every k-th step, the fake score every step (default 1 = 1:1)")
    teacher_dropout: str = option("shared", "'shared': teacher and fake net in train mode with equal dropout "
                                  "masks (official); 'eval': both in eval mode", choices=("shared", "eval"))
    p_mean: float = option(-1.2, "lognormal noise levels of both losses (EDM)", cli=False)
    p_std: float = option(1.2, "lognormal noise levels of both losses (EDM)", cli=False)
    loss_scale: float = option(1.0, "generator loss scaling (official ls; default %(default)s)")
    fake_loss_scale: float = option(1.0, "fake-score loss scaling (official sgls; default %(default)s)")
    augment: float | None = option(None, common.AUGMENT_HELP, metavar="P")
    student_dropout: float | None = common.student_dropout_option(
        None, "the teacher's, as the official: its EDM net has dropout 0.13")


def di_generator_loss(teacher: Denoiser, fake: Denoiser, x_g: Tensor, cond: Tensor | None = None,
                      sigma: Tensor | float | None = None, dropout: str = "shared", p_mean: float = -1.2,
                      p_std: float = 1.2) -> tuple[Tensor, Tensor]:
    """Diff-Instruct generator surrogate (official `DI_EDMLoss.gloss`): mean over the batch of
    sum_pixels sg(D_f - D_p) * x_g.

    sigma: None draws EDM's lognormal levels; a float or [B] tensor fixes them (as the closed-form check of the
    expected gradient, with 1-D Gaussian data and an affine generator, needs). Returns (loss, per-sample
    ||D_f - D_p||^2 for logging). Both denoisers run without gradients, with shared dropout masks when
    dropout='shared'.
    """
    n = x_g.shape[0]
    if sigma is None:
        sigma = common.sample_sigma(n, teacher, p_mean, p_std, device=x_g.device)
    sigma = torch.as_tensor(sigma, device=x_g.device, dtype=x_g.dtype).expand(n) \
        if not torch.is_tensor(sigma) or sigma.ndim == 0 else sigma
    with torch.no_grad():
        x_s = x_g.detach() + param.append_dims(sigma, x_g) * torch.randn_like(x_g)
        d_real, d_fake = common.paired_denoise([teacher, fake], x_s, sigma, cond, dropout)
        diff = (d_fake - d_real).to(x_g.dtype)
    loss = (diff * x_g).flatten(1).sum(1).mean()
    return loss, diff.flatten(1).pow(2).sum(1)


class DiffInstruct(common.ScoreDistillation, Method):
    """Diff-Instruct on the shared loop: groups 'fake_score' then 'generator' (the official
    `di_training_loop.py` order)."""

    name = "di"

    def __init__(self, teacher: Denoiser, cfg: DIConfig | None = None, generator: Denoiser | None = None,
                 fake: Denoiser | None = None):
        """generator/fake: ready networks to use instead of copies of the teacher (or fresh MLPs)."""
        super().__init__()
        cfg = (cfg or DIConfig()).resolve(teacher, None)
        self.init_sigma = common.check_sigma(teacher, cfg.init_sigma)
        # As official Diff-Instruct: generator and fake score start from the teacher (fresh MLPs for analytic teachers).
        self._init_networks(teacher, cfg, generator, fake)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        return {
            "fake_score": Group(list(self.fake.parameters()),
                                OptimConfig(lr=cfg.fake_lr, betas=cfg.betas, decay=cfg.lr_decay),
                                loss=self.fake_score_loss),
            "generator": Group(list(self.generator.parameters()),
                               OptimConfig(lr=cfg.gen_lr, betas=cfg.betas, decay=cfg.lr_decay),
                               loss=self.generator_loss, every=cfg.gen_every, start=cfg.fake_warmup_steps),
        }

    def fake_score_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        # As official `DI_EDMLoss.__call__`: G in eval mode without gradients; the fake score (train mode) fits
        # its samples.
        x_g, cond = self.generate_onestep(batch.size, batch.device, grad=False)
        self.fake.train()
        if not bool(torch.isfinite(x_g).all()):
            # The generator diverged, not the fake score: skip this update so that the generator's own
            # (non-finite) loss, next in this step, names it.
            return {"loss": common.zero_loss(self.fake)}
        loss = common.fake_score_loss(self.fake, x_g, cond, cfg.p_mean, cfg.p_std, self.augment_pipe)
        return {"loss": cfg.fake_loss_scale * loss}

    def generator_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        self.generator.train()
        x_g, cond = self.generate_onestep(batch.size, batch.device, grad=True)
        loss, gap = di_generator_loss(self.teacher, self.fake, x_g, cond, None, cfg.teacher_dropout,
                                      cfg.p_mean, cfg.p_std)
        return {"loss": cfg.loss_scale * loss, "score_gap": gap.mean().detach()}

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """The official EMA of G (di_training_loop.py with --ema 0.5 Mimg and ema_mu < 0): EDM's 500 kimg
        half-life with ramp-up 0.05."""
        return 500.0, 0.05


def create(cfg: DIConfig, teacher: Denoiser, data=None, loop=None) -> DiffInstruct:
    method = DiffInstruct(teacher, cfg)
    dist.print0(f"di: generator {common.count_params(method.generator):,} parameters, fake score "
                f"{common.count_params(method.fake):,}, init sigma {method.init_sigma:g}, "
                f"fake-score {method.augment_summary()}")
    return method


SPEC = MethodSpec(name="di", help="Diff-Instruct: one-step generator by integral-KL distribution matching "
                                  "(data-free)",
                  config=DIConfig, create=create, title="Diff-Instruct", recipes=RECIPES, ema_help=EMA_HELP)
