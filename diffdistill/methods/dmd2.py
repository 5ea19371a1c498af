"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation"; official main/edm/ of tianweiy/DMD2).

Networks: the frozen teacher (real score) D_r; a fake score D_f trained with the EDM (denoising) loss on
generator samples over the Karras levels; the generator x_g = G(sigma_max z; sigma_max), optionally with
several steps trained by backward simulation (DMD2 §4.5); an optional GAN classifier head on the fake
network's bottleneck features, trained on real data (DMD2 §4.3). The generator follows the normalised
distribution-matching gradient (DMD Eq. 7 with DMD2's normalisation)
  grad = (D_f(x_s) - D_r(x_s)) / mean|x_g - D_r(x_s)|,   x_s = x_g + sigma n,
through the surrogate 0.5 * mean((x_g - sg(x_g - grad))^2). The two-time-scale update rule updates the fake
score every step and the generator every 5th (DMD2 §4.2).

As in the official `EDMUniModel`, each step generates one batch: on generator steps the fake score (and the GAN
classifier) trains on the generator turn's own samples, detached (made before the generator's update); on the
other steps the generator makes them without gradients. Training otherwise follows `train_edm.py`: AdamW for
both networks, the same learning rate with a constant-with-warm-up schedule, gradient clipping at 10, dropout 0
in every network, and no EMA (the trained generator is what the official evaluates).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from ..diffusion import param
from ..diffusion.denoiser import Denoiser, Precond
from ..diffusion.schedules import karras_index_sigma
from ..errors import DiffdistillError, UsageError
from ..samplers.few_step import renoise
from . import MethodSpec, common
from .base import Batch, Group, Method, OptimConfig, Recipe
from .options import option
from .sid import params_frozen

EMA_HELP = ("EMA half-life of the generator in kimg (default 0: no EMA, the exported generator is the trained "
            "one, as in DMD2's train_edm.py, which keeps none)")

WARMUP_STEPS = 500   # train_edm.py --warmup_step: the default LR warm-up (steps of the run's batch)

RECIPES = {
    "imagenet64": Recipe(
        source="DMD2 ImageNet-64 (tianweiy/DMD2 experiments/imagenet/imagenet_gan_classifier_genloss3e-3_"
               "diffusion1000_lr2e-6_scratch.sh, FID 1.51 at 200k iterations, and train_edm.py's defaults; "
               "needs --data for the GAN term; the official ran the networks in bf16: add --bf16)",
        options=dict(batch=280,               # 40 per GPU x 7 GPUs
                     total_kimg=56000,        # 200k iterations x 280
                     lr=2e-6, betas=(0.9, 0.999), weight_decay=0.01, grad_clip=10.0,
                     # warm-up: 500 scheduler steps, which accelerate advances once per process (7 per iteration):
                     # 500 x 40 images = 20 kimg (~71 iterations)
                     warmup_kimg=20.0,
                     gen_every=5,             # dfake_gen_update_ratio
                     dm_range=(0.02, 0.98),   # min/max_step_percent of the 1000 Karras levels
                     gan_weight=3e-3, cls_weight=1e-2,
                     teacher_dropout="eval",  # dropout 0 everywhere: eval mode is the same network
                     ema_halflife_kimg=0)),
}

# --------------------------------------------------------------------------------------------------
# Noise levels: the Karras grid of 1000 levels, indexed as DMD2 does (ascending: index 0 = sigma_min)


def karras_level(k: Tensor, denoiser: Denoiser, num_levels: int = 1000, rho: float = 7.0) -> Tensor:
    """sigma of ascending index k of an n-level Karras grid over the denoiser's range (0 -> sigma_min)."""
    return karras_index_sigma((num_levels - 1 - k).double(), num_levels, denoiser.sigma_min,
                              denoiser.sigma_max, rho).float()


def dm_sigma(n: int, denoiser: Denoiser, min_frac: float = 0.02, max_frac: float = 0.98,
             num_levels: int = 1000, device=None) -> Tensor:
    """Distribution-matching levels: Karras index k ~ U{20..980} of 1000 (sigma in [0.00323, 72.05])."""
    k = torch.randint(int(min_frac * num_levels), int(max_frac * num_levels) + 1, (n,), device=device)
    return karras_level(k, denoiser, num_levels)


def all_levels_sigma(n: int, denoiser: Denoiser, num_levels: int = 1000, device=None) -> Tensor:
    """Uniform over all Karras levels (fake-score and GAN noise levels)."""
    return karras_level(torch.randint(num_levels, (n,), device=device), denoiser, num_levels)


# --------------------------------------------------------------------------------------------------
# The distribution-matching gradient and its surrogate (official edm_guidance.py; the surrogate's gradient in x_g
# is grad / numel, checked with autograd)


