"""GDD and GDD-I (Zheng & Yang 2024, "Diffusion Models Are Innate One-Step Generators"; algorithms.md §5).

GAN fine-tuning of the teacher as a one-step generator on real data: x_g = G(sigma_max z; sigma_max) with the
consistency boundary scalings (§5.2); non-saturating GAN loss with lazy R1 on real images (§5.4); GDD-I
freezes the generator's block 3x3 convolutions and attention output projections (`--freeze 1`), then also qkv
(2) and skips (3) (§5.3). The teacher is never queried for targets: it gives the initialisation and, by
default, the frozen encoder features under the discriminator's trainable heads.

Lazy R1 is added to the discriminator loss on steps where `step % r1_every == 0`, scaled by r1_every
(StyleGAN2's lazy regularisation); it shares the discriminator's optimiser, as in the official loop, rather
than being a separate group with an Adam state of its own (which would normalise the penalty away).
For analytic teachers the generator is a fresh boundary-preconditioned `Precond(MLP)`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError
from ..train import dist
from . import common
from .base import Batch, Group, Method, OptimConfig
from .discriminators import build_discriminator, onehot, r1_penalty

HELP = "GDD / GDD-I: GAN fine-tuning of the teacher into a one-step generator (needs real images)"
NEEDS_DATA = True


@dataclass
class GDDConfig:
    """GDD settings; defaults are the official CIFAR-10 recipe (§5.5) where one exists."""

    gen_sigma: float | None = None     # generator level; None = the teacher's sigma_max (80 for EDM)
    gen_lr: float = 1e-4               # generator Adam learning rate
    gen_betas: tuple[float, float] = (0.0, 0.99)
    disc_lr: float = 1e-4 * 16 / 17    # discriminator lr, scaled for lazy R1 (dlr * 16/17)
    disc_betas: tuple[float, float] = (0.0, 0.99 ** (16 / 17))
    r1_gamma: float = 1e-4             # R1 weight gamma (penalty gamma/2 ||grad||^2)
    r1_every: int = 16                 # lazy R1 interval (0 = no R1)
    freeze: int = 0                    # GDD-I freezing level 0..3 (§5.3)
    disc: str = "auto"                 # auto | teacher | conv | mlp | backbone
    disc_channels: int = 64            # width of the discriminator (heads)
    disc_sigma: float = 0.5            # noise level at which teacher features are read
    disc_noise: bool = False           # add that much noise to images before the teacher features
    backbone: str | None = None        # timm:NAME | torchvision:NAME (disc = backbone)
    backbone_weights: str | None = None  # its local weights file (safetensors, or torch read weights-only)
    mlp_hidden: int = 128              # fresh MLP generator (analytic teachers only)
    mlp_depth: int = 3


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss softplus(-D(x_g)), averaged over the batch (§5.4)."""
    return F.softplus(-logits_fake).mean()


