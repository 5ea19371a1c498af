"""The one interface: a denoiser D(x, sigma, cond=None) -> x0 in EDM sigma space.

Teachers, students, fake-score networks and guidance wrappers are all `Denoiser`s; samplers and methods use
only this interface. Other parameterisations (VP eps/v/x, discrete DDPM timesteps) are adapted here or in
`diffdistill.teachers`, once, at the edge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from . import param


def as_onehot(cond: Tensor | None, label_dim: int, batch: int, device, dtype=torch.float32) -> Tensor | None:
    """Class labels as one-hot rows [B, label_dim]. Accepts int labels [B] or one-hot; zeros = unconditional."""
    if label_dim == 0:
        if cond is not None and cond.numel() > 0 and bool((cond != 0).any()) and cond.dtype.is_floating_point:
            raise ValueError("class labels given to an unconditional denoiser")
        return None
    if cond is None:
        return torch.zeros(batch, label_dim, device=device, dtype=dtype)
    if not cond.dtype.is_floating_point:
        if cond.ndim != 1 or cond.shape[0] != batch:
            raise ValueError(f"int class labels must have shape [{batch}], got {tuple(cond.shape)}")
        if int(cond.min()) < 0 or int(cond.max()) >= label_dim:
            raise ValueError(f"class labels must lie in 0..{label_dim - 1}")
        return nn.functional.one_hot(cond.long(), label_dim).to(device=device, dtype=dtype)
    if cond.shape != (batch, label_dim):
        raise ValueError(f"one-hot class labels must have shape [{batch}, {label_dim}], got {tuple(cond.shape)}")
    return cond.to(device=device, dtype=dtype)


class Denoiser(nn.Module):
    """Base class of every denoiser.

    Attributes samplers rely on:
      shape       per-sample shape, e.g. (3, 32, 32) or (2,)
      sigma_min, sigma_max, sigma_data
      label_dim   number of classes (0 = unconditional)
      discrete_sigmas  None, or the ascending tensor of the noise levels a discrete-time teacher was trained on
    Subclasses implement `denoise(x, sigma [B], cond one-hot or None)` and `config()`.
    """

    def __init__(self, shape, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, label_dim=0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.label_dim = int(label_dim)
        self.discrete_sigmas: Tensor | None = None

    takes_augment_labels = False  # whether `denoise` accepts EDM augmentation labels (Precond does)

    def forward(self, x: Tensor, sigma, cond: Tensor | None = None, augment_labels: Tensor | None = None) -> Tensor:
        """augment_labels: optional [B, k] conditioning of EDM's augmentation pipeline, for a `Precond` whose
        backbone takes them (augment_dim k > 0); other denoisers refuse them."""
        if augment_labels is not None and not self.takes_augment_labels:
            raise ValueError(f"{type(self).__name__} takes no augment labels")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected samples of shape {self.shape}, got a batch of shape {tuple(x.shape)}")
        if not torch.is_tensor(sigma):  # a Python number: keep its full precision in x's dtype
            sigma = torch.tensor(float(sigma), dtype=x.dtype)
        sigma = sigma.to(x.device)
        sigma = (sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)).to(x.dtype)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
        cond = as_onehot(cond, self.label_dim, x.shape[0], x.device)
        if augment_labels is None:
            return self.denoise(x, sigma, cond)
        if augment_labels.ndim != 2 or augment_labels.shape[0] != x.shape[0]:
            raise ValueError(f"augment labels must have shape [{x.shape[0]}, k], got {tuple(augment_labels.shape)}")
        return self.denoise(x, sigma, cond, augment_labels=augment_labels.to(x.device))

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable description from which `diffdistill.io.build_denoiser` rebuilds this denoiser."""
        raise NotImplementedError

    def info(self) -> dict:
        return dict(shape=list(self.shape), sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    sigma_data=self.sigma_data, label_dim=self.label_dim)


@dataclass
class PrecondConfig:
    """How a raw backbone F(x_in, c_noise, class_labels) becomes a denoiser."""

    kind: str = "edm"            # edm | boundary (CM/GDD) | vp (EDM VPPrecond, eps) | ve | cosine (PD-style VP)
    prediction: str = "eps"      # kind=cosine: what F predicts: eps | v | x | both (x and eps heads, 2C channels)
    sigma_data: float = 0.5      # data standard deviation (EDM)
    sigma_min: float = 0.002     # smallest supported level (boundary kind: f(x, sigma_min) = x)
    sigma_max: float = 80.0      # largest supported level
    logsnr_min: float = -20.0    # cosine kind: logSNR clipping of the time input
    logsnr_max: float = 20.0
    extra: dict = field(default_factory=dict)