def dm_gradient(x_g: Tensor, d_real: Tensor, d_fake: Tensor) -> Tensor:
    """Normalised DMD gradient on x_g: (D_f - D_r) / mean_{CHW}|x_g - D_r| (per sample; NaNs zeroed)."""
    p_real, p_fake = x_g - d_real, x_g - d_fake
    w = p_real.abs().flatten(1).mean(1)
    return torch.nan_to_num((p_real - p_fake) / param.append_dims(w, x_g)).detach()


def dm_surrogate(x_g: Tensor, grad: Tensor) -> Tensor:
    """0.5 * mean((x_g - sg(x_g - grad))^2), whose gradient in x_g is grad / numel."""
    return 0.5 * F.mse_loss(x_g, (x_g - grad).detach(), reduction="mean")


def dm_loss(teacher: Denoiser, fake: Denoiser, x_g: Tensor, sigma: Tensor, cond: Tensor | None = None,
            noise: Tensor | None = None, dropout: str = "eval") -> tuple[Tensor, Tensor]:
    """(surrogate loss, grad) of the distribution-matching term at levels sigma [B]."""
    n = torch.randn_like(x_g) if noise is None else noise
    with torch.no_grad():
        x_s = x_g.detach() + param.append_dims(sigma, x_g) * n
        d_real, d_fake = common.paired_denoise([teacher, fake], x_s, sigma, cond, dropout)
        grad = dm_gradient(x_g.detach(), d_real.to(x_g.dtype), d_fake.to(x_g.dtype))
    return dm_surrogate(x_g, grad), grad


# --------------------------------------------------------------------------------------------------
# The GAN classifier on the fake network's bottleneck (DMD2 §4.3, "diffusion GAN")


class FeatureTap:
    """Captures the bottleneck features of a fake-score backbone during its forward pass.

    UNet backbones (`enc` ModuleDict): the output of the last encoder layer. MLP backbones (`out` layer): the
    input of the output layer.
    """

    def __init__(self, backbone: nn.Module):
        self.value: Tensor | None = None
        self.armed = False            # capture only during `capture()` (other forward passes keep no graph)
        if isinstance(getattr(backbone, "enc", None), nn.ModuleDict) and len(backbone.enc):
            layer = list(backbone.enc.values())[-1]
            self.handle = layer.register_forward_hook(lambda m, a, out: self._set(out))
        elif isinstance(getattr(backbone, "out", None), nn.Module):
            self.handle = backbone.out.register_forward_pre_hook(lambda m, a: self._set(a[0]))
        else:
            raise DiffdistillError("the GAN head needs a UNet or MLP fake score, got "
                                   f"{type(backbone).__name__}")

    def _set(self, value):
        if self.armed:
            self.value = value

    def capture(self, forward) -> Tensor:
        """Run `forward()` (a call of the fake score) and return the features it computed."""
        self.armed, self.value = True, None
        try:
            forward()
        finally:
            self.armed = False
        if self.value is None:
            raise RuntimeError("the fake score's forward pass computed no bottleneck features")
        value, self.value = self.value, None
        return value


