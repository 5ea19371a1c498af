"""Score identity distillation, SiD (Zhou et al. 2024; algorithms.md §6.3): a data-free one-step generator.

Three denoisers, as in Diff-Instruct: the frozen teacher D_r, a fake score D_f trained with the teacher's
EDM loss on generator samples (§4.2, `common.fake_score_loss`; EDM-augmented with p = 0.12 and augment labels
for EDM teachers, sid_train.py's default, as in DI), and the generator
x_g = G(init_sigma z; init_sigma).
The generator minimises the SiD loss (Zhou et al. 2024, Eq. 23 as implemented in `training/sid_loss.py`):
  L = (y_r - y_f) . [(y_r - x_g) - alpha (y_r - y_f)] / w,   y_* = D_*(x_g + sigma n; sigma),
with w = stop-grad(mean |x_g - y_r|), gradients flowing through x_g and, via their inputs, through both
denoisers (whose parameters stay fixed).

Training follows `sid_training_loop.py`: Adam with beta1 = 0 for both networks (the generator's is --g_beta1),
the fake score first and then the generator each step, each on fresh generator samples; the networks keep the
teacher's dropout (`sid_train.py --dropout`, the EDM teachers' 0.13 / 0.1); an EMA of the generator with EDM's
rule (half-life `--ema` Mimg, ramp-up 0.05).
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion import param
from ..diffusion.denoiser import Denoiser
from ..diffusion.schedules import karras_index_sigma
from ..errors import DiffdistillError
from ..train import dist
from . import common
from .base import Batch, Group, Method, OptimConfig, Recipe

HELP = "SiD: score identity distillation into a one-step generator (data-free)"
NEEDS_DATA = False
EMA_HELP = ("EMA half-life of the generator in kimg (default: SiD's, 500 kimg with EDM's ramp-up 0.05: "
            "run_sid.sh's --ema 0.5 Mimg; 2000 on ImageNet-64)")
DROPOUT_HELP = "SiD: the teacher's, as sid_train.py builds every network with the EDM teacher's --dropout"

_SID_COMMON = ("--alpha", "1.2", "--t-max", "800", "--init-sigma", "2.5", "--loss-scale", "100",
               "--gen-beta1", "0")


def _cifar10_options(args, teacher) -> tuple[str, ...]:
    """run_sid.sh 'cifar10-uncond' / 'cifar10-cond': 500 Mimg, or 800 Mimg for the class-conditional teacher."""
    kimg = "800000" if teacher.label_dim > 0 else "500000"
    return ("--batch", "256", "--kimg", kimg, "--gen-lr", "1e-5", "--fake-lr", "1e-5", *_SID_COMMON,
            "--ema", "500", "--augment", "0.12")


RECIPES = {
    "cifar10": Recipe(
        source="SiD CIFAR-10 (mingyuanzhou/SiD run_sid.sh cifar10-uncond / cifar10-cond and sid_train.py's "
               "defaults: fp32, dropout = the teacher's 0.13, the fake score's EDM augmentation p = 0.12)",
        options=_cifar10_options),
    "imagenet64": Recipe(
        source="SiD ImageNet-64 (mingyuanzhou/SiD run_sid.sh imagenet64-cond: dropout = the teacher's 0.1, "
               "no augmentation; the official ran fp16 with Adam eps 1e-6, diffdistill fp32 (or --bf16) with "
               "eps 1e-8)",
        options=("--batch", "8192", "--kimg", "1000000", "--gen-lr", "4e-6", "--fake-lr", "4e-6", *_SID_COMMON,
                 "--ema", "2000", "--augment", "0")),
}


@contextlib.contextmanager
def params_frozen(*modules: nn.Module):
    """Build the graph without the modules' parameters (gradients reach their inputs, never their weights)."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def sid_sigma(n: int, denoiser: Denoiser, t_max: float = 800.0, rho: float = 7.0, device=None) -> Tensor:
    """SiD's generator levels: the Karras map of u ~ U(0, t_max/1000), u = 0 -> sigma_min, u = 1 -> sigma_max
    (sigma in [0.002, 24.41] for t_max = 800)."""
    u = torch.rand(n, device=device, dtype=torch.float64) * (t_max / 1000)
    return karras_index_sigma(1 - u, 2, denoiser.sigma_min, denoiser.sigma_max, rho).float()


