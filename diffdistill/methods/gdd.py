"""GDD and GDD-I (Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"; official Zyriix/GDD).

GAN fine-tuning of the teacher as a one-step generator on real data: x_g = G(sigma_max z; sigma_max) with the
consistency boundary scalings (official `training/networks.py: GDDPrecond`); non-saturating GAN loss with lazy
R1 on real images (official `training/loss.py`, `training_loop.py`); GDD-I freezes the generator's block 3x3
convolutions and attention output projections (`--freeze 1`), then also qkv (2) and skips (3) (official
`train.py --freeze`). The teacher is never queried for targets: it gives the initialisation and, by
default, the frozen encoder features under the discriminator's trainable heads (the official discriminator,
on frozen VGG16-BN and EfficientNet-lite0 features, is `--disc projected`).

The losses reduce per-patch logits [B, K] as the official `training/loss.py` does. Its discriminator
returns a list with one row of patch logits per (sample, backbone) -- `list += tensor[B, n]` extends the list
by rows -- and the losses are sums over that list of the mean softplus over each row's patches. So a sample
contributes sum_backbones mean_patches softplus(+-D) (the backbones' patch counts: the discriminator's
`splits`), and the samples are *summed* over the per-GPU batch (DDP then averages the GPUs): the loss is
(per-GPU batch) x the batch mean, 64 x for the CIFAR-10 script (batch 256 on 4 GPUs). `loss_samples` fixes
that factor, so that a run here weighs its terms as the official one whatever our process count and
accumulation.

Lazy R1 (Karras et al. 2020, StyleGAN2, Sec. 3.1; official `training_loop.py`): on batches 16, 32, ... (never
0) the discriminator's Adam takes a second step, on the R1 loss alone: r1_every * gamma/2 * mean_i
||grad_x sum_k D_k(x_i)||^2 over the real batch (a mean over samples, unlike the adversarial sums). That is
why the discriminator's lr and beta2 are dlr * 16/17 and 0.99^(16/17): 17 steps per 16 batches
(`lazy_r1_optim`, applied where the optimiser group is built: `disc_lr` is the official --dlr). The gamma
convention is therefore the official one: gamma = 1e-4 weighs R1 against adversarial losses that are sums over
`loss_samples` = 64 samples.
The loop runs that second step as the discriminator group's extra pass (`Group.extra_every`).
For analytic teachers the generator is a fresh boundary-preconditioned `Precond(MLP)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError, UsageError
from . import MethodSpec, common
from .base import Batch, Group, Method, OptimConfig, Recipe
from .discriminators import KINDS, build_discriminator, onehot, r1_penalty
from .options import MethodConfig, option

EMA_HELP = ("EMA half-life of the generator in kimg, with EDM's ramp-up 0.05 (default: GDD's, 500 kimg = train.sh's "
            "--ema=0.5 Mimg with train.py's --ema-warmup 0.05; its ImageNet runs use 50000)")


@dataclass
class GDDConfig(MethodConfig):
    """GDD settings; defaults are the official CIFAR-10 recipe (train.sh). disc_lr and disc_betas are the
    official --dlr and Adam betas before the lazy-R1 scaling: the discriminator's optimiser takes lr x r/(r+1) and
    beta2^(r/(r+1)) with r = r1_every (official: 16/17), applied where its group is built (`lazy_r1_optim`)."""

    freeze: int = option(0, "GDD-I: freeze block convs + attention proj (1), + qkv (2), + skips (3)",
                         choices=(0, 1, 2, 3))
    disc: str = option("auto", "discriminator: the official projected one on frozen VGG16-BN + EfficientNet-lite0 "
                       "features (needs --disc-vgg-weights and --disc-effnet-weights; 'auto' picks it when both are "
                       "given), else heads on the frozen teacher encoder (auto for UNet teachers), a plain conv net, "
                       "an MLP (auto for 2-D data), or a timm/torchvision backbone", choices=KINDS)
    disc_vgg_weights: str | None = option(None, "--disc projected: local weights of VGG16-BN (torchvision layout)",
                                          metavar="PATH")
    disc_effnet_weights: str | None = option(None, "--disc projected: local weights of EfficientNet-lite0 (timm "
                                             "tf_efficientnet_lite0)", metavar="PATH")
    disc_backbone: str | None = option(None, "--disc backbone: timm:NAME or torchvision:NAME (needs that optional "
                                       "package)", metavar="LIB:NAME")
    disc_backbone_weights: str | None = option(None, "local weights of the backbone (.safetensors or a torch state "
                                               "dict)", metavar="PATH")
    diffaug: bool = option(False, "DiffAugment (color, translation, cutout; Zhao et al. 2020) of real and generated "
                           "images inside the discriminator, for small data sets (official --diffaug; off in every "
                           "official command)")
    gen_lr: float = option(1e-4, "generator lr (default %(default)s)")
    disc_lr: float = option(1e-4, "discriminator lr before the lazy-R1 scaling x r/(r+1) (default %(default)s)")
    r1_gamma: float = option(1e-4, "R1 weight gamma, official convention: its own step of r1_every*gamma/2*||grad||^2 "
                             "next to GAN losses summed over --loss-samples samples (default %(default)s)")
    r1_every: int = option(16, "lazy R1 interval: an extra discriminator step on steps r, 2r, ... (0: no R1; "
                           "default %(default)s)")
    loss_samples: int = option(64, "the GAN losses are sums over this many samples' losses, i.e. this x the batch "
                               "mean (official: its per-GPU batch; default %(default)s)")
    gen_sigma: float | None = option(None, "generator noise level (default: sigma_max)")
    student_dropout: float | None = option(0.0, "dropout probability of the generator copied from the teacher, or "
                                           "'teacher' to keep the teacher's (default 0, as train.sh's --dropout=0)",
                                           parse=common.dropout_value, metavar="P|teacher")
    gen_betas: tuple[float, float] = option((0.0, 0.99), "generator Adam betas (official)", cli=False)
    disc_betas: tuple[float, float] = option((0.0, 0.99), "discriminator Adam betas before the lazy-R1 scaling of "
                                             "beta2 (official)", cli=False)
    disc_channels: int = option(64, "width of the discriminator (heads)", cli=False)
    disc_sigma: float = option(0.5, "noise level at which teacher features are read", cli=False)
    disc_noise: bool = option(False, "add that much noise to images before the teacher features", cli=False)
    mlp_hidden: int = option(128, "fresh MLP generator width (analytic teachers only)", cli=False)
    mlp_depth: int = option(3, "fresh MLP generator depth (analytic teachers only)", cli=False)

    def resolve(self, teacher, loop) -> GDDConfig:
        """gen_sigma: the teacher's sigma_max unless given; student_dropout 'teacher' (Python) kept as None (the
        teacher's). Checks the lrs, the R1 settings, --loss-samples, --freeze, --disc, the backbone
        discriminator's options and --diffaug (images only)."""
        for flag, lr in (("--gen-lr", self.gen_lr), ("--disc-lr", self.disc_lr)):
            if not lr >= 0:         # (NaN too)
                raise UsageError(f"{flag} must be >= 0, got {lr:g}")
        if self.r1_every < 0 or self.r1_gamma < 0:
            raise UsageError(f"--r1-every and --r1-gamma must be >= 0, got {self.r1_every} and {self.r1_gamma}")
        if self.loss_samples < 1:
            raise UsageError(f"--loss-samples must be at least 1, got {self.loss_samples}")
        if self.freeze not in (0, 1, 2, 3):
            raise UsageError(f"--freeze must be 0, 1, 2 or 3, got {self.freeze}")
        if self.disc not in KINDS:
            raise UsageError(f"--disc must be one of {', '.join(KINDS)}, got {self.disc!r}")
        if self.disc == "backbone" and not (self.disc_backbone and self.disc_backbone_weights):
            raise UsageError("--disc backbone needs --disc-backbone LIB:NAME and --disc-backbone-weights PATH")
        if self.diffaug and len(teacher.shape) != 3:
            raise UsageError(f"--diffaug augments images [C, H, W]; this teacher's samples have shape "
                             f"{tuple(teacher.shape)}")
        dropout = None if self.student_dropout == "teacher" else self.student_dropout
        if dropout is not None and not 0 <= dropout < 1:
            raise UsageError(f"--student-dropout must be a probability in [0, 1) or 'teacher', got {dropout!r}")
        gen_sigma = float(teacher.sigma_max) if self.gen_sigma is None else self.gen_sigma
        return replace(self, gen_sigma=gen_sigma, student_dropout=dropout)


