"""Training a teacher: EDM's loss (Karras et al. 2022), or PD's VP loss with eps / v / x output.

- `edm` (Karras et al. 2022, Table 1; EDMLoss of the official training/loss.py): ln sigma ~ N(P_mean, P_std^2),
  loss = lambda(sigma) ||D(y + n; sigma) - y||^2 with lambda = (sigma^2 + sd^2)/(sigma sd)^2, summed over pixels
  and averaged over images (EDM's reduction). The network is wrapped by `Precond(kind='edm')`; the export recipe is
  18-step Heun (EDM Algorithm 2).
- `vp` (Salimans & Ho 2022; official schedules.py and config/cifar_base.py): a VP network on the cosine logSNR
  schedule (t ~ U(0, 1), logSNR clipped to [-20, 20]) or the linear VP-SDE schedule (t ~ U(1e-5, 1)), wrapped by
  `Precond(kind='cosine', prediction=eps|v|x)`. Loss on the x-prediction with per-example means and the weighting
  of `dpm.py`: snr_trunc = max(x_mse, eps_mse) = max(SNR, 1) x_mse, snr = eps_mse = SNR x_mse, v_mse =
  (1 + SNR) x_mse, constant = x_mse (identities at a fixed z_t, Salimans & Ho 2022, §4), with SNR = 1/sigma^2 in
  EDM coordinates. Export: DDIM (= Euler in sigma, Song, Meng & Ermon 2021, §4.3) on the schedule's grid.
  Progressive distillation wants a v or x teacher (Salimans & Ho 2022, §4).
Class labels from the data set condition the network when it has `label_dim > 0`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..diffusion import param, schedules
from ..diffusion.denoiser import Denoiser, Precond, PrecondConfig
from ..diffusion.losses import edm_loss
from ..errors import DiffdistillError, UsageError
from ..presets import PRESETS, default_preset, int_list, network_options
from .base import Batch, Group, Method, OptimConfig
from .options import MethodConfig, add_config_arguments, config_from_namespace, option

HELP = "train a diffusion model (the teacher) with EDM's loss or PD's VP loss (eps, v or x output)"
NEEDS_DATA = True

LOSSES = ("edm", "vp")
PREDICTIONS = ("eps", "v", "x")
VP_SCHEDULES = ("cosine", "linear")
WEIGHTINGS = ("snr_trunc", "snr", "v_mse", "constant")


@dataclass
class TeacherConfig:
    """Loss and export settings of teacher training (defaults: EDM's, Karras et al. 2022, Table 1)."""

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
    """Training noise levels of the VP loss in EDM coordinates: t ~ U, sigma = exp(-logSNR(t)/2) (PD's schedules.py)."""
    if cfg.schedule == "cosine":
        u = torch.rand(n, device=device, dtype=torch.float64)
        return param.edm_from_logsnr(schedules.cosine_logsnr(u, cfg.logsnr_min, cfg.logsnr_max)).float()
    return schedules.sample_vp_sigma(n, cfg.vp_eps_t, device=device)


def vp_loss(denoiser: Denoiser, x: Tensor, cond: Tensor | None, cfg: TeacherConfig,
            sigma: Tensor | None = None) -> Tensor:
    """PD's VP loss per image [B]: weight(SNR) * mean_pixels (x_hat - x)^2 with z_t = alpha x + sigma_t eps.

    In EDM coordinates x_sigma = z_t / alpha_t = x + sigma eps, so the denoiser sees x + sigma eps (Karras et al.
    2022, Table 1, VP: s(t) = alpha_t)."""
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
                                  optim=optim, loss=self.denoiser_loss, needs_data=True)}

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

    def denoiser_loss(self, batch: Batch) -> dict[str, Tensor]:
        if batch.x is None:
            raise DiffdistillError("teacher training needs real data")
        cond = self._cond(batch)
        cfg = self.cfg
        if cfg.loss == "edm":
            per_image = edm_loss(self.denoiser, batch.x, None, cond, cfg.sigma_data, reduction="none",
                                 p_mean=cfg.p_mean, p_std=cfg.p_std)
        else:
            per_image = vp_loss(self.denoiser, batch.x, cond, cfg)
        # EDM: sum over pixels, mean over images (EDM's training_loop.py); VP: per-example means, mean over images
        # (PD's dpm.py, training_losses).
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
# The settings of `diffdistill train-teacher` and `diffdistill.train_teacher` (one dataclass, the flags generated)


