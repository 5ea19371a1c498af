"""Score identity distillation, SiD (Zhou et al. 2024; official mingyuanzhou/SiD): a data-free one-step generator.

Three denoisers, as in Diff-Instruct: the frozen teacher D_r, a fake score D_f trained with the teacher's
EDM loss on generator samples (as Diff-Instruct's `DI_EDMLoss.__call__` in the official training/di_loss.py;
here `common.fake_score_loss`; EDM-augmented with p = 0.12 and augment labels for EDM teachers, sid_train.py's
default, as in DI), and the generator x_g = G(init_sigma z; init_sigma).
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

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import dist
from ..diffusion import param
from ..diffusion.denoiser import Denoiser
from ..diffusion.schedules import karras_index_sigma
from ..errors import UsageError
from . import MethodSpec, common
from .base import Batch, Group, Method, OptimConfig, Recipe
from .options import option

EMA_HELP = ("EMA half-life of the generator in kimg (default: SiD's, 500 kimg with EDM's ramp-up 0.05: "
            "run_sid.sh's --ema 0.5 Mimg; 2000 on ImageNet-64)")

_SID_COMMON = dict(alpha=1.2, t_max=800.0, init_sigma=2.5, loss_scale=100.0, gen_beta1=0.0)


def _cifar10_options(teacher) -> dict:
    """run_sid.sh 'cifar10-uncond' / 'cifar10-cond': 500 Mimg, or 800 Mimg for the class-conditional teacher."""
    return dict(batch=256, total_kimg=800000 if teacher.label_dim > 0 else 500000, gen_lr=1e-5, fake_lr=1e-5,
                **_SID_COMMON, ema_halflife_kimg=500, augment=0.12)


RECIPES = {
    "cifar10": Recipe(
        source="SiD CIFAR-10 (mingyuanzhou/SiD run_sid.sh cifar10-uncond / cifar10-cond and sid_train.py's "
               "defaults: fp32, dropout = the teacher's 0.13, the fake score's EDM augmentation p = 0.12)",
        options=_cifar10_options),
    "imagenet64": Recipe(
        source="SiD ImageNet-64 (mingyuanzhou/SiD run_sid.sh imagenet64-cond: dropout = the teacher's 0.1, "
               "no augmentation; the official ran fp16 with Adam eps 1e-6, diffdistill fp32 (or --bf16) with "
               "eps 1e-8)",
        options=dict(batch=8192, total_kimg=1000000, gen_lr=4e-6, fake_lr=4e-6, **_SID_COMMON,
                     ema_halflife_kimg=2000, augment=0.0)),
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

    normalise=False sets w = 1 (as in the tests' closed-form expected gradient for 1-D Gaussian data
    and an affine generator). The denoisers' parameters receive no gradient.
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
class SiDConfig(common.ScoreDistillationConfig):
    """SiD settings; defaults are the official CIFAR-10 recipe (run_sid.sh, sid_train.py)."""

    init_sigma: float = option(2.5, "generator noise level (default %(default)s)")
    alpha: float = option(1.2, "alpha of the SiD loss (default %(default)s)")
    t_max: float = option(800.0, "generator levels: Karras map of U(0, t_max/1000) (default %(default)s)")
    loss_scale: float = option(100.0, "generator loss scaling (default %(default)s)")
    gen_lr: float = option(1e-5, "generator learning rate (default %(default)s)")
    fake_lr: float = option(1e-5, "fake-score learning rate (default %(default)s)")
    betas: tuple[float, float] = option((0.0, 0.999), "Adam betas of the fake score (fixed in sid_train.py); "
                                        "the generator's beta2", cli=False)
    gen_beta1: float = option(0.0, "the generator's Adam beta1 (default %(default)s; the fake score's betas are "
                              "0, 0.999)")
    gen_every: int = option(1, "update the generator every k-th step, the fake score every step (default 1 = 1:1)")
    teacher_dropout: str = option("eval", "teacher and fake score in the generator loss: eval mode (official) or "
                                  "shared masks", choices=("eval", "shared"))
    p_mean: float = option(-1.2, "lognormal levels of the fake-score loss (EDM)", cli=False)
    p_std: float = option(1.2, "lognormal levels of the fake-score loss (EDM)", cli=False)
    augment: float | None = option(None, common.AUGMENT_HELP, metavar="P")
    student_dropout: float | None = common.student_dropout_option(
        None, "the teacher's, as sid_train.py builds every network with the EDM teacher's --dropout")

    def resolve(self, teacher, loop) -> SiDConfig:
        """The fake-score warm-up (`ScoreDistillationConfig.resolve`); checks t_max."""
        if not 0 < self.t_max <= 1000:
            raise UsageError(f"sid: --t-max (t_max) must lie in (0, 1000], got {self.t_max:g}")
        return super().resolve(teacher, loop)


class SiD(common.ScoreDistillation, Method):
    """SiD on the shared loop: groups 'generator' and 'fake_score', updated 1:1 (sid_training_loop.py)."""

    name = "sid"

    def __init__(self, teacher: Denoiser, cfg: SiDConfig | None = None, generator: Denoiser | None = None,
                 fake: Denoiser | None = None):
        """generator/fake: networks to use instead of copies of the teacher (fresh MLPs if analytic)."""
        super().__init__()
        cfg = (cfg or SiDConfig()).resolve(teacher, None)
        self.init_sigma = common.check_sigma(teacher, cfg.init_sigma)
        self._init_networks(teacher, cfg, generator, fake)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        # Generator first, then the fake score: over a run the same alternation as SiD's fake-then-generator
        # order, but a generator that diverged is the first loss to turn non-finite, so the loop names it.
        return {
            "generator": Group(list(self.generator.parameters()),
                               OptimConfig(lr=cfg.gen_lr, betas=(cfg.gen_beta1, cfg.betas[1]), decay=cfg.lr_decay),
                               loss=self.generator_loss, every=cfg.gen_every, start=cfg.fake_warmup_steps),
            "fake_score": Group(list(self.fake.parameters()),
                                OptimConfig(lr=cfg.fake_lr, betas=cfg.betas, decay=cfg.lr_decay),
                                loss=self.fake_score_loss),
        }

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """sid_train.py's default --ema 0.5 (Mimg) with the training loop's ramp-up ratio 0.05 (EDM's rule)."""
        return 500.0, 0.05

    def fake_score_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        x_g, cond = self.generate_onestep(batch.size, batch.device, grad=False)
        self.fake.train()
        return {"loss": common.fake_score_loss(self.fake, x_g, cond, cfg.p_mean, cfg.p_std, self.augment_pipe)}

    def generator_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        x_g, cond = self.generate_onestep(batch.size, batch.device, grad=True)
        sigma = sid_sigma(batch.size, self.teacher, cfg.t_max, device=batch.device)
        per_sample = sid_generator_loss(self.teacher, self.fake, x_g, sigma, cond, cfg.alpha,
                                        dropout=cfg.teacher_dropout)
        loss, dropped = drop_nonfinite_mean(per_sample)
        return {"loss": cfg.loss_scale * loss, "dropped": dropped}


def create(cfg: SiDConfig, teacher: Denoiser, data=None, loop=None) -> SiD:
    method = SiD(teacher, cfg)
    dist.print0(f"sid: generator {common.count_params(method.generator):,} parameters, fake score "
                f"{common.count_params(method.fake):,}, init sigma {method.init_sigma:g}, "
                f"alpha {cfg.alpha:g}, dropout {common.dropout_of(method.generator)}, fake-score "
                f"{method.augment_summary()}")
    return method


SPEC = MethodSpec(name="sid", help="SiD: score identity distillation into a one-step generator (data-free)",
                  config=SiDConfig, create=create, title="SiD", recipes=RECIPES, ema_help=EMA_HELP)
