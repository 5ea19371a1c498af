"""Consistency distillation (Song et al. 2023, Algorithm 2; official openai/consistency_models(_cifar10)).

The student is a consistency function with the boundary condition f(x, sigma_min) = x: a copy of an
EDM-preconditioned teacher switched to the consistency scalings, f = c_skip(t) x + c_out(t) F(c_in x, ln(t)/4)
(`Precond` kind 'boundary', as the official code), and any other copy (a diffusers/DDPM teacher, a VP/VE
`Precond`) wrapped in `BoundaryDenoiser`, which is the same parameterisation written on the denoiser. One step of
the teacher's probability-flow ODE (Heun or Euler) from t_{n+1} to t_n on the Karras grid gives the target point;
the loss is d(f_theta(x_{t_{n+1}}, t_{n+1}), f_target(x_hat_{t_n}, t_n)), with f_target = stop-grad(f_theta)
(CIFAR-10 recipe) or an EMA of f_theta (ImageNet/LSUN recipe, mu = 0.95). The student trains with dropout 0
(both official codes) and is sampled from a per-step EMA (0.9999 on CIFAR-10, 0.9999432 on ImageNet-64).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..diffusion import param
from ..diffusion.denoiser import BoundaryDenoiser, Denoiser, Precond
from ..diffusion.schedules import karras_sigmas
from ..errors import DiffdistillError, UsageError
from ..samplers.ode import heun_step
from . import MethodSpec, common
from .base import Batch, Group, Method, OptimConfig, Recipe, halflife_from_decay
from .options import MethodConfig, option

# --------------------------------------------------------------------------------------------------
# One teacher ODE step at per-sample levels (Karras et al. 2022, Alg. 2 without churn, or its Euler step)


@torch.no_grad()
def teacher_step(teacher: Denoiser, x: Tensor, t: Tensor, t_next: Tensor, cond=None,
                 solver: str = "heun") -> Tensor:
    """One step of dx/dsigma = (x - D(x; sigma))/sigma from t to t_next > 0 (t, t_next: [B]), in x's dtype:
    the samplers' Heun step (`samplers.ode.heun_step`), or its Euler predictor alone."""
    if solver not in ("heun", "euler"):
        raise ValueError(f"unknown teacher solver {solver!r} (heun, euler)")
    return heun_step(lambda y, s: teacher(y, s, cond).to(x.dtype), x, t, t_next, second_order=solver == "heun")[0]


# --------------------------------------------------------------------------------------------------
# Distances d(., .) per sample (openai/consistency_models: l2 / l1 = mean over dimensions; LPIPS optional)


def distance(a: Tensor, b: Tensor, kind: str = "l2", lpips: nn.Module | None = None) -> Tensor:
    """Per-sample distance [B] between two batches."""
    if kind == "l2":
        return ((a - b) ** 2).flatten(1).mean(1)
    if kind == "l1":
        return (a - b).abs().flatten(1).mean(1)
    if kind == "lpips":
        if lpips is None:
            raise DiffdistillError("distance 'lpips' needs LPIPS weights (--lpips-weights PATH.safetensors)")
        return lpips(a, b)
    raise ValueError(f"unknown distance {kind!r} (l2, l1, lpips)")


def consistency_residual(student: Denoiser, target: Denoiser, teacher: Denoiser, x_t: Tensor, t: Tensor,
                         t_next: Tensor, cond=None, solver: str | Callable = "heun",
                         same_dropout: bool = True) -> tuple[Tensor, Tensor]:
    """(f_theta(x_t, t), f_target(x_hat_{t_next}, t_next)) for one CD pair (Song et al. 2023, Eq. 7).

    `solver` is 'heun', 'euler' or a callable (teacher, x, t, t_next, cond) -> x_next (e.g. an exact ODE map).
    The target is computed without gradient; with `same_dropout` both evaluations share the dropout RNG state.
    """
    step = solver if callable(solver) else (lambda te, x, a, b, c: teacher_step(te, x, a, b, c, solver))
    x_next = step(teacher, x_t, t, t_next, cond)
    devices = [x_t.device] if x_t.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=same_dropout):
        f_student = student(x_t, t, cond)
    with torch.no_grad():
        f_target = target(x_next.to(x_t.dtype), t_next, cond)
    return f_student, f_target


