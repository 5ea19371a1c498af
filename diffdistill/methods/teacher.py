"""Training a teacher: EDM's loss (Karras et al. 2022), or PD's VP loss with eps / v / x output.

- `edm` (algorithms.md §1.2): ln sigma ~ N(P_mean, P_std^2), loss = lambda(sigma) ||D(y + n; sigma) - y||^2 with
  lambda = (sigma^2 + sd^2)/(sigma sd)^2, summed over pixels and averaged over images (EDM's reduction). The
  network is wrapped by `Precond(kind='edm')`; the export recipe is 18-step Heun (EDM Algorithm 2).
- `vp` (§3.1-3.2): a VP network on the cosine logSNR schedule (t ~ U(0, 1), logSNR clipped to [-20, 20]) or the
  linear VP-SDE schedule (t ~ U(1e-5, 1)), wrapped by `Precond(kind='cosine', prediction=eps|v|x)`. Loss on the
  x-prediction with per-example means and the weighting of `dpm.py`: snr_trunc = max(x_mse, eps_mse) =
  max(SNR, 1) x_mse, snr = eps_mse = SNR x_mse, v_mse = (1 + SNR) x_mse, constant = x_mse (identities at a
  fixed z_t, §0), with SNR = 1/sigma^2 in EDM coordinates. Export: DDIM (= Euler, §1.5) on the schedule's grid.
  Progressive distillation wants a v or x teacher (§3.1).
Class labels from the data set condition the network when it has `label_dim > 0`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion import param, schedules
from ..diffusion.denoiser import Denoiser, Precond, PrecondConfig
from ..diffusion.losses import edm_loss
from ..errors import DiffdistillError, UsageError
from .base import Batch, Group, Method, OptimConfig

HELP = "train a diffusion model (the teacher) with EDM's loss or PD's VP loss (eps, v or x output)"
NEEDS_DATA = True

LOSSES = ("edm", "vp")
PREDICTIONS = ("eps", "v", "x")
VP_SCHEDULES = ("cosine", "linear")
WEIGHTINGS = ("snr_trunc", "snr", "v_mse", "constant")


@dataclass
class TeacherConfig:
    """Loss and export settings of teacher training (defaults: EDM, algorithms.md §1.2-1.3)."""

    loss: str = "edm"                  # edm | vp
    prediction: str = "eps"            # vp loss: what the network predicts: eps | v | x
    schedule: str = "cosine"           # vp loss: cosine (logSNR in [logsnr_min, logsnr_max]) | linear (VP-SDE)
    weighting: str = "snr_trunc"       # vp loss: snr_trunc | snr | v_mse | constant (PD's mean_loss_weight_type)
    p_mean: float = -1.2               # edm loss: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    sigma_data: float = 0.5            # edm: data standard deviation of the preconditioning and loss weight
    logsnr_min: float = -20.0          # vp cosine schedule clipping (PD's CIFAR-10 config)
    logsnr_max: float = 20.0
    vp_eps_t: float = 1e-5             # vp linear schedule: t ~ U(eps_t, 1)
    label_dropout: float = 0.0         # replace class labels by "unconditional" (all-zero) with this probability
    sample_steps: int | None = None    # export: Heun steps (edm, default 18) or DDIM steps (vp, default 64)
    optim: OptimConfig | None = None   # optimiser of the network (None: Adam, lr 1e-3, as EDM's CIFAR-10)


def teacher_precond(cfg: TeacherConfig) -> PrecondConfig:
    """The preconditioning that goes with a loss: EDM's, or the cosine-VP wrapper with the chosen output."""
    _check(cfg)
    if cfg.loss == "edm":
        return PrecondConfig(kind="edm", sigma_data=cfg.sigma_data)
    if cfg.schedule == "cosine":
        # sigma = exp(-logSNR/2): the clipped logSNR range of the schedule in EDM coordinates.
        smin, smax = math.exp(-cfg.logsnr_max / 2), math.exp(-cfg.logsnr_min / 2)
    else:
        smin, smax = float(schedules.vp_sigma(cfg.vp_eps_t)), float(schedules.vp_sigma(1.0))
    return PrecondConfig(kind="cosine", prediction=cfg.prediction, sigma_data=cfg.sigma_data, sigma_min=smin,
                         sigma_max=smax, logsnr_min=cfg.logsnr_min, logsnr_max=cfg.logsnr_max)