@dataclass
class TrainTeacherConfig(MethodConfig):
    """Teacher-training settings as the command line names them (`--pred`, `--warmup`, `--channel-mult`, ...; the
    field name is the flag without dashes). None means "the preset's" (or, for --pred, v under the vp loss);
    `resolve` fills those in, the one place both the command line and `diffdistill.train_teacher` take them from.
    `loss_config()` is the method's TeacherConfig."""

    preset: str | None = option(None, "network and loop settings (default: by data shape: toy for points, digits up "
                                "to 8x8, mnist up to 28x28, else cifar10)", choices=tuple(PRESETS))
    lr: float | None = option(None, "learning rate (default: the preset's)")
    warmup: float | None = option(None, "linear learning-rate warm-up in kimg (default: the preset's)",
                                  metavar="KIMG")
    loss: str = option("edm", "edm (default) or vp (PD's cosine/linear VP loss)", choices=LOSSES)
    pred: str | None = option(None, "vp loss: network output eps | v | x (default: v; PD recommends v or x)",
                              choices=PREDICTIONS)
    schedule: str = option("cosine", "vp loss: noise schedule", choices=VP_SCHEDULES)
    weighting: str = option("snr_trunc", "vp loss: loss weighting", choices=WEIGHTINGS)
    sigma_data: float | None = option(None, "edm: data standard deviation (default: the preset's, 0.5 for images)")
    label_dropout: float = option(0.0, "probability of training a sample unconditionally (for classifier-free "
                                  "guidance)")
    sample_steps: int | None = option(None, "steps of the exported sampling recipe (edm: Heun, 18; vp: DDIM, 64)")
    uncond: bool = option(False, "ignore the data set's class labels")
    channels: int | None = option(None, "network: base channel count of a UNet (counts GroupNorm cannot split are "
                                  "refused up front); width of the MLP (default: the preset's)")
    # Sequence, not list: one command-line value '1,2,2' (not nargs), parsed by int_list
    channel_mult: Sequence[int] | None = option(None, "network: UNet channel multiplier per resolution level, e.g. "
                                                "1,2,2 (one level each)", metavar="M1,M2,...", parse=int_list)
    blocks: int | None = option(None, "network: residual blocks per level (UNet), layers (MLP)")
    attn: Sequence[int] | None = option(None, "network: UNet resolutions with self-attention, e.g. 16 or 8,16, or "
                                        "none", metavar="R1,R2,...|none", parse=int_list)
    dropout: float | None = option(None, "network: dropout probability in the residual blocks")

    def resolve(self, teacher=None, loop=None, *, shape=None) -> TrainTeacherConfig:
        """A copy with the preset-dependent defaults filled in (preset from the data's sample `shape` when not
        given; lr, warmup, sigma_data from the preset; pred: v for the vp loss, eps for edm) and the values
        checked. `teacher` and `loop` are unused (this trains a teacher; the loop comes from the preset)."""
        preset_name = self.preset
        if preset_name is None:
            if shape is None:
                raise UsageError("train-teacher: no preset and no data shape to choose one from")
            preset_name = default_preset(tuple(shape))
        self.check()
        preset = PRESETS[preset_name]
        lists = {name: _int_values(name, getattr(self, name)) for name in ("channel_mult", "attn")}
        return replace(self, preset=preset_name, **lists,
                       lr=self.lr if self.lr is not None else preset.lr,
                       warmup=self.warmup if self.warmup is not None else preset.warmup_kimg,
                       sigma_data=self.sigma_data if self.sigma_data is not None else preset.sigma_data,
                       pred=(self.pred or "v") if self.loss == "vp" else "eps")

    def check(self) -> None:
        """UsageError for a value no preset makes valid (before any data is opened)."""
        for value, allowed, flag in ((self.loss, LOSSES, "--loss"), (self.pred, (None, *PREDICTIONS), "--pred"),
                                     (self.schedule, VP_SCHEDULES, "--schedule"),
                                     (self.weighting, WEIGHTINGS, "--weighting")):
            if value not in allowed:
                raise UsageError(f"{flag} {value!r}: expected one of {', '.join(a for a in allowed if a)}")
        if self.loss == "edm" and self.pred not in (None, "eps"):
            raise UsageError("--pred applies to --loss vp (EDM's preconditioning fixes the output)")
        if self.lr is not None and not self.lr > 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if self.warmup is not None and not self.warmup >= 0:
            raise UsageError(f"--warmup must be 0 (none) or positive, got {self.warmup}")
        if self.sigma_data is not None and not self.sigma_data > 0:
            raise UsageError(f"--sigma-data must be positive, got {self.sigma_data}")
        if not 0 <= self.label_dropout <= 1:
            raise UsageError(f"--label-dropout must lie in [0, 1], got {self.label_dropout}")
        if self.sample_steps is not None and not self.sample_steps >= 1:
            raise UsageError(f"--sample-steps must be at least 1, got {self.sample_steps}")
        if self.preset is not None and self.preset not in PRESETS:
            raise UsageError(f"unknown preset {self.preset!r} (known: {', '.join(PRESETS)})")

    def network_options(self) -> dict:
        """The architecture overrides given (channels, channel_mult, blocks, attn, dropout), without unset ones."""
        return network_options(self)

    def loss_config(self) -> TeacherConfig:
        """The method's TeacherConfig of these (resolved) settings, with the preset's gradient clipping."""
        cfg = self.resolve()           # idempotent; a config without a preset needs resolve(shape=...) first
        return TeacherConfig(loss=cfg.loss, prediction=cfg.pred, schedule=cfg.schedule, weighting=cfg.weighting,
                             sigma_data=cfg.sigma_data, label_dropout=cfg.label_dropout,
                             sample_steps=cfg.sample_steps,
                             optim=OptimConfig(lr=cfg.lr, warmup_kimg=cfg.warmup,
                                               grad_clip=PRESETS[cfg.preset].grad_clip))