def lazy_r1_optim(lr: float, betas: tuple[float, float], r1_every: int) -> OptimConfig:
    """The discriminator's Adam with lazy R1 (official, StyleGAN2): r1_every batches take r1_every + 1 steps, so
    lr x r/(r+1) and beta2^(r/(r+1)) with r = r1_every (16/17 by default); unscaled when r1_every is 0."""
    ratio = r1_every / (r1_every + 1) if r1_every else 1.0
    return OptimConfig(lr=lr * ratio, betas=(betas[0], betas[1] ** ratio))


def patch_softplus(logits: Tensor, sign: float, groups: Sequence[int] | None = None) -> Tensor:
    """Per sample [B]: the sum over logit groups (the official backbones) of the mean over the group's patches
    of softplus(sign * logit). logits: [B, K]; groups: the discriminator's `splits`, patch counts summing to K
    (None: one group)."""
    if logits.dim() != 2:
        raise DiffdistillError(f"discriminator logits must be [batch, patches], got shape {tuple(logits.shape)}")
    values = F.softplus(sign * logits)
    if not groups:
        return values.mean(1)
    groups = [int(g) for g in groups]
    if sum(groups) != logits.shape[1]:
        raise DiffdistillError(f"logit groups {groups} do not add up to the {logits.shape[1]} patch logits")
    return torch.stack([chunk.mean(1) for chunk in values.split(groups, dim=1)]).sum(0)


