"""GDD and GDD-I (Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"; algorithms.md §5).

GAN fine-tuning of the teacher as a one-step generator on real data: x_g = G(sigma_max z; sigma_max) with the
consistency boundary scalings (§5.2); non-saturating GAN loss with lazy R1 on real images (§5.4); GDD-I
freezes the generator's block 3x3 convolutions and attention output projections (`--freeze 1`), then also qkv
(2) and skips (3) (§5.3). The teacher is never queried for targets: it gives the initialisation and, by
default, the frozen encoder features under the discriminator's trainable heads (the official discriminator,
on frozen VGG16-BN and EfficientNet-lite0 features, is `--disc projected`).

The losses reduce per-patch logits [B, K] as the official `training/loss.py` does (§5.4). Its discriminator
returns a list with one row of patch logits per (sample, backbone) -- `list += tensor[B, n]` extends the list
by rows -- and the losses are sums over that list of the mean softplus over each row's patches. So a sample
contributes sum_backbones mean_patches softplus(+-D) (the backbones' patch counts: the discriminator's
`splits`), and the samples are *summed* over the per-GPU batch (DDP then averages the GPUs): the loss is
(per-GPU batch) x the batch mean, 64 x for the CIFAR-10 script (batch 256 on 4 GPUs). `loss_samples` fixes
that factor, so that a run here weighs its terms as the official one whatever our process count and
accumulation.

Lazy R1 (StyleGAN2 §3.1, official `training_loop.py`): on batches 16, 32, ... (never 0) the discriminator's
Adam takes a second step, on the R1 loss alone: r1_every * gamma/2 * mean_i ||grad_x sum_k D_k(x_i)||^2 over the
real batch (a mean over samples, unlike the adversarial sums). That is why the discriminator's lr and beta2
are dlr * 16/17 and 0.99^(16/17): 17 steps per 16 batches. The gamma convention is therefore the official
one: gamma = 1e-4 weighs R1 against adversarial losses that are sums over `loss_samples` = 64 samples.
The loop runs that second step as the discriminator group's extra pass (`Group.extra_every`).
For analytic teachers the generator is a fresh boundary-preconditioned `Precond(MLP)`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError
from ..train import dist
from . import common
from .base import Batch, Group, Method, OptimConfig, Recipe
from .discriminators import KINDS, build_discriminator, onehot, r1_penalty

HELP = "GDD / GDD-I: GAN fine-tuning of the teacher into a one-step generator (needs real images)"
NEEDS_DATA = True
EMA_HELP = ("EMA half-life of the generator in kimg, with EDM's ramp-up 0.05 (default: GDD's, 500 kimg = train.sh's "
            "--ema=0.5 Mimg with train.py's --ema-warmup 0.05; its ImageNet runs use 50000)")
DROPOUT_HELP = "GDD: 0, as train.sh's --dropout=0"


@dataclass
class GDDConfig:
    """GDD settings; defaults are the official CIFAR-10 recipe (train.sh, §5.5)."""

    gen_sigma: float | None = None     # generator level; None = the teacher's sigma_max (80 for EDM)
    gen_lr: float = 1e-4               # generator Adam learning rate (--lr)
    gen_betas: tuple[float, float] = (0.0, 0.99)
    disc_lr: float = 1e-4 * 16 / 17    # discriminator lr, scaled for lazy R1 (--dlr * 16/17)
    disc_betas: tuple[float, float] = (0.0, 0.99 ** (16 / 17))
    r1_gamma: float = 1e-4             # R1 weight gamma in the official convention (module docstring)
    r1_every: int = 16                 # lazy R1 interval: an R1 step on steps 16, 32, ... (0 = no R1)
    loss_samples: int = 64             # the GAN losses are sums over this many samples (official per-GPU batch)
    freeze: int = 0                    # GDD-I freezing level 0..3 (§5.3)
    dropout: float | None = 0.0        # generator dropout (official --dropout=0); None = the teacher's
    disc: str = "auto"                 # auto | projected | teacher | conv | mlp | backbone
    disc_channels: int = 64            # width of the discriminator (heads)
    disc_sigma: float = 0.5            # noise level at which teacher features are read
    disc_noise: bool = False           # add that much noise to images before the teacher features
    backbone: str | None = None        # timm:NAME | torchvision:NAME (disc = backbone)
    backbone_weights: str | None = None  # its local weights file (safetensors, or torch read weights-only)
    vgg_weights: str | None = None     # disc = projected: VGG16-BN weights file
    effnet_weights: str | None = None  # disc = projected: EfficientNet-lite0 weights file
    mlp_hidden: int = 128              # fresh MLP generator (analytic teachers only)
    mlp_depth: int = 3


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
    """Non-saturating generator loss (§5.4): `samples` x the batch mean of sum_groups mean_patches
    softplus(-D(x_g)); with samples = the batch size it is the official sum over samples."""
    return samples * patch_softplus(logits_fake, -1.0, groups).mean()


def discriminator_gan_loss(logits_fake: Tensor, logits_real: Tensor, samples: float = 1.0,
                           groups: Sequence[int] | None = None) -> Tensor:
    """`samples` x the batch means of softplus(D(x_g)) and softplus(-D(x_real)), reduced over the patches
    as `patch_softplus` (§5.4)."""
    return samples * (patch_softplus(logits_fake, 1.0, groups).mean() + patch_softplus(logits_real, -1.0, groups)
                      .mean())


class GDD(Method):
    """GDD on the shared loop: groups 'generator' then 'discriminator' (§5.5's order), and the discriminator's
    lazy R1 step after them."""

    name = "gdd"

    def __init__(self, teacher: Denoiser, cfg: GDDConfig | None = None, generator: Denoiser | None = None,
                 discriminator: nn.Module | None = None):
        super().__init__()
        cfg = cfg or GDDConfig()
        if cfg.r1_every < 0 or cfg.r1_gamma < 0:
            raise DiffdistillError("r1_every and r1_gamma must be >= 0")
        if not cfg.loss_samples > 0:
            raise DiffdistillError(f"loss_samples must be positive, got {cfg.loss_samples}")
        self.cfg = cfg
        self.gen_sigma = common.check_sigma(teacher, cfg.gen_sigma if cfg.gen_sigma is not None
                                            else teacher.sigma_max, "generator sigma")
        self.label_dim = teacher.label_dim
        # §5.2: the generator is the teacher with boundary scalings, evaluated at sigma_max.
        self.generator = generator if generator is not None else common.student_from_teacher(
            teacher, boundary=True, hidden=cfg.mlp_hidden, depth=cfg.mlp_depth, dropout=cfg.dropout)
        self.trainable, self.total = common.freeze_by_role(self.generator, cfg.freeze)
        teacher = teacher.eval().requires_grad_(False)
        self.discriminator = discriminator if discriminator is not None else build_discriminator(
            cfg.disc, teacher.shape, teacher.label_dim, teacher, cfg.disc_channels, cfg.disc_sigma,
            cfg.disc_noise, cfg.backbone, cfg.backbone_weights, cfg.vgg_weights, cfg.effnet_weights)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        gen = [p for p in self.generator.parameters() if p.requires_grad]
        disc = [p for p in self.discriminator.parameters() if p.requires_grad]
        r1_every = cfg.r1_every if cfg.r1_gamma else 0     # the lazy R1 step of its own (official)
        return {
            # Conditional: the official generator takes the labels of the real batch.
            "generator": Group(gen, OptimConfig(lr=cfg.gen_lr, betas=cfg.gen_betas), needs_data=self.label_dim > 0),
            "discriminator": Group(disc, OptimConfig(lr=cfg.disc_lr, betas=cfg.disc_betas), needs_data=True,
                                   extra_every=r1_every),
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

    def loss(self, group: str, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        if group == "generator":
            cond = self._labels(batch, real=False)
            x_g = self._generate(batch.size, batch.device, cond)
            logits = self.discriminator(x_g, onehot(cond, self.label_dim, batch.size, batch.device))
            if bool(torch.isfinite(x_g).all()) and not bool(torch.isfinite(logits).all()):
                # The discriminator diverged: skip, so that its own loss (next in this step) names it.
                return {"loss": (0.0 * x_g).sum()}
            return {"loss": generator_gan_loss(logits, cfg.loss_samples, self._splits()),
                    "logits_fake": logits.mean().detach()}
        if group == "discriminator":
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
            loss = discriminator_gan_loss(logits_fake, logits_real, cfg.loss_samples, self._splits())
            out = {"logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}
            out["loss"] = loss
            return out
        raise KeyError(f"unknown group {group!r}")

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        net = (ema or {}).get("generator", self.generator)
        return net, common.onestep_recipe(self.gen_sigma)


# --------------------------------------------------------------------------------------------------
# Recipes (Zyriix/GDD train.sh; the same settings for GDD and GDD-I, unconditional and conditional)

_CIFAR10 = ("--batch", "256", "--kimg", "5000",          # --batch=256 (4 GPUs x 64), --duration=5 Mimg
            "--gen-lr", "1e-4", "--disc-lr", "1e-4",      # --lr, --dlr (x 16/17 for lazy R1)
            "--r1-gamma", "1e-4", "--r1-every", "16",     # --r1-gamma, training_loop's r1_interval
            "--loss-samples", "64",                       # the per-GPU batch the losses sum over
            "--ema", "500")                               # --ema=0.5 Mimg, ramp-up 0.05
_IMAGENET64 = ("--batch", "512", "--kimg", "10000",      # --batch=512 (4 GPUs x 128), --duration=10 Mimg
               "--gen-lr", "8e-6", "--disc-lr", "4e-5",
               "--r1-gamma", "1e-4", "--r1-every", "16",
               "--loss-samples", "128",
               "--ema", "50000")                          # --ema=50 Mimg: the 0.05 ramp-up rules all 10 Mimg
_OFFICIAL_DISC = ("official discriminator: projected on frozen {}; give --disc-vgg-weights and --disc-effnet-weights "
                  "for ours (VGG16-BN + EfficientNet-lite0); the official generator runs in bf16")

RECIPES = {
    "cifar10": Recipe(
        source="GDD CIFAR-10, uncond and cond (Zyriix/GDD train.sh): batch 256 (4 GPUs x 64), lr = dlr = 1e-4, "
               "R1 gamma 1e-4 every 16, 5 Mimg, EMA 0.5 Mimg, dropout 0; "
               + _OFFICIAL_DISC.format("VGG16-BN + EfficientNet-lite0"),
        options=_CIFAR10 + ("--freeze", "0")),
    "cifar10-gddi": Recipe(source="GDD-I CIFAR-10: cifar10 with --freeze 1 (train.sh --freeze=1)",
                           options=_CIFAR10 + ("--freeze", "1")),
    "imagenet64": Recipe(
        source="GDD ImageNet-64 (train.sh): batch 512 (4 GPUs x 128), lr 8e-6, dlr 4e-5, R1 gamma 1e-4 every 16, "
               "10 Mimg, EMA 50 Mimg, dropout 0; " + _OFFICIAL_DISC.format("DeiT-base + EfficientNet-lite0, "
                                                                           "which diffdistill lacks"),
        options=_IMAGENET64 + ("--freeze", "0")),
    "imagenet64-gddi": Recipe(source="GDD-I ImageNet-64: imagenet64 with --freeze 1 (train.sh --freeze=1)",
                              options=_IMAGENET64 + ("--freeze", "1")),
}


# --------------------------------------------------------------------------------------------------
# CLI hooks (cli/distill.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GDDConfig()
    g = parser.add_argument_group("GDD")
    g.add_argument("--freeze", type=int, choices=[0, 1, 2, 3], default=d.freeze,
                   help="GDD-I: freeze block convs + attention proj (1), + qkv (2), + skips (3)")
    g.add_argument("--disc", choices=list(KINDS), default=d.disc,
                   help="discriminator: the official projected one on frozen VGG16-BN + EfficientNet-lite0 "
                        "features (needs --disc-vgg-weights and --disc-effnet-weights; 'auto' picks it when "
                        "both are given), else heads on the frozen teacher encoder (auto for UNet teachers), "
                        "a plain conv net, an MLP (auto for 2-D data), or a timm/torchvision backbone")
    g.add_argument("--disc-vgg-weights", default=None, metavar="PATH",
                   help="--disc projected: local weights of VGG16-BN (torchvision layout)")
    g.add_argument("--disc-effnet-weights", default=None, metavar="PATH",
                   help="--disc projected: local weights of EfficientNet-lite0 (timm tf_efficientnet_lite0)")
    g.add_argument("--disc-backbone", default=None, metavar="LIB:NAME",
                   help="--disc backbone: timm:NAME or torchvision:NAME (needs that optional package)")
    g.add_argument("--disc-backbone-weights", default=None, metavar="PATH",
                   help="local weights of the backbone (.safetensors or a torch state dict)")
    g.add_argument("--gen-lr", type=float, default=d.gen_lr, help="generator lr (default %(default)s)")
    g.add_argument("--disc-lr", type=float, default=1e-4,
                   help="discriminator lr before the lazy-R1 scaling x r/(r+1) (default %(default)s)")
    g.add_argument("--r1-gamma", type=float, default=d.r1_gamma,
                   help="R1 weight gamma, official convention: its own step of r1_every*gamma/2*||grad||^2 "
                        "next to GAN losses summed over --loss-samples samples (default %(default)s)")
    g.add_argument("--r1-every", type=int, default=d.r1_every,
                   help="lazy R1 interval: an extra discriminator step on steps r, 2r, ... (0: no R1; "
                        "default %(default)s)")
    g.add_argument("--loss-samples", type=int, default=d.loss_samples,
                   help="the GAN losses are sums over this many samples' losses, i.e. this x the batch mean "
                        "(official: its per-GPU batch; default %(default)s)")
    g.add_argument("--gen-sigma", type=float, default=None, help="generator noise level (default: sigma_max)")


def build(args: argparse.Namespace, teacher: Denoiser, data=None) -> GDD:
    if data is None:
        raise DiffdistillError("gdd needs real images for its discriminator: pass --data")
    shape = tuple(getattr(data, "shape", teacher.shape))
    if shape != tuple(teacher.shape):
        raise DiffdistillError(f"data {getattr(data, 'name', '')} has samples of shape {shape}, "
                               f"the teacher {tuple(teacher.shape)}")
    backbone = args.disc_backbone
    if args.disc == "backbone" and not (backbone and args.disc_backbone_weights):
        raise DiffdistillError("--disc backbone needs --disc-backbone LIB:NAME and "
                               "--disc-backbone-weights PATH")
    if args.r1_every < 0 or args.r1_gamma < 0:
        raise DiffdistillError(f"--r1-every and --r1-gamma must be >= 0, got {args.r1_every} and {args.r1_gamma}")
    if args.loss_samples < 1:
        raise DiffdistillError(f"--loss-samples must be at least 1, got {args.loss_samples}")
    r1_every = int(args.r1_every)
    ratio = r1_every / (r1_every + 1) if r1_every else 1.0   # official: dlr * 16/17, beta2 0.99^(16/17)
    cfg = GDDConfig(gen_sigma=args.gen_sigma, gen_lr=args.gen_lr, disc_lr=args.disc_lr * ratio,
                    disc_betas=(0.0, 0.99**ratio), r1_gamma=args.r1_gamma, r1_every=r1_every,
                    loss_samples=args.loss_samples, freeze=args.freeze, dropout=common.resolve_dropout(args, 0.0),
                    disc=args.disc, backbone=backbone, backbone_weights=args.disc_backbone_weights,
                    vgg_weights=args.disc_vgg_weights, effnet_weights=args.disc_effnet_weights)
    method = GDD(teacher, cfg)
    r1 = ("no R1" if not (r1_every and cfg.r1_gamma) else
          f"R1 gamma {cfg.r1_gamma:g} on its own step every {r1_every} steps")
    dist.print0(f"gdd: generator at sigma {method.gen_sigma:g}; {method.trainable:,} of {method.total:,} "
                f"parameters train (freeze level {cfg.freeze}); {type(method.discriminator).__name__} with "
                f"{common.count_params(method.discriminator):,} trainable parameters; {r1}")
    return method