def _check(cfg: TeacherConfig) -> None:
    for value, allowed, what in ((cfg.loss, LOSSES, "loss"), (cfg.prediction, PREDICTIONS, "prediction"),
                                 (cfg.schedule, VP_SCHEDULES, "schedule"), (cfg.weighting, WEIGHTINGS, "weighting")):
        if value not in allowed:
            raise DiffdistillError(f"unknown {what} {value!r} (known: {', '.join(allowed)})")
    if cfg.loss == "edm" and cfg.prediction != "eps":
        raise DiffdistillError("the edm loss uses EDM's preconditioning; --pred applies to --loss vp only")


def vp_training_sigma(n: int, cfg: TeacherConfig, device=None) -> Tensor:
    """Training noise levels of the VP loss in EDM coordinates: t ~ U, sigma = exp(-logSNR(t)/2) (§3.1)."""
    if cfg.schedule == "cosine":
        u = torch.rand(n, device=device, dtype=torch.float64)
        return param.edm_from_logsnr(schedules.cosine_logsnr(u, cfg.logsnr_min, cfg.logsnr_max)).float()
    return schedules.sample_vp_sigma(n, cfg.vp_eps_t, device=device)


def vp_loss(denoiser: Denoiser, x: Tensor, cond: Tensor | None, cfg: TeacherConfig,
            sigma: Tensor | None = None) -> Tensor:
    """PD's VP loss per image [B]: weight(SNR) * mean_pixels (x_hat - x)^2 with z_t = alpha x + sigma_t eps.

    In EDM coordinates x_sigma = z_t / alpha_t = x + sigma eps, so the denoiser sees x + sigma eps (§0)."""
    if sigma is None:
        sigma = vp_training_sigma(x.shape[0], cfg, x.device)
    s = param.append_dims(sigma, x)
    x_hat = denoiser(x + s * torch.randn_like(x), sigma, cond)
    x_mse = ((x_hat.float() - x) ** 2).flatten(1).mean(1)
    return param.snr_weight(sigma, cfg.weighting).float() * x_mse


