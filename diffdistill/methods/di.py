"""Diff-Instruct (Luo et al., NeurIPS 2023): a one-step generator by integral-KL distribution matching.

Three denoisers (algorithms.md §4): the frozen teacher D_p; an online fake score D_phi trained with the
teacher's EDM loss on generator samples (§4.2); and the generator x_g = G(init_sigma z; init_sigma) (§4.1),
updated with the surrogate of §4.3, L = sum_pixels sg(D_phi(x_s) - D_p(x_s)) * x_g with x_s = x_g + sigma n,
whose gradient is the IKL gradient E[sigma^2 (s_phi - s_p)^T dx_g/dtheta]. Data-free.

The fake score trains on generator samples passed through EDM's augmentation pipeline (`augment.AugmentPipe`,
p = 0.12: `di_train.py`'s default, which the official command keeps), with the augment labels as conditioning
when its network takes them (EDM teachers: augment_dim 9); the generator's own update is not augmented.

For analytic teachers (no network to copy) the generator and the fake score are fresh `Precond(MLP)`s; the
fake score is then first fitted alone to the initial generator for `fake_warmup_steps` steps (the generator's
optimiser is reset when its updates begin), standing in for "initialised from the teacher".
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import Tensor

from ..diffusion import param
from ..diffusion.denoiser import Denoiser
from ..train import dist
from . import common
from .base import Batch, Group, Method, OptimConfig, Recipe

HELP = "Diff-Instruct: one-step generator by integral-KL distribution matching (data-free)"
NEEDS_DATA = False
EMA_HELP = ("EMA half-life of the generator in kimg (default: the official 500 kimg, i.e. --ema 0.5 Mimg, with "
            "EDM's ramp-up 0.05)")
DROPOUT_HELP = "Diff-Instruct keeps the teacher's (generator and fake score are copies of the EDM net, dropout 0.13)"

RECIPES = {
    "cifar10": Recipe(
        source="pkulwj1994/diff_instruct README.md (CIFAR-10 uncond command) with di_train.py's defaults: batch "
               "128, lr = glr = 1e-5, Adam betas (0, 0.999), init_sigma 1.0, augment 0.12, ls = sgls = 1, no LR "
               "warm-up, 200 Mimg, EMA 0.5 Mimg with ramp-up 0.05, dropout kept (0.13)",
        options=("--batch", "128", "--gen-lr", "1e-5", "--fake-lr", "1e-5", "--betas", "0.0", "0.999",
                 "--init-sigma", "1.0", "--augment", "0.12", "--loss-scale", "1.0", "--fake-loss-scale", "1.0",
                 "--gen-every", "1", "--teacher-dropout", "shared", "--fake-warmup-steps", "0",
                 "--kimg", "200000", "--ema", "500")),
}


@dataclass
class DIConfig:
    """Diff-Instruct settings; defaults are the official CIFAR-10 recipe (§4.4)."""

    init_sigma: float = 1.0            # the generator is the denoiser at this fixed level (same at sampling)
    gen_lr: float = 1e-5               # generator learning rate (glr)
    fake_lr: float = 1e-5              # fake-score learning rate (lr)
    betas: tuple[float, float] = (0.0, 0.999)  # Adam betas of both networks (beta1 = 0)
    gen_every: int = 1                 # generator updated every k-th step, the fake score every step (1:1)
    dropout: str = "shared"            # teacher+fake in train mode with shared dropout masks, or 'eval'
    p_mean: float = -1.2               # lognormal noise levels of both losses (EDM)
    p_std: float = 1.2
    loss_scale: float = 1.0            # generator surrogate scaling (ls)
    fake_loss_scale: float = 1.0       # fake-score loss scaling (sgls)
    fake_warmup_steps: int = 0         # steps training only the fake score first (default: 0 for network
                                       # teachers, 300 for analytic ones)
    augment: float | None = None       # EDM augmentation probability of the fake score's samples; None: the
                                       # official 0.12 when the teacher's network takes augment labels (EDM
                                       # teachers, trained with the pipe), else 0 (none)
    student_dropout: float | None = None  # dropout of generator and fake score (None: the teacher's, official)
    mlp_hidden: int = 128              # fresh MLP width/depth (analytic teachers only)
    mlp_depth: int = 3


def di_generator_loss(teacher: Denoiser, fake: Denoiser, x_g: Tensor, cond: Tensor | None = None,
                      sigma: Tensor | float | None = None, dropout: str = "shared", p_mean: float = -1.2,
                      p_std: float = 1.2) -> tuple[Tensor, Tensor]:
    """Diff-Instruct generator surrogate (§4.3): mean over the batch of sum_pixels sg(D_f - D_p) * x_g.

    sigma: None draws EDM's lognormal levels; a float or [B] tensor fixes them (oracle O16). Returns
    (loss, per-sample ||D_f - D_p||^2 for logging). Both denoisers run without gradients, with shared
    dropout masks when dropout='shared'.
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
    """Diff-Instruct on the shared loop: groups 'fake_score' then 'generator' (§4.4's order)."""

    name = "di"

    def __init__(self, teacher: Denoiser, cfg: DIConfig | None = None, generator: Denoiser | None = None,
                 fake: Denoiser | None = None):
        """generator/fake: ready networks to use instead of copies of the teacher (or fresh MLPs)."""
        super().__init__()
        cfg = cfg or DIConfig()
        self.init_sigma = common.check_sigma(teacher, cfg.init_sigma)
        # §4.1: generator and fake score start from the teacher (fresh MLPs for analytic teachers).
        self._init_networks(teacher, cfg, generator, fake)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        return {
            "fake_score": Group(list(self.fake.parameters()), OptimConfig(lr=cfg.fake_lr, betas=cfg.betas)),
            "generator": Group(list(self.generator.parameters()), OptimConfig(lr=cfg.gen_lr, betas=cfg.betas),
                               every=cfg.gen_every, start=cfg.fake_warmup_steps),
        }

    def loss(self, group: str, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        if group == "fake_score":
            # §4.2: G in eval mode without gradients; the fake score (train mode) fits its samples.
            x_g, cond = self.generate_onestep(batch.size, batch.device, grad=False)
            self.fake.train()
            if not bool(torch.isfinite(x_g).all()):
                # The generator diverged, not the fake score: skip this update so that the generator's own
                # (non-finite) loss, next in this step, names it.
                return {"loss": common.zero_loss(self.fake)}
            loss = common.fake_score_loss(self.fake, x_g, cond, cfg.p_mean, cfg.p_std, self.augment_pipe)
            return {"loss": cfg.fake_loss_scale * loss}
        if group == "generator":
            self.generator.train()
            x_g, cond = self.generate_onestep(batch.size, batch.device, grad=True)
            loss, gap = di_generator_loss(self.teacher, self.fake, x_g, cond, None, cfg.dropout,
                                          cfg.p_mean, cfg.p_std)
            return {"loss": cfg.loss_scale * loss, "score_gap": gap.mean().detach()}
        raise KeyError(f"unknown group {group!r}")

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """The official EMA of G (di_training_loop.py with --ema 0.5 Mimg and ema_mu < 0): EDM's 500 kimg
        half-life with ramp-up 0.05."""
        return 500.0, 0.05


# --------------------------------------------------------------------------------------------------
# CLI hooks (cli/distill.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Diff-Instruct")
    d = DIConfig()
    g.add_argument("--init-sigma", type=float, default=d.init_sigma,
                   help="generator noise level (default %(default)s)")
    g.add_argument("--gen-lr", type=float, default=d.gen_lr, help="generator lr (default %(default)s)")
    g.add_argument("--fake-lr", type=float, default=d.fake_lr, help="fake-score lr (default %(default)s)")
    g.add_argument("--gen-every", type=int, default=d.gen_every,
                   help="update the generator every k-th step, the fake score every step (default 1 = 1:1)")
    g.add_argument("--teacher-dropout", choices=["shared", "eval"], default=d.dropout,
                   help="'shared': teacher and fake net in train mode with equal dropout masks (official); "
                        "'eval': both in eval mode")
    g.add_argument("--betas", type=float, nargs=2, default=d.betas, metavar=("B1", "B2"),
                   help="Adam betas of both networks (default %(default)s, official)")
    g.add_argument("--loss-scale", type=float, default=d.loss_scale,
                   help="generator loss scaling (official ls; default %(default)s)")
    g.add_argument("--fake-loss-scale", type=float, default=d.fake_loss_scale,
                   help="fake-score loss scaling (official sgls; default %(default)s)")
    common.add_augment_argument(g)
    common.add_fake_warmup_argument(g)


def build(args: argparse.Namespace, teacher: Denoiser, data=None) -> DiffInstruct:
    warm = common.fake_warmup_steps(args.fake_warmup_steps, teacher)
    cfg = DIConfig(init_sigma=args.init_sigma, gen_lr=args.gen_lr, fake_lr=args.fake_lr,
                   betas=tuple(args.betas), gen_every=args.gen_every, dropout=args.teacher_dropout,
                   loss_scale=args.loss_scale, fake_loss_scale=args.fake_loss_scale, fake_warmup_steps=warm,
                   augment=args.augment, student_dropout=common.resolve_dropout(args, None))
    method = DiffInstruct(teacher, cfg)
    dist.print0(f"di: generator {common.count_params(method.generator):,} parameters, fake score "
                f"{common.count_params(method.fake):,}, init sigma {method.init_sigma:g}, "
                f"fake-score {method.augment_summary()}")
    return method