class ClassifierHead(nn.Module):
    """Real/fake logits from bottleneck features (DMD2's head on 8x8 features): conv 4x4 s2 -> GN -> SiLU ->
    conv to 1x1 -> GN -> SiLU -> 1x1. An MLP for vector features."""

    def __init__(self, feature_shape):
        super().__init__()
        if len(feature_shape) == 1:
            h = int(feature_shape[0])
            self.net = nn.Sequential(nn.Linear(h, h), nn.LayerNorm(h), nn.SiLU(), nn.Linear(h, h),
                                     nn.LayerNorm(h), nn.SiLU(), nn.Linear(h, 1))
            return
        c, res, _ = feature_shape
        first = nn.Conv2d(c, c, 4, 2, 1) if res >= 4 else nn.Conv2d(c, c, 3, 1, 1)
        res2 = res // 2 if res >= 4 else res
        groups = max(1, min(32, c // 4))
        self.net = nn.Sequential(first, nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, c, res2),
                                 nn.GroupNorm(groups, c), nn.SiLU(), nn.Conv2d(c, 1, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).flatten(1).mean(1)


# --------------------------------------------------------------------------------------------------
# The method


@dataclass
class DMD2Config(common.ScoreDistillationConfig):
    """DMD2 settings; defaults are the official ImageNet-64 recipe (train_edm.py, experiments/imagenet/*.sh)."""

    gen_sigmas: list[float] = option([], "generator levels (default: one step at the teacher's sigma_max); several "
                                     "levels train a multi-step generator by backward simulation", metavar="SIGMA")
    gen_every: int = option(5, "update the generator every k-th step, the fake score every step (default "
                            "%(default)s)")
    lr: float = option(2e-6, "learning rate of both networks (default %(default)s)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas of both networks (default %(default)s)",
                                        metavar=("B1", "B2"))
    weight_decay: float = option(0.01, "AdamW weight decay of both networks (default %(default)s)")
    grad_clip: float = option(10.0, "clip each network's gradient norm at this value (default %(default)s; 0 = off)")
    warmup_kimg: float | None = option(None, f"linear LR warm-up of both networks (default: {WARMUP_STEPS} steps of "
                                       "--batch, train_edm.py's --warmup_step)", metavar="KIMG")
    dm_range: tuple[float, float] = option((0.02, 0.98), "distribution-matching levels: Karras indices in [MIN, MAX] "
                                           "x 1000 of a 1000-level grid (default %(default)s)",
                                           metavar=("MIN", "MAX"))
    gan_weight: float = option(0.0, "weight of the generator's GAN term (official: 3e-3; needs --data); 0 = off")
    cls_weight: float = option(1e-2, "weight of the classifier term in the fake-score loss (default %(default)s)")
    teacher_dropout: str = option("eval", "teacher and fake score in the DM term: eval mode or shared dropout masks",
                                  choices=("eval", "shared"))
    student_dropout: float | None = common.student_dropout_option(
        0.0, "0, as train_edm.py builds every network with dropout 0")

    def resolve(self, teacher, loop) -> DMD2Config:
        """warmup_kimg: train_edm.py's WARMUP_STEPS steps of the run's batch (0 outside a run); fake_warmup_steps:
        0 for network teachers, 300 for analytic ones (a fresh fake score first fitted to the initial
        generator; `ScoreDistillationConfig.resolve`). Checks the warm-up and the distribution-matching range."""
        lo, hi = self.dm_range
        if not 0 <= lo <= hi <= 1:
            raise UsageError(f"dmd2: --dm-range MIN MAX needs 0 <= MIN <= MAX <= 1, got {lo:g} {hi:g}")
        warmup = self.warmup_kimg
        if warmup is None:
            warmup = 0.0 if loop is None else WARMUP_STEPS * loop.batch / 1000
        elif warmup < 0:
            raise UsageError(f"dmd2: --warmup-kimg must be 0 (off) or positive, got {warmup:g}")
        return replace(super().resolve(teacher, loop), warmup_kimg=float(warmup), dm_range=(float(lo), float(hi)),
                       gen_sigmas=[float(s) for s in self.gen_sigmas])


class DMD2(common.ScoreDistillation, Method):
    """DMD2 on the shared loop: 'generator' (every `gen_every` steps), then 'fake_score' (every step)."""

    name = "dmd2"

    def __init__(self, teacher: Denoiser, cfg: DMD2Config | None = None, generator: Denoiser | None = None,
                 fake: Denoiser | None = None):
        """generator/fake: networks to use instead of copies of the teacher (fresh MLPs if analytic)."""
        super().__init__()
        cfg = (cfg or DMD2Config()).resolve(teacher, None)
        sig = [float(s) for s in cfg.gen_sigmas] or [float(teacher.sigma_max)]
        if any(b >= a for a, b in zip(sig, sig[1:])):
            raise UsageError(f"generator sigmas must be strictly descending, got {sig}")
        for s in sig:
            common.check_sigma(teacher, s, "generator sigma")
        self.gen_sigmas = sig
        self._init_networks(teacher, cfg, generator, fake)
        # The generator turn's samples (detached, with their labels), one per micro-batch, for the fake score
        # of the same step: (step, x_g, cond).
        self._handoff: list[tuple[int, Tensor, Tensor | None]] = []
        self.head = None
        if cfg.gan_weight > 0:
            if not isinstance(self.fake, Precond):
                raise DiffdistillError("the GAN head needs a network fake score")
            self._tap = FeatureTap(self.fake.backbone)
            with torch.no_grad():
                probe = self._tap.capture(lambda: self.fake(torch.zeros(2, *teacher.shape), 1.0,
                                                            common.random_labels(teacher, 2, "cpu")))
            self.head = ClassifierHead(probe.shape[1:])

    def groups(self) -> dict[str, Group]:
        cfg = self.cfg

        def optim():
            return OptimConfig(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, kind="adamw",
                               warmup_kimg=cfg.warmup_kimg, grad_clip=cfg.grad_clip, decay=cfg.lr_decay)
        fake_params = list(self.fake.parameters()) + (list(self.head.parameters()) if self.head else [])
        return {
            "generator": Group(list(self.generator.parameters()), optim(), loss=self.generator_loss,
                               every=cfg.gen_every, start=cfg.fake_warmup_steps),
            "fake_score": Group(fake_params, optim(), loss=self.fake_score_loss, needs_data=self.head is not None),
        }

    # -- generation, with backward simulation for multi-step generators (DMD2 §4.5) ---------------------
    def generate(self, n: int, device, grad: bool) -> tuple[Tensor, Tensor | None]:
        cond = common.random_labels(self.teacher, n, device)
        sig = self.gen_sigmas
        x = sig[0] * common.unit_noise(n, self.teacher.shape, device)
        steps = int(torch.randint(len(sig), ())) if len(sig) > 1 else 0
        with torch.no_grad():
            for j in range(steps):   # the generator's own sampler down to level sig[steps] (sample_multistep)
                x0 = self.generator(x, sig[j], cond)
                x = renoise(x0, sig[j + 1], self.generator.sigma_min, torch.randn_like(x0))
        with torch.set_grad_enabled(grad):
            return self.generator(x, sig[steps], cond), cond

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """No EMA (half-life 0: the EMA copy is the trained generator): train_edm.py keeps none and
        test_folder_edm.py evaluates the trained generator's weights."""
        return 0.0, None

    def begin_step(self, step: int, nimg: int) -> None:
        self._handoff.clear()

    def fake_samples(self, batch: Batch) -> tuple[Tensor, Tensor | None]:
        """The fake score's samples of this step: the generator turn's own (in order of its micro-batches),
        else fresh ones made without gradients (steps without a generator update), as `EDMUniModel` does."""
        while self._handoff and self._handoff[0][0] != batch.step:
            self._handoff.pop(0)        # left over from a step whose fake-score turn never came
        if self._handoff:
            _, x_g, cond = self._handoff.pop(0)
            return x_g, cond
        return self.generate(batch.size, batch.device, grad=False)

    def _logits(self, x: Tensor, cond: Tensor | None) -> Tensor:
        sigma = all_levels_sigma(x.shape[0], self.teacher, device=x.device)
        x_s = x + param.append_dims(sigma, x) * torch.randn_like(x)
        return self.head(self._tap.capture(lambda: self.fake(x_s, sigma, cond)))

    def generator_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        self.generator.train()
        x_g, cond = self.generate(batch.size, batch.device, grad=True)
        self._handoff.append((batch.step, x_g.detach(), cond))
        sigma = dm_sigma(batch.size, self.teacher, *cfg.dm_range, device=batch.device)
        loss, grad = dm_loss(self.teacher, self.fake, x_g, sigma, cond, dropout=cfg.teacher_dropout)
        out = {"dm_loss": loss.detach(), "grad_norm": grad.flatten(1).norm(dim=1).mean()}
        if self.head is not None:   # non-saturating generator GAN term through the (frozen) fake encoder
            with params_frozen(self.fake, self.head):
                gen_gan = F.softplus(-self._logits(x_g, cond)).mean()
            loss = loss + cfg.gan_weight * gen_gan
            out["gan_loss"] = gen_gan.detach()
        out["loss"] = loss
        return out

    def fake_score_loss(self, batch: Batch) -> dict[str, Tensor]:
        cfg = self.cfg
        x_g, cond = self.fake_samples(batch)
        self.fake.train()
        sigma = all_levels_sigma(batch.size, self.teacher, device=batch.device)
        # EDM loss with weight sigma^-2 + sigma_data^-2, averaged over elements as in DMD2.
        loss = common.edm_loss(self.fake, x_g, sigma, cond) / x_g[0].numel()
        out = {"fake_loss": loss.detach()}
        if self.head is not None:
            if batch.x is None:
                raise DiffdistillError("the DMD2 GAN term needs real data (a --data set)")
            real_logits = self._logits(batch.x.to(x_g.dtype), batch.cond)
            fake_logits = self._logits(x_g, cond)
            cls = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            loss = loss + cfg.cls_weight * cls
            out["cls_loss"] = cls.detach()
        out["loss"] = loss
        return out

    def recipe(self) -> dict:
        if len(self.gen_sigmas) == 1:
            return common.onestep_recipe(self.gen_sigmas[0])
        return {"sampler": "multistep", "sigmas": self.gen_sigmas + [0.0]}


def create(cfg: DMD2Config, teacher: Denoiser, data=None, loop=None) -> DMD2:
    if cfg.gan_weight > 0 and data is None:
        raise UsageError("dmd2 --gan-weight > 0 trains a GAN on real data: give a data set (--data)")
    method = DMD2(teacher, cfg)
    dist.print0(f"dmd2: generator {common.count_params(method.generator):,} parameters, fake score "
                f"{common.count_params(method.fake):,}, levels {method.gen_sigmas}, generator every "
                f"{cfg.gen_every} steps, GAN weight {cfg.gan_weight:g}, LR warm-up {cfg.warmup_kimg:g} kimg, "
                f"dropout {common.dropout_of(method.generator)}")
    return method


SPEC = MethodSpec(name="dmd2", help="DMD2: one- or few-step generator by normalised distribution matching (+ optional "
                                    "GAN on real data)",
                  config=DMD2Config, create=create, title="DMD2", recipes=RECIPES, ema_help=EMA_HELP)