def generator_gan_loss(logits_fake: Tensor, samples: float = 1.0, groups: Sequence[int] | None = None) -> Tensor:
    """Non-saturating generator loss (official `training/loss.py`, --loss-type ns): `samples` x the batch mean
    of sum_groups mean_patches softplus(-D(x_g)); with samples = the batch size it is the official sum over samples."""
    return samples * patch_softplus(logits_fake, -1.0, groups).mean()


def discriminator_gan_loss(logits_fake: Tensor, logits_real: Tensor, samples: float = 1.0,
                           groups: Sequence[int] | None = None) -> Tensor:
    """`samples` x the batch means of softplus(D(x_g)) and softplus(-D(x_real)), reduced over the patches
    as `patch_softplus` (official `training/loss.py`)."""
    return samples * (patch_softplus(logits_fake, 1.0, groups).mean() + patch_softplus(logits_real, -1.0, groups)
                      .mean())


class GDD(Method):
    """GDD on the shared loop: groups 'generator' then 'discriminator' (the official `training_loop.py` order),
    and the discriminator's lazy R1 step after them."""

    name = "gdd"

    def __init__(self, teacher: Denoiser, cfg: GDDConfig | None = None, generator: Denoiser | None = None,
                 discriminator: nn.Module | None = None):
        super().__init__()
        cfg = (cfg or GDDConfig()).resolve(teacher, None)
        self.cfg = cfg
        self.gen_sigma = common.check_sigma(teacher, cfg.gen_sigma, "generator sigma")
        self.label_dim = teacher.label_dim
        # As official GDD (`GDDPrecond`): the generator is the teacher with boundary scalings, evaluated at
        # sigma_max.
        self.generator = generator if generator is not None else common.student_from_teacher(
            teacher, boundary=True, hidden=cfg.mlp_hidden, depth=cfg.mlp_depth, dropout=cfg.student_dropout)
        self.trainable, self.total = common.freeze_by_role(self.generator, cfg.freeze)
        teacher = teacher.eval().requires_grad_(False)
        self.discriminator = discriminator if discriminator is not None else build_discriminator(
            cfg.disc, teacher.shape, teacher.label_dim, teacher, cfg.disc_channels, cfg.disc_sigma,
            cfg.disc_noise, cfg.disc_backbone, cfg.disc_backbone_weights, cfg.disc_vgg_weights,
            cfg.disc_effnet_weights, cfg.diffaug)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        gen = [p for p in self.generator.parameters() if p.requires_grad]
        disc = [p for p in self.discriminator.parameters() if p.requires_grad]
        r1_every = cfg.r1_every if cfg.r1_gamma else 0     # the lazy R1 step of its own (official)
        return {
            # Conditional: the official generator takes the labels of the real batch.
            "generator": Group(gen, OptimConfig(lr=cfg.gen_lr, betas=cfg.gen_betas), loss=self.generator_loss,
                               needs_data=self.label_dim > 0),
            # lr and beta2 scaled by r/(r+1) for the R1 steps (as the command line always did: by --r1-every)
            "discriminator": Group(disc, lazy_r1_optim(cfg.disc_lr, cfg.disc_betas, cfg.r1_every),
                                   loss=self.discriminator_loss, needs_data=True, extra_every=r1_every),
        }

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """train.sh's --ema=0.5 (Mimg) = 500 kimg, with train.py's --ema-warmup 0.05 (EDM's ramp-up)."""
        return 500.0, 0.05

    def _generate(self, n: int, device, cond: Tensor | None) -> Tensor:
        z = common.unit_noise(n, self.generator.shape, device)
        return common.generate(self.generator, z, self.gen_sigma, cond)

    def _labels(self, batch: Batch, real: bool) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if batch.cond is not None and not bool((batch.cond < 0).any()):
            return batch.cond
        if real:
            raise DiffdistillError("the teacher is class-conditional but the data set has no labels")
        return torch.randint(self.label_dim, (batch.size,), device=batch.device)

    def _splits(self):
        return getattr(self.discriminator, "splits", None)

    def r1_loss(self, batch: Batch) -> dict[str, Tensor]:
        """The official lazy-R1 loss: r1_every * gamma/2 * mean_i ||grad_x sum_k D_k(x_i)||^2 on real images."""
        cfg = self.cfg
        cond_real = onehot(self._labels(batch, real=True), self.label_dim, batch.x.shape[0], batch.device)
        r1 = r1_penalty(self.discriminator, batch.x, cond_real).mean()
        return {"loss": cfg.r1_every * cfg.r1_gamma / 2 * r1, "r1": r1.detach()}

    def generator_loss(self, batch: Batch) -> dict[str, Tensor]:
        cond = self._labels(batch, real=False)
        x_g = self._generate(batch.size, batch.device, cond)
        logits = self.discriminator(x_g, onehot(cond, self.label_dim, batch.size, batch.device))
        if bool(torch.isfinite(x_g).all()) and not bool(torch.isfinite(logits).all()):
            # The discriminator diverged: skip, so that its own loss (next in this step) names it.
            return {"loss": (0.0 * x_g).sum()}
        return {"loss": generator_gan_loss(logits, self.cfg.loss_samples, self._splits()),
                "logits_fake": logits.mean().detach()}

    def discriminator_loss(self, batch: Batch) -> dict[str, Tensor]:
        if batch.x is None:
            raise DiffdistillError("GDD needs real images for its discriminator: pass --data")
        if batch.extra:       # the lazy R1 step on batches r1_every, 2 r1_every, ... (Group.extra_every)
            return self.r1_loss(batch)
        n = batch.x.shape[0]
        labels = self._labels(batch, real=True)
        cond = onehot(labels, self.label_dim, n, batch.device)
        with torch.no_grad():
            x_g = self._generate(n, batch.device, labels)   # official: the real batch's labels
        logits_fake = self.discriminator(x_g, cond)
        logits_real = self.discriminator(batch.x, cond)
        loss = discriminator_gan_loss(logits_fake, logits_real, self.cfg.loss_samples, self._splits())
        out = {"logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}
        out["loss"] = loss
        return out

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        net = (ema or {}).get("generator", self.generator)
        return net, common.onestep_recipe(self.gen_sigma)


# --------------------------------------------------------------------------------------------------
# Recipes (Zyriix/GDD train.sh; the same settings for GDD and GDD-I, unconditional and conditional)

_CIFAR10 = dict(batch=256, total_kimg=5000,              # --batch=256 (4 GPUs x 64), --duration=5 Mimg
                gen_lr=1e-4, disc_lr=1e-4,               # --lr, --dlr (x 16/17 for lazy R1)
                r1_gamma=1e-4, r1_every=16,              # --r1-gamma, training_loop's r1_interval
                loss_samples=64,                         # the per-GPU batch the losses sum over
                ema_halflife_kimg=500)                   # --ema=0.5 Mimg, ramp-up 0.05
_IMAGENET64 = dict(batch=512, total_kimg=10000,          # --batch=512 (4 GPUs x 128), --duration=10 Mimg
                   gen_lr=8e-6, disc_lr=4e-5,
                   r1_gamma=1e-4, r1_every=16,
                   loss_samples=128,
                   ema_halflife_kimg=50000)              # --ema=50 Mimg: the 0.05 ramp-up rules all 10 Mimg
_OFFICIAL_DISC = ("official discriminator: projected on frozen {}; give --disc-vgg-weights and --disc-effnet-weights "
                  "for ours (VGG16-BN + EfficientNet-lite0); the official generator runs in bf16")

RECIPES = {
    "cifar10": Recipe(
        source="GDD CIFAR-10, uncond and cond (Zyriix/GDD train.sh): batch 256 (4 GPUs x 64), lr = dlr = 1e-4, "
               "R1 gamma 1e-4 every 16, 5 Mimg, EMA 0.5 Mimg, dropout 0; "
               + _OFFICIAL_DISC.format("VGG16-BN + EfficientNet-lite0"),
        options=dict(_CIFAR10, freeze=0)),
    "cifar10-gddi": Recipe(source="GDD-I CIFAR-10: cifar10 with --freeze 1 (train.sh --freeze=1)",
                           options=dict(_CIFAR10, freeze=1)),
    "imagenet64": Recipe(
        source="GDD ImageNet-64 (train.sh): batch 512 (4 GPUs x 128), lr 8e-6, dlr 4e-5, R1 gamma 1e-4 every 16, "
               "10 Mimg, EMA 50 Mimg, dropout 0; " + _OFFICIAL_DISC.format("DeiT-base + EfficientNet-lite0, "
                                                                           "which diffdistill lacks"),
        options=dict(_IMAGENET64, freeze=0)),
    "imagenet64-gddi": Recipe(source="GDD-I ImageNet-64: imagenet64 with --freeze 1 (train.sh --freeze=1)",
                              options=dict(_IMAGENET64, freeze=1)),
}


def create(cfg: GDDConfig, teacher: Denoiser, data=None, loop=None) -> GDD:
    if data is None:
        raise DiffdistillError("gdd needs real images for its discriminator: pass --data")
    shape = tuple(getattr(data, "shape", teacher.shape))
    if shape != tuple(teacher.shape):
        raise DiffdistillError(f"data {getattr(data, 'name', '')} has samples of shape {shape}, "
                               f"the teacher {tuple(teacher.shape)}")
    method = GDD(teacher, cfg)
    cfg = method.cfg
    r1 = ("no R1" if not (cfg.r1_every and cfg.r1_gamma) else
          f"R1 gamma {cfg.r1_gamma:g} on its own step every {cfg.r1_every} steps")
    r1 += "; DiffAugment in the discriminator" if cfg.diffaug else ""
    dist.print0(f"gdd: generator at sigma {method.gen_sigma:g}; {method.trainable:,} of {method.total:,} "
                f"parameters train (freeze level {cfg.freeze}); {type(method.discriminator).__name__} with "
                f"{common.count_params(method.discriminator):,} trainable parameters; {r1}")
    return method


SPEC = MethodSpec(name="gdd", help="GDD / GDD-I: GAN fine-tuning of the teacher into a one-step generator (needs "
                                   "real images)",
                  config=GDDConfig, create=create, needs_data=True, title="GDD", recipes=RECIPES, ema_help=EMA_HELP)