def _int_values(name: str, value) -> list[int] | None:
    """channel_mult / attn as a list of ints: from a sequence or a '1,2,2' string (the Python API)."""
    if value is None:
        return None
    flag = f"--{name.replace('_', '-')}"
    try:
        values = int_list(value) if isinstance(value, str) else [int(v) for v in value]
    except (TypeError, ValueError) as e:
        raise UsageError(f"{flag} {value!r}: {e}") from None
    if any(v < 1 for v in values):
        raise UsageError(f"{flag} {value!r}: expected positive integers (or none: [])")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`train-teacher`'s options of TrainTeacherConfig, generated from its fields."""
    add_config_arguments(parser, TrainTeacherConfig, "teacher training (defaults: the preset's)")


def create(cfg: TrainTeacherConfig, data) -> TeacherTraining:
    """The method for settings `cfg` on `data` (an opened data set): the preset's network (with cfg's
    architecture overrides) for the data's shape, conditioned on its labels unless cfg.uncond."""
    from .. import presets

    if data is None:
        raise UsageError("train-teacher needs --data")
    cfg = cfg.resolve(shape=tuple(data.shape))
    label_dim = 0 if cfg.uncond else int(getattr(data, "label_dim", 0) or 0)
    network = presets.build_network(cfg.preset, tuple(data.shape), label_dim, **cfg.network_options())
    return TeacherTraining.from_network(network, tuple(data.shape), label_dim, cfg.loss_config())


def build(args, teacher, data) -> TeacherTraining:
    """The method for `diffdistill train-teacher`'s parsed options (teacher is unused: this trains one)."""
    return create(config_from_namespace(TrainTeacherConfig, args), data)