# --------------------------------------------------------------------------------------------------
# Optional LPIPS (Zhang et al. 2018, VGG variant) from user-supplied safetensors weights


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)    # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
POOLINGS = ("avg", "max")


class LPIPS(nn.Module):
    """LPIPS-VGG distance as the consistency-models codes compute it; weights: torchvision vgg16 `features.*`
    and lpips `lin{0..4}.model.1.weight` keys.

    openai/consistency_models (ImageNet-64, LSUN) uses piq's LPIPS(replace_pooling=True, reduction='none'):
    VGG16 with its max poolings replaced by 2x2 average poolings (pooling='avg'), and upsamples images narrower
    than 256 (`resize_below`) to 224x224 (`resize`) bilinearly first; wider ones are compared as they are.
    openai/consistency_models_cifar10 (JAX) uses lpips-j on flaxmodels' VGG16, which keeps the max poolings
    (pooling='max'), and upsamples every (32x32) image to 224. Images come in [-1, 1]: (x - shift) / scale is
    the ImageNet normalisation ((x + 1)/2 - mean) / std that both apply to (x + 1)/2. Features are unit-normalised
    over channels, weighted by the 1x1 `lin` layers, averaged over space and summed over the five taps.
    """

    def __init__(self, weights: str | Path, resize: int | None = 224, resize_below: int = 256,
                 pooling: str = "avg"):
        super().__init__()
        from ..io import load_tensors
        if pooling not in POOLINGS:
            raise UsageError(f"unknown LPIPS pooling {pooling!r} ({', '.join(POOLINGS)})")
        layers, ch = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avg" else nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.resize, self.resize_below, self.pooling = resize, resize_below, pooling
        state = load_tensors(weights)
        mapped = {}
        for k, v in state.items():
            if k.startswith("features."):
                mapped[k] = v
            elif k.startswith("lin") and k.endswith(".weight"):
                mapped[f"lins.{k[3]}.weight"] = v
        missing = sorted(set(self.state_dict()) - set(mapped) - {"shift", "scale"})
        if missing:
            raise DiffdistillError(f"{weights}: not LPIPS-VGG weights (missing {missing[:3]})")
        try:
            self.load_state_dict(mapped, strict=False)
        except RuntimeError as e:
            detail = str(e).splitlines()[-1]
            raise DiffdistillError(f"{weights}: LPIPS weights of the wrong shape ({detail})") from None
        self.requires_grad_(False).eval()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.ndim != 4 or a.shape[1] not in (1, 3):
            raise DiffdistillError(f"LPIPS needs [B, 1 or 3, H, W] images, got {tuple(a.shape)}")
        upsample = bool(self.resize) and a.shape[-1] < self.resize_below

        def feats(x):
            x = x.expand(-1, 3, -1, -1)
            if upsample:
                x = nn.functional.interpolate(x, size=(self.resize, self.resize), mode="bilinear",
                                              align_corners=False)
            x, out = (x - self.shift) / self.scale, []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in _TAPS:
                    out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            return out

        total = 0
        for lin, fa, fb in zip(self.lins, feats(a), feats(b)):
            total = total + lin((fa - fb) ** 2).mean((1, 2, 3))
        return total


# --------------------------------------------------------------------------------------------------
# The student: a consistency function f(x, sigma_min) = x


def has_boundary(net: Denoiser) -> bool:
    """True when `net` satisfies f(x, sigma_min) = x by construction: a `Precond` of kind 'boundary' or a
    `BoundaryDenoiser`."""
    return isinstance(net, BoundaryDenoiser) or (isinstance(net, Precond) and net.precond.kind == "boundary")


def with_boundary(net: Denoiser) -> Denoiser:
    """`net` itself when it has the boundary condition, else `net` wrapped in `BoundaryDenoiser`."""
    return net if has_boundary(net) else BoundaryDenoiser(net)


def cd_student(teacher: Denoiser, dropout: float | None = 0.0) -> Denoiser:
    """The default CD student: a trainable copy of the teacher with dropout `dropout` (None: the teacher's), an
    EDM `Precond` switched to the consistency scalings and any other denoiser wrapped in `BoundaryDenoiser`; a
    fresh boundary `Precond(MLP)` for analytic teachers."""
    return with_boundary(common.student_from_teacher(teacher, boundary=True, dropout=dropout))