def sid_generator_loss(teacher: Denoiser, fake: Denoiser, x_g: Tensor, sigma: Tensor,
                       cond: Tensor | None = None, alpha: float = 1.2, normalise: bool = True,
                       noise: Tensor | None = None, dropout: str = "eval") -> Tensor:
    """Per-sample SiD generator loss [B] (summed over pixels). `noise` (unit, like x_g) is drawn when None.

    normalise=False sets w = 1 (oracle O17). The denoisers' parameters receive no gradient.
    """
    n = torch.randn_like(x_g) if noise is None else noise
    x_s = x_g + param.append_dims(sigma, x_g) * n
    with params_frozen(teacher, fake):
        y_real, y_fake = common.paired_denoise([teacher, fake], x_s, sigma, cond, dropout)
    y_real, y_fake = y_real.to(x_g.dtype), y_fake.to(x_g.dtype)
    gap = y_real - y_fake
    loss = (gap * ((y_real - x_g) - alpha * gap)).flatten(1).sum(1)
    if normalise:
        w = (x_g - y_real).abs().flatten(1).mean(1).detach().clamp(min=1e-5)
        loss = loss / w
    return loss


def drop_nonfinite_mean(per_sample: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of the finite per-sample losses / batch size, number dropped): samples with NaN/inf are dropped, as
    in sid_loss.py. If every sample is non-finite the loss stays non-finite, so the loop stops and names the
    diverging generator instead of training on nothing."""
    finite = torch.isfinite(per_sample)
    if not bool(finite.any()):
        return per_sample.sum(), (~finite).sum().float()
    return per_sample[finite].sum() / per_sample.shape[0], (~finite).sum().float()


@dataclass
class SiDConfig:
    """SiD settings; defaults are the official CIFAR-10 recipe (run_sid.sh, algorithms.md §6.3)."""

    init_sigma: float = 2.5            # the generator is the denoiser at this fixed level (same at sampling)
    alpha: float = 1.2                 # the SiD loss's alpha
    t_max: float = 800.0               # generator levels: Karras map of U(0, t_max/1000)
    loss_scale: float = 100.0          # generator loss scaling (lsg)
    gen_lr: float = 1e-5               # generator learning rate (glr)
    fake_lr: float = 1e-5              # fake-score learning rate (lr)
    betas: tuple[float, float] = (0.0, 0.999)  # Adam betas of the fake score (fixed in sid_train.py)
    gen_beta1: float = 0.0             # the generator's Adam beta1 (--g_beta1; its beta2 is betas[1])
    gen_every: int = 1                 # generator every k-th step, the fake score every step (1 = 1:1)
    dropout: str = "eval"              # teacher + fake in the generator loss: 'eval' (official) | 'shared'
    p_mean: float = -1.2               # lognormal levels of the fake-score loss (EDM)
    p_std: float = 1.2
    fake_warmup_steps: int = 0         # steps training only the fake score first (analytic teachers: 300)
    student_dropout: float | None = None  # dropout of generator and fake score (None: the teacher's, official)
    augment: float | None = None       # EDM augmentation of the fake score's samples (None: the official 0.12 when
    #                                    the teacher's network takes augment labels, else none)
    mlp_hidden: int = 128              # fresh MLP width/depth (analytic teachers only)
    mlp_depth: int = 3


class SiD(common.ScoreDistillation, Method):
    """SiD on the shared loop: groups 'generator' and 'fake_score', updated 1:1 (§6.3)."""

    name = "sid"

    def __init__(self, teacher: Denoiser, cfg: SiDConfig | None = None, generator: Denoiser | None = None,
                 fake: Denoiser | None = None):
        """generator/fake: networks to use instead of copies of the teacher (fresh MLPs if analytic)."""
        super().__init__()
        cfg = cfg or SiDConfig()
        if not 0 < cfg.t_max <= 1000:
            raise DiffdistillError(f"t_max must lie in (0, 1000], got {cfg.t_max:g}")
        self.init_sigma = common.check_sigma(teacher, cfg.init_sigma)
        self._init_networks(teacher, cfg, generator, fake)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        # Generator first, then the fake score: over a run the same alternation as SiD's fake-then-generator
        # order, but a generator that diverged is the first loss to turn non-finite, so the loop names it.
        return {
            "generator": Group(list(self.generator.parameters()),
                               OptimConfig(lr=cfg.gen_lr, betas=(cfg.gen_beta1, cfg.betas[1])),
                               every=cfg.gen_every, start=cfg.fake_warmup_steps),
            "fake_score": Group(list(self.fake.parameters()), OptimConfig(lr=cfg.fake_lr, betas=cfg.betas)),
        }

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """sid_train.py's default --ema 0.5 (Mimg) with the training loop's ramp-up ratio 0.05 (EDM's rule)."""
        return 500.0, 0.05

    def loss(self, group: str, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        if group == "fake_score":
            x_g, cond = self.generate_onestep(batch.size, batch.device, grad=False)
            self.fake.train()
            return {"loss": common.fake_score_loss(self.fake, x_g, cond, cfg.p_mean, cfg.p_std, self.augment_pipe)}
        if group == "generator":
            x_g, cond = self.generate_onestep(batch.size, batch.device, grad=True)
            sigma = sid_sigma(batch.size, self.teacher, cfg.t_max, device=batch.device)
            per_sample = sid_generator_loss(self.teacher, self.fake, x_g, sigma, cond, cfg.alpha,
                                            dropout=cfg.dropout)
            loss, dropped = drop_nonfinite_mean(per_sample)
            return {"loss": cfg.loss_scale * loss, "dropped": dropped}
        raise KeyError(f"unknown group {group!r}")


# --------------------------------------------------------------------------------------------------
# CLI hooks (cli/distill.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("SiD")
    d = SiDConfig()
    g.add_argument("--init-sigma", type=float, default=d.init_sigma,
                   help="generator noise level (default %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha, help="alpha of the SiD loss (default %(default)s)")
    g.add_argument("--t-max", type=float, default=d.t_max,
                   help="generator levels: Karras map of U(0, t_max/1000) (default %(default)s)")
    g.add_argument("--loss-scale", type=float, default=d.loss_scale,
                   help="generator loss scaling (default %(default)s)")
    g.add_argument("--gen-lr", type=float, default=d.gen_lr,
                   help="generator learning rate (default %(default)s)")
    g.add_argument("--fake-lr", type=float, default=d.fake_lr,
                   help="fake-score learning rate (default %(default)s)")
    g.add_argument("--gen-beta1", type=float, default=d.gen_beta1,
                   help="the generator's Adam beta1 (default %(default)s; the fake score's betas are "
                        f"{d.betas[0]:g}, {d.betas[1]:g})")
    g.add_argument("--gen-every", type=int, default=d.gen_every,
                   help="update the generator every k-th step, the fake score every step (default 1 = 1:1)")
    g.add_argument("--teacher-dropout", choices=["eval", "shared"], default=d.dropout,
                   help="teacher and fake score in the generator loss: eval mode (official) or shared masks")
    common.add_augment_argument(g)
    common.add_fake_warmup_argument(g)


def build(args: argparse.Namespace, teacher: Denoiser, data=None) -> SiD:
    warm = common.fake_warmup_steps(args.fake_warmup_steps, teacher)
    cfg = SiDConfig(init_sigma=args.init_sigma, alpha=args.alpha, t_max=args.t_max,
                    loss_scale=args.loss_scale, gen_lr=args.gen_lr, fake_lr=args.fake_lr,
                    gen_beta1=args.gen_beta1, gen_every=args.gen_every, dropout=args.teacher_dropout,
                    fake_warmup_steps=warm, student_dropout=common.resolve_dropout(args, None),
                    augment=args.augment)
    method = SiD(teacher, cfg)
    dist.print0(f"sid: generator {common.count_params(method.generator):,} parameters, fake score "
                f"{common.count_params(method.fake):,}, init sigma {method.init_sigma:g}, "
                f"alpha {cfg.alpha:g}, dropout {common.dropout_of(method.generator)}, fake-score "
                f"{method.augment_summary()}")
    return method