class TeacherTraining(Method):
    """Trains one denoiser (group 'denoiser', EMA'd) with the EDM or the VP loss."""

    name = "teacher"

    def __init__(self, denoiser: Denoiser, config: TeacherConfig | None = None):
        super().__init__()
        self.cfg = config or TeacherConfig()
        _check(self.cfg)
        self.denoiser = denoiser.train()

    @classmethod
    def from_network(cls, network: nn.Module, shape, label_dim: int = 0,
                     config: TeacherConfig | None = None) -> TeacherTraining:
        """Wrap a raw backbone F(x_in, c_noise, labels) with the preconditioning of the configured loss."""
        config = config or TeacherConfig()
        return cls(Precond(network, shape, label_dim, teacher_precond(config)), config)

    def groups(self) -> dict[str, Group]:
        optim = self.cfg.optim or OptimConfig(lr=1e-3)
        return {"denoiser": Group(params=[p for p in self.denoiser.parameters() if p.requires_grad],
                                  optim=optim, needs_data=True)}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"denoiser": self.denoiser}

    def _cond(self, batch: Batch) -> Tensor | None:
        label_dim = self.denoiser.label_dim
        if label_dim == 0 or batch.cond is None:
            return None
        onehot = nn.functional.one_hot(batch.cond.long(), label_dim).float()
        if self.cfg.label_dropout > 0:
            keep = torch.rand(onehot.shape[0], 1, device=onehot.device) >= self.cfg.label_dropout
            onehot = onehot * keep
        return onehot

    def loss(self, group: str, batch: Batch) -> dict[str, Tensor]:
        if batch.x is None:
            raise DiffdistillError("teacher training needs real data")
        cond = self._cond(batch)
        cfg = self.cfg
        if cfg.loss == "edm":
            per_image = edm_loss(self.denoiser, batch.x, None, cond, cfg.sigma_data, reduction="none",
                                 p_mean=cfg.p_mean, p_std=cfg.p_std)
        else:
            per_image = vp_loss(self.denoiser, batch.x, cond, cfg)
        # EDM: sum over pixels, mean over images; VP: per-example means, mean over images (§1.2, §3.3).
        return {"loss": per_image.mean()}

    def sampling_recipe(self) -> dict:
        cfg = self.cfg
        if cfg.loss == "edm":
            return {"sampler": "heun", "steps": cfg.sample_steps or 18}
        n = cfg.sample_steps or 64
        grid = schedules.cosine_sigmas(n, cfg.logsnr_min, cfg.logsnr_max) if cfg.schedule == "cosine" \
            else schedules.vp_sigmas(n, eps_s=1e-3)
        return {"sampler": "euler", "sigmas": [float(s) for s in grid]}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        denoiser = ema["denoiser"] if ema else self.denoiser
        return denoiser, self.sampling_recipe()


# --------------------------------------------------------------------------------------------------
# Command line (`diffdistill train-teacher`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("teacher loss")
    g.add_argument("--loss", choices=LOSSES, default="edm", help="edm (default) or vp (PD's cosine/linear VP loss)")
    g.add_argument("--pred", choices=PREDICTIONS, default=None,
                   help="vp loss: network output eps | v | x (default: v; PD recommends v or x)")
    g.add_argument("--schedule", choices=VP_SCHEDULES, default="cosine", help="vp loss: noise schedule")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="snr_trunc", help="vp loss: loss weighting")
    g.add_argument("--sigma-data", type=float, default=None,
                   help="edm: data standard deviation (default: the preset's, 0.5 for images)")
    g.add_argument("--label-dropout", type=float, default=0.0,
                   help="probability of training a sample unconditionally (for classifier-free guidance)")
    g.add_argument("--sample-steps", type=int, default=None,
                   help="steps of the exported sampling recipe (edm: Heun, 18; vp: DDIM, 64)")
    g.add_argument("--uncond", action="store_true", help="ignore the data set's class labels")


def build(args, teacher, data) -> TeacherTraining:
    """The method for `diffdistill train-teacher` (teacher is unused: this trains one)."""
    from .. import presets

    if data is None:
        raise UsageError("train-teacher needs --data")
    if args.loss == "edm" and args.pred not in (None, "eps"):
        raise UsageError("--pred applies to --loss vp (EDM's preconditioning fixes the output)")
    preset = presets.get_preset(args.preset)
    label_dim = 0 if getattr(args, "uncond", False) else int(getattr(data, "label_dim", 0) or 0)
    network = presets.build_network(preset, tuple(data.shape), label_dim, **presets.network_options(args))
    warmup = getattr(args, "warmup", None)
    optim = OptimConfig(lr=args.lr if args.lr is not None else preset.lr,
                        warmup_kimg=warmup if warmup is not None else preset.warmup_kimg,
                        grad_clip=preset.grad_clip)
    cfg = TeacherConfig(loss=args.loss, prediction=(args.pred or "v") if args.loss == "vp" else "eps",
                        schedule=args.schedule, weighting=args.weighting,
                        sigma_data=args.sigma_data or preset.sigma_data, label_dropout=args.label_dropout,
                        sample_steps=args.sample_steps, optim=optim)
    return TeacherTraining.from_network(network, tuple(data.shape), label_dim, cfg)