class Precond(Denoiser):
    """Wraps a backbone F into D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, §5)."""

    def __init__(self, backbone: nn.Module, shape, label_dim: int = 0, config: PrecondConfig | None = None):
        cfg = config or PrecondConfig()
        super().__init__(shape, cfg.sigma_min, cfg.sigma_max, cfg.sigma_data, label_dim)
        if cfg.kind not in ("edm", "boundary", "vp", "ve", "cosine"):
            raise ValueError(f"unknown preconditioning {cfg.kind!r} (edm, boundary, vp, ve, cosine)")
        if cfg.prediction not in ("eps", "v", "x", "both"):
            raise ValueError(f"unknown prediction type {cfg.prediction!r} (eps, v, x, both)")
        if cfg.prediction == "both" and cfg.kind != "cosine":
            raise ValueError("prediction 'both' needs the cosine (VP) preconditioning")
        self.backbone = backbone
        self.precond = cfg

    takes_augment_labels = True   # passed on to the backbone (EDM's augment_labels), when given

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None, augment_labels: Tensor | None = None) -> Tensor:
        cfg = self.precond
        kw = {}
        if augment_labels is not None:   # EDM's augment_labels conditioning, for backbones with augment_dim > 0
            if getattr(self.backbone, "map_augment", None) is None:
                raise ValueError(f"backbone {type(self.backbone).__name__} takes no augment labels (augment_dim 0)")
            kw = dict(augment_labels=augment_labels)
        x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least, as EDM's wrappers
        sigma = sigma.to(x.dtype)
        s = param.append_dims(sigma, x)
        if cfg.kind in ("edm", "boundary"):
            scal = param.edm_scalings if cfg.kind == "edm" else (
                lambda sg, sd: param.boundary_scalings(sg, sd, cfg.sigma_min))
            c_skip, c_out, c_in, c_noise = scal(s, cfg.sigma_data)
            F = self.backbone(c_in * x, c_noise.flatten(), cond, **kw)
            return c_skip * x + c_out * F.to(x.dtype)
        if cfg.kind == "ve":
            c_skip, c_out, c_in, c_noise = param.ve_scalings(s)
            return c_skip * x + c_out * self.backbone(c_in * x, c_noise.flatten(), cond, **kw).to(x.dtype)
        if cfg.kind == "vp":
            # EDM's VPPrecond: eps output, time input 999 * t(sigma).
            from .schedules import vp_sigma_inv
            c_skip, c_out, c_in = param.vp_scalings(s)
            c_noise = 999 * vp_sigma_inv(sigma)
            return c_skip * x + c_out * self.backbone(c_in * x, c_noise, cond, **kw).to(x.dtype)
        # cosine: a VP network that sees z_t = alpha x_sigma and t of the cosine schedule, predicting eps/v/x.
        alpha, sigma_t = param.vp_from_edm(s)
        z = alpha * x
        t = param.cosine_time_from_edm(sigma, cfg.logsnr_min, cfg.logsnr_max)
        out = self.backbone(z, t, cond, **kw).to(x.dtype)
        if cfg.prediction == "x":
            return out
        if cfg.prediction == "v":
            return param.x_from_v(z, out, alpha, sigma_t)
        if cfg.prediction == "both":  # separate x and eps heads along the channel axis (PD's ImageNet model)
            x_head, eps_head = out.chunk(2, dim=1)
            return param.x_from_both(z, x_head, eps_head, alpha, sigma_t)
        return param.x_from_eps(z, out, alpha, sigma_t)

    def config(self) -> dict:
        net_cfg = getattr(self.backbone, "config", None)
        if not callable(net_cfg):
            raise TypeError(f"backbone {type(self.backbone).__name__} has no config() to save")
        return dict(type="precond", precond=asdict(self.precond), network=net_cfg(),
                    shape=list(self.shape), label_dim=self.label_dim)


class BoundaryDenoiser(Denoiser):
    """Any denoiser D with the consistency-model boundary condition (Song et al. 2023, §3 and App. C):

        f(x, sigma) = c_skip(sigma) x + c_out(sigma) D(x, sigma),
        c_out = c_out_cm / c_out_edm = (sigma - sigma_min) / sigma,   c_skip = c_skip_cm - c_out c_skip_edm,

    with the consistency scalings c_skip_cm, c_out_cm (`param.boundary_scalings`, as in openai/consistency_models'
    get_scalings_for_boundary_condition) and EDM's c_skip_edm, c_out_edm (`param.edm_scalings`). When D is
    EDM-preconditioned, D = c_skip_edm x + c_out_edm F, this is exactly the official c_skip_cm x + c_out_cm F
    (`Precond` kind 'boundary'); for any D (a diffusers/DDPM teacher's copy, a VP/VE/cosine `Precond`),
    f(x, sigma_min) = x exactly, and at large sigma c_out -> 1, c_skip -> 0 (0 <= c_skip <= c_skip_cm), so f is
    the denoiser itself. sigma_min: the boundary level (default: D's smallest level).
    """

    def __init__(self, denoiser: Denoiser, sigma_min: float | None = None):
        smin = denoiser.sigma_min if sigma_min is None else float(sigma_min)
        if not 0 < smin <= denoiser.sigma_max:
            raise ValueError(f"boundary level {smin:g} outside (0, sigma_max = {denoiser.sigma_max:g}]")
        super().__init__(denoiser.shape, smin, denoiser.sigma_max, denoiser.sigma_data, denoiser.label_dim)
        self.denoiser = denoiser
        self.discrete_sigmas = denoiser.discrete_sigmas

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out) at levels `sigma` (any shape)."""
        c_skip_cm, c_out_cm, _, _ = param.boundary_scalings(sigma, self.sigma_data, self.sigma_min)
        c_skip_edm, c_out_edm, _, _ = param.edm_scalings(sigma, self.sigma_data)
        c_out = c_out_cm / c_out_edm
        return c_skip_cm - c_out * c_skip_edm, c_out

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        c_skip, c_out = self.scalings(param.append_dims(sigma.to(dtype), x))
        return c_skip * x.to(dtype) + c_out * self.denoiser(x, sigma, cond).to(dtype)

    def config(self) -> dict:
        return dict(type="boundary", sigma_min=self.sigma_min, denoiser=self.denoiser.config())


def build_boundary(config: dict) -> BoundaryDenoiser:
    """A `BoundaryDenoiser` from its config (io.BUILTIN_BUILDERS['boundary'])."""
    from ..errors import DiffdistillError
    from ..io import build_denoiser

    if "denoiser" not in config:
        raise DiffdistillError("a 'boundary' denoiser config needs 'denoiser'")
    return BoundaryDenoiser(build_denoiser(config["denoiser"]), config.get("sigma_min"))