def discriminator_gan_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """softplus(D(x_g)) + softplus(-D(x_real)), averaged over the batch (§5.4)."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


class GDD(Method):
    """GDD on the shared loop: groups 'generator' then 'discriminator' (§5.5's order)."""

    name = "gdd"

    def __init__(self, teacher: Denoiser, cfg: GDDConfig | None = None, generator: Denoiser | None = None,
                 discriminator: nn.Module | None = None):
        super().__init__()
        cfg = cfg or GDDConfig()
        if cfg.r1_every < 0 or cfg.r1_gamma < 0:
            raise DiffdistillError("r1_every and r1_gamma must be >= 0")
        self.cfg = cfg
        self.gen_sigma = common.check_sigma(teacher, cfg.gen_sigma if cfg.gen_sigma is not None
                                            else teacher.sigma_max, "generator sigma")
        self.label_dim = teacher.label_dim
        # §5.2: the generator is the teacher with boundary scalings, evaluated at sigma_max.
        self.generator = generator if generator is not None else common.student_from_teacher(
            teacher, boundary=True, hidden=cfg.mlp_hidden, depth=cfg.mlp_depth)
        self.trainable, self.total = common.freeze_by_role(self.generator, cfg.freeze)
        teacher = teacher.eval().requires_grad_(False)
        self.discriminator = discriminator if discriminator is not None else build_discriminator(
            cfg.disc, teacher.shape, teacher.label_dim, teacher, cfg.disc_channels, cfg.disc_sigma,
            cfg.disc_noise, cfg.backbone, cfg.backbone_weights)

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg
        gen = [p for p in self.generator.parameters() if p.requires_grad]
        disc = [p for p in self.discriminator.parameters() if p.requires_grad]
        return {
            "generator": Group(gen, OptimConfig(lr=cfg.gen_lr, betas=cfg.gen_betas)),
            "discriminator": Group(disc, OptimConfig(lr=cfg.disc_lr, betas=cfg.disc_betas), needs_data=True),
        }

    def _generate(self, n: int, device, cond: Tensor | None) -> Tensor:
        z = common.unit_noise(n, self.generator.shape, device)
        return common.generate(self.generator, z, self.gen_sigma, cond)

    def _labels(self, batch: Batch, real: bool) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if real:
            if batch.cond is None or bool((batch.cond < 0).any()):
                raise DiffdistillError("the teacher is class-conditional but the data set has no labels")
            return batch.cond
        return torch.randint(self.label_dim, (batch.size,), device=batch.device)

    def loss(self, group: str, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        if group == "generator":
            cond = self._labels(batch, real=False)
            x_g = self._generate(batch.size, batch.device, cond)
            logits = self.discriminator(x_g, onehot(cond, self.label_dim, batch.size, batch.device))
            if bool(torch.isfinite(x_g).all()) and not bool(torch.isfinite(logits).all()):
                # The discriminator diverged: skip, so that its own loss (next in this step) names it.
                return {"loss": (0.0 * x_g).sum()}
            return {"loss": generator_gan_loss(logits), "logits_fake": logits.mean().detach()}
        if group == "discriminator":
            if batch.x is None:
                raise DiffdistillError("GDD needs real images for its discriminator: pass --data")
            n = batch.x.shape[0]
            cond_real = onehot(self._labels(batch, real=True), self.label_dim, n, batch.device)
            with torch.no_grad():
                cond_fake = self._labels(Batch(size=n, device=batch.device), real=False)
                x_g = self._generate(n, batch.device, cond_fake)
            logits_fake = self.discriminator(x_g, onehot(cond_fake, self.label_dim, n, batch.device))
            logits_real = self.discriminator(batch.x, cond_real)
            loss = discriminator_gan_loss(logits_fake, logits_real)
            out = {"logits_real": logits_real.mean().detach(), "logits_fake": logits_fake.mean().detach()}
            if cfg.r1_every and cfg.r1_gamma and batch.step % cfg.r1_every == 0:
                # Lazy R1 (Mescheder et al. 2018; Karras et al. 2020 §3.1): gamma/2 ||grad||^2 x interval.
                r1 = r1_penalty(self.discriminator, batch.x, cond_real).mean()
                loss = loss + cfg.r1_every * cfg.r1_gamma / 2 * r1
                out["r1"] = r1.detach()
            out["loss"] = loss
            return out
        raise KeyError(f"unknown group {group!r}")

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        net = (ema or {}).get("generator", self.generator)
        return net, common.onestep_recipe(self.gen_sigma)


# --------------------------------------------------------------------------------------------------
# CLI hooks (cli/distill.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = GDDConfig()
    g = parser.add_argument_group("GDD")
    g.add_argument("--freeze", type=int, choices=[0, 1, 2, 3], default=0,
                   help="GDD-I: freeze block convs + attention proj (1), + qkv (2), + skips (3)")
    g.add_argument("--disc", choices=["auto", "teacher", "conv", "mlp", "backbone"], default="auto",
                   help="discriminator: heads on the frozen teacher encoder (default for UNet teachers), "
                        "a plain conv net, an MLP (2-D data), or a pretrained backbone "
                        "(--disc-backbone-weights)")
    g.add_argument("--disc-backbone", default=None, metavar="LIB:NAME",
                   help="timm:NAME or torchvision:NAME (needs that optional package)")
    g.add_argument("--disc-backbone-weights", default=None, metavar="PATH",
                   help="local weights of the backbone (.safetensors or a torch state dict)")
    g.add_argument("--gen-lr", type=float, default=d.gen_lr, help="generator lr (default %(default)s)")
    g.add_argument("--disc-lr", type=float, default=1e-4,
                   help="discriminator lr before the 16/17 lazy-R1 scaling (default %(default)s)")
    g.add_argument("--r1-gamma", type=float, default=None,
                   help="R1 weight (default 1e-4 for images, 0.1 for flat toy data)")
    g.add_argument("--r1-every", type=int, default=d.r1_every, help="lazy R1 interval (default %(default)s)")
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
    r1_every = max(int(args.r1_every), 0)
    gamma = args.r1_gamma if args.r1_gamma is not None else (0.1 if len(teacher.shape) == 1 else 1e-4)
    ratio = r1_every / (r1_every + 1) if r1_every else 1.0
    cfg = GDDConfig(gen_sigma=args.gen_sigma, gen_lr=args.gen_lr, disc_lr=args.disc_lr * ratio,
                    disc_betas=(0.0, 0.99**ratio), r1_gamma=gamma, r1_every=r1_every, freeze=args.freeze,
                    disc=args.disc, backbone=backbone, backbone_weights=args.disc_backbone_weights)
    method = GDD(teacher, cfg)
    dist.print0(f"gdd: generator at sigma {method.gen_sigma:g}; {method.trainable:,} of {method.total:,} "
                f"parameters train (freeze level {cfg.freeze}); discriminator "
                f"{common.count_params(method.discriminator):,} trainable parameters")
    return method