# --------------------------------------------------------------------------------------------------
# The method


# Analytic teachers only (a fresh Precond(MLP) student, nothing to copy): the EMA target (mu = 0.95, the
# ImageNet/LSUN recipe) instead of the stop-grad one. A from-scratch student's stop-grad target moves with every
# update, and bootstrapping it through the 17 grid intervals is slow and noisy: on toy:ring8 the one-step
# student's fraction of samples within 3 std of a mode clears the bound of tests/test_cd.py
# (test_ring8_keeps_every_mode) with the EMA target, not with stop-grad. Network teachers keep the CIFAR-10
# default (the copy starts converged).
ANALYTIC_TARGET = "ema"
NETWORK_TARGET = "stopgrad"         # the CIFAR-10 recipe's
NETWORK_EMA_DECAY = 0.9999          # the CIFAR-10 recipe's per-step sampling EMA (model.ema_rate)


@dataclass
class CDConfig(MethodConfig):
    """Consistency distillation settings (defaults: the CIFAR-10 recipe of Song et al. 2023). `target` and
    `ema_decay` None are decided by `resolve` from the teacher."""

    num_scales: int = option(18, "Karras grid levels N (default %(default)s)")
    rho: float = option(7.0, "Karras grid exponent (default %(default)s)")
    solver: str = option("heun", "teacher ODE step", choices=("heun", "euler"))
    target: str | None = option(None, f"target network: stop-grad student (CIFAR-10) or an EMA of it (default "
                                f"{NETWORK_TARGET}; {ANALYTIC_TARGET} for analytic teachers)",
                                choices=("stopgrad", "ema"))
    target_ema: float = option(0.95, "target EMA rate mu (with --target ema)")
    distance: str = option("l2", "consistency distance", choices=("l2", "l1", "lpips"))
    lpips_weights: str | None = option(None, "LPIPS-VGG weights (.safetensors), required by --distance lpips",
                                       metavar="PATH")
    lpips_pooling: str = option("avg", "VGG pooling of LPIPS: avg (openai/consistency_models, piq replace_pooling) "
                                "or max (the CIFAR-10 JAX code, lpips-j) (default %(default)s)", choices=POOLINGS)
    sample_sigmas: list[float] | None = option(None, "export a multistep sampler at these levels (default: one "
                                               "step at sigma_max)", metavar="SIGMA")
    lr: float = option(4e-4, "student learning rate (RAdam)")
    student_dropout: float | None = option(0.0, "dropout probability of the student copied from the teacher, or "
                                           "'teacher' to keep the teacher's (default 0, the official setting: both "
                                           "official codes train the student with dropout 0, --dropout 0.0 and "
                                           "model.dropout = 0.0)", parse=common.dropout_value, metavar="P|teacher")
    ema_decay: float | None = option(None, f"per-step decay of the sampling EMA when no --ema is given (default "
                                     f"{NETWORK_EMA_DECAY}, the CIFAR-10 recipe's; analytic teachers: EDM's 500 "
                                     "kimg with ramp-up)", metavar="RATE")

    def resolve(self, teacher, loop) -> CDConfig:
        """target: stopgrad for network teachers, ANALYTIC_TARGET for analytic ones; ema_decay: 0.9999 for network
        teachers, None (EDM's 500 kimg with ramp-up) for analytic ones; sample_sigmas None: [] (one step). The
        values are checked (UsageError naming the option; the LPIPS weights file is checked by `create`)."""
        analytic = common.is_weightless(teacher)
        cfg = replace(self, target=self.target or (ANALYTIC_TARGET if analytic else NETWORK_TARGET),
                      ema_decay=self.ema_decay if self.ema_decay is not None else (
                          None if analytic else NETWORK_EMA_DECAY),
                      sample_sigmas=[float(s) for s in self.sample_sigmas or []])
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.solver not in ("heun", "euler"):
            raise UsageError(f"unknown teacher solver {self.solver!r} (--solver heun, euler)")
        if self.target not in ("stopgrad", "ema"):
            raise UsageError(f"unknown target network {self.target!r} (--target stopgrad, ema)")
        if not 0.0 <= self.target_ema < 1.0:
            raise UsageError(f"the target EMA rate (--target-ema) must lie in [0, 1), got {self.target_ema}")
        if self.distance not in ("l2", "l1", "lpips"):
            raise UsageError(f"unknown distance {self.distance!r} (--distance l2, l1, lpips)")
        if self.distance == "lpips" and not self.lpips_weights:
            raise UsageError("distance 'lpips' (used by --recipe cifar10/imagenet64, as the paper) needs "
                             "--lpips-weights PATH (LPIPS-VGG weights as safetensors), or choose --distance l2")
        if self.lpips_pooling not in POOLINGS:
            raise UsageError(f"unknown LPIPS pooling {self.lpips_pooling!r} (--lpips-pooling {', '.join(POOLINGS)})")
        if self.num_scales < 2:
            raise UsageError(f"--num-scales must be at least 2, got {self.num_scales}")
        if not self.rho > 0:
            raise UsageError(f"the Karras grid exponent (--rho) must be positive, got {self.rho}")
        if not self.lr > 0:
            raise UsageError(f"the student learning rate (--lr) must be positive, got {self.lr}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"the EMA decay per step (--ema-decay) must lie in (0, 1), got {self.ema_decay}")
        sig = self.sample_sigmas
        if sig and (any(b >= a for a, b in zip(sig, sig[1:])) or sig[-1] <= 0):
            raise UsageError(f"sample sigmas (--sample-sigmas) must be positive and strictly descending, got {sig}")


class ConsistencyDistillation(Method):
    """CD: `student` is a denoiser with the boundary condition (usually initialised from the teacher)."""

    name = "cd"

    def __init__(self, teacher: Denoiser, cfg: CDConfig | None = None, student: Denoiser | None = None):
        """student: the network to train instead of the default `cd_student(teacher)`; it must have the boundary
        condition (a `Precond` of kind 'boundary' or a `BoundaryDenoiser`)."""
        super().__init__()
        cfg = (cfg or CDConfig()).resolve(teacher, None)
        if student is None:
            student = cd_student(teacher, cfg.student_dropout)
        elif not has_boundary(student):
            raise DiffdistillError(
                f"the CD student ({type(student).__name__}) needs the boundary condition f(x, sigma_min) = x: "
                "give a Precond of kind 'boundary' or wrap it, BoundaryDenoiser(student)")
        for s in cfg.sample_sigmas:
            common.check_sigma(student, s, "sample sigma")
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.target_net = copy.deepcopy(student).requires_grad_(False) if cfg.target == "ema" else None
        # a list hides the frozen LPIPS network from state_dict (it is not saved in every checkpoint)
        self._lpips = [LPIPS(cfg.lpips_weights, pooling=cfg.lpips_pooling)] if cfg.distance == "lpips" else []
        # the discretisation sigma_max = t_0 > ... > t_{N-1} = sigma_min (Karras et al. 2022, Eq. 5); the last
        # level is set to sigma_min itself, where the boundary condition makes the target f(x, t_{N-1}) = x exactly
        grid = karras_sigmas(cfg.num_scales, student.sigma_min, student.sigma_max, cfg.rho)[:-1]
        grid[-1] = student.sigma_min
        self.register_buffer("grid", grid.float(), persistent=False)

    def groups(self) -> dict[str, Group]:
        return {"student": Group(list(self.student.parameters()), OptimConfig(lr=self.cfg.lr, kind="radam"),
                                 loss=self.student_loss, needs_data=True)}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """The official sampling EMA: a per-step decay (CIFAR-10 `model.ema_rate = 0.9999`; ImageNet-64 the
        0.9999432189950708 of `--ema_rate`, a half-life of exactly 25,000 kimg at batch 2048) from the first
        step, with no ramp-up. cfg.ema_decay None (analytic teachers): EDM's 500 kimg with ramp-up 0.05."""
        if self.cfg.ema_decay is None:
            return super().ema_default(batch)
        return halflife_from_decay(self.cfg.ema_decay, batch), None

    def begin_step(self, step: int, nimg: int) -> None:
        # Target EMA theta^- <- mu theta^- + (1 - mu) theta after every update (Song et al. 2023, Alg. 2).
        if self.target_net is not None and step > 0:
            with torch.no_grad():
                for p_t, p in zip(self.target_net.parameters(), self.student.parameters()):
                    p_t.lerp_(p.detach(), 1 - self.cfg.target_ema)
                for b_t, b in zip(self.target_net.buffers(), self.student.buffers()):
                    b_t.copy_(b)

    def student_loss(self, batch: Batch) -> dict[str, Tensor]:
        if batch.x is None:
            raise DiffdistillError("consistency distillation needs real data (a --data set)")
        x0 = batch.x
        # n ~ U{0..N-2}: t = grid[n] (larger), t_next = grid[n+1]; x_t = x + t z (Song et al. 2023, Alg. 2).
        n = torch.randint(len(self.grid) - 1, (x0.shape[0],), device=x0.device)
        t, t_next = self.grid[n], self.grid[n + 1]
        x_t = x0 + param.append_dims(t, x0) * torch.randn_like(x0)
        target = self.target_net if self.target_net is not None else self.student
        f_student, f_target = consistency_residual(self.student, target, self.teacher, x_t, t, t_next,
                                                   batch.cond, self.cfg.solver)
        # uniform weighting over the grid (Song et al. 2023, lambda(t_n) = 1)
        lpips = self._lpips[0].to(x0.device) if self._lpips else None
        per_sample = distance(f_student, f_target.detach(), self.cfg.distance, lpips)
        return {"loss": per_sample.mean(), "sigma": t.mean()}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        net = (ema or {}).get("student", self.student)
        if self.cfg.sample_sigmas:
            return net, {"sampler": "multistep", "sigmas": [float(s) for s in self.cfg.sample_sigmas] + [0.0]}
        return net, {"sampler": "onestep", "sigmas": [float(net.sigma_max), 0.0]}


# --------------------------------------------------------------------------------------------------
# Recipes and the CLI

EMA_HELP = ("EMA half-life of the student in kimg, with EDM's ramp-up 0.05 (default: the official per-step decay "
            "--ema-decay, 0.9999 on CIFAR-10, with no ramp-up: B ln(0.5)/ln(decay)/1000 kimg at batch B, 3549 kimg "
            "at 512; analytic teachers: 500 kimg with EDM's ramp-up)")

# The paper's LPIPS recipes (FID 3.55 on CIFAR-10, 6.20 on ImageNet-64, one step). Both need --lpips-weights.
RECIPES = {
    "cifar10": Recipe(
        source="Song et al. 2023, CD (LPIPS) on CIFAR-10: openai/consistency_models_cifar10 "
               "configs/cifar10_ve_cd.py + launch.sh (800k steps of 512, RAdam 4e-4 with no warm-up: its RAdam "
               "branch ignores optim.warmup, N=18, Heun, stop-grad target, LPIPS of lpips-j (max pooling, 224), "
               "EMA 0.9999, dropout 0, random flips); needs --lpips-weights",
        options=dict(batch=512, total_kimg=409600, lr=4e-4, num_scales=18, rho=7.0, solver="heun",
                     target="stopgrad", distance="lpips", lpips_pooling="max", ema_decay=0.9999, xflip=True)),
    "imagenet64": Recipe(
        source="Song et al. 2023, CD (LPIPS) on ImageNet-64: openai/consistency_models scripts/launch.sh "
               "(cm_train.py: 600k steps of 2048, RAdam 8e-6, N=40, Heun, target EMA 0.95, piq LPIPS with "
               "average pooling at 224, EMA 0.9999432189950708, dropout 0, random flips; fp16 there, fp32 here); "
               "needs --lpips-weights",
        options=dict(batch=2048, total_kimg=1228800, lr=8e-6, num_scales=40, rho=7.0, solver="heun", target="ema",
                     target_ema=0.95, distance="lpips", lpips_pooling="avg", ema_decay=0.9999432189950708,
                     xflip=True)),
}


def create(cfg: CDConfig, teacher: Denoiser, data=None, loop=None) -> ConsistencyDistillation:
    if cfg.lpips_weights and not Path(cfg.lpips_weights).is_file():
        raise DiffdistillError(f"{cfg.lpips_weights}: LPIPS weights file not found")
    return ConsistencyDistillation(teacher, cfg)


SPEC = MethodSpec(name="cd", help="consistency distillation (Song et al. 2023): a one- or few-step consistency "
                                  "model from a teacher ODE",
                  config=CDConfig, create=create, needs_data=True, title="consistency distillation",
                  recipes=RECIPES, ema_help=EMA_HELP)
