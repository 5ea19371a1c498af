"""Shared pieces of the distribution-matching family (Diff-Instruct, GDD, DMD2, SiD).

Each piece exists once here:
- networks: a trainable copy of the teacher (`copy_denoiser`), or a fresh `Precond(MLP)` when the teacher is
  analytic and has no weights (`student_from_teacher`); a one-step generator is such a denoiser evaluated at
  one fixed level, x_g = G(init_sigma * z; init_sigma) (`generate`, `onestep_recipe`; as official Diff-Instruct
  `di_train.py` and GDD `training/networks.py: GDDPrecond`);
- the fake-score update: the teacher's own EDM loss on generator samples (`fake_score_loss`; official
  Diff-Instruct `training/di_loss.py: DI_EDMLoss.__call__`);
- two denoisers evaluated on the same input with the same dropout masks (`paired_denoise`; official
  `DI_EDMLoss.gloss`);
- GDD-I layer freezing by role (`freeze_by_role`; official GDD `train.py --freeze`) and a trainable-parameter
  count.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..diffusion import schedules
from ..diffusion.denoiser import Denoiser, Precond, PrecondConfig
from ..diffusion.losses import edm_loss
from ..errors import DiffdistillError, UsageError
from .augment import AugmentPipe, augment_dim
from .options import MethodConfig, option

# --------------------------------------------------------------------------------------------------
# Networks


def is_weightless(denoiser: nn.Module) -> bool:
    """True for analytic teachers (no parameters): there is no network to copy."""
    return not any(True for _ in denoiser.parameters())


def set_dropout(module: nn.Module, p: float | None) -> int:
    """Set the dropout probability of every dropout layer in `module` to p (None: leave them as they are).

    Covers `nn.Dropout*` modules (diffusers UNets) and the functional dropout of this project's UNet/ADM blocks
    (a float `dropout` attribute), and updates a backbone's saved config (`_config['dropout']`) so that a
    snapshot of the student records the dropout it trained with. Returns the number of layers changed.
    """
    if p is None:
        return 0
    if not 0.0 <= float(p) < 1.0:
        raise UsageError(f"dropout must lie in [0, 1), got {p}")
    n = 0
    for m in module.modules():
        own = vars(m)        # the module's own attributes (no diffusers config look-up through __getattr__)
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = float(p)
            n += 1
        elif isinstance(own.get("dropout"), float):
            m.dropout = float(p)
            n += 1
        cfg = own.get("_config")
        if isinstance(cfg, dict) and isinstance(cfg.get("dropout"), float):
            cfg["dropout"] = float(p)
        if callable(getattr(type(m), "register_to_config", None)) and "dropout" in getattr(m, "config", {}):
            m.register_to_config(dropout=float(p))     # a diffusers model: its saved config says it too
    return n


def dropout_value(text: str) -> float | None:
    """A command-line dropout setting: a probability in [0, 1), or 'teacher' (None: keep the teacher's)."""
    if text == "teacher":
        return None
    try:
        p = float(text)
    except ValueError:
        raise ValueError(f"expected a probability in [0, 1) or 'teacher', got {text!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"expected a probability in [0, 1) or 'teacher', got {text!r}")
    return p


def dropout_of(module: nn.Module) -> float | None:
    """The largest dropout probability of `module`'s dropout layers (None when it has none)."""
    ps = [m.p for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    ps += [vars(m)["dropout"] for m in module.modules() if isinstance(vars(m).get("dropout"), float)]
    return max(ps) if ps else None


def copy_denoiser(denoiser: Denoiser, boundary: bool = False, dropout: float | None = None) -> Denoiser:
    """A trainable deep copy (train mode, requires_grad) of a network denoiser, with its dropout set to
    `dropout` (None: the teacher's).

    boundary=True switches an EDM-preconditioned copy to the consistency/GDD scalings (Song et al. 2023; official
    GDD `GDDPrecond`), which agree with EDM's at large sigma (c_skip(80) ~ 3.9e-5 either way) and make
    D(x, sigma_min) = x exactly.
    """
    if is_weightless(denoiser):
        raise DiffdistillError("the teacher has no weights to copy (an analytic teacher): "
                               "use student_from_teacher")
    net = copy.deepcopy(denoiser)
    vars(net).pop("sampling", None)        # the teacher's sampling recipe is not the student's
    if boundary and isinstance(net, Precond) and net.precond.kind == "edm":
        net.precond = replace(net.precond, kind="boundary")
    set_dropout(net, dropout)
    return net.train().requires_grad_(True)


def mlp_denoiser(shape, sigma_data: float, label_dim: int = 0, kind: str = "edm", sigma_min: float = 0.002,
                 sigma_max: float = 80.0, hidden: int = 128, depth: int = 3,
                 input_fourier: int = 32, preset: str | None = None) -> Denoiser:
    """A fresh `Precond(MLP)` for flat toy data (shape (D,)): the student/fake net of analytic teachers.

    Analytic teachers only: the input is lifted with `input_fourier` random Fourier frequencies (Tancik et
    al. 2020). A plain coordinate MLP's spectral bias left the one-step ring8 students blurry (fewer samples
    within 3 std of a mode; the `-k ring8` tests measure that fraction, README's toy:ring8 table lists it).
    Network teachers are copied and never reach here.
    preset: a named `networks.mlp` preset (tiny, toy) instead of hidden, depth and input_fourier (a ValueError
    names an unknown one).
    """
    from ..networks.mlp import MLP, mlp_preset

    if len(shape) != 1:
        raise DiffdistillError(f"a fresh MLP student needs flat data (shape (D,)), got shape {tuple(shape)}")
    if preset is None:
        net = MLP(dim=int(shape[0]), label_dim=label_dim, hidden=hidden, num_layers=depth,
                  input_fourier=input_fourier)
    else:
        net = mlp_preset(preset, int(shape[0]), label_dim)
    cfg = PrecondConfig(kind=kind, sigma_data=float(sigma_data), sigma_min=sigma_min, sigma_max=sigma_max)
    return Precond(net, shape, label_dim, cfg).train()


STUDENT_PRESETS = ("auto", "teacher", "mlp-tiny", "mlp-toy")


def student_from_teacher(teacher: Denoiser, boundary: bool = False, hidden: int = 128,
                         depth: int = 3, dropout: float | None = None, preset: str = "auto") -> Denoiser:
    """The one factory of the trainable networks every method starts from (students, generators, fake scores).

    preset 'teacher': a trainable copy of the teacher's network (`copy_denoiser`, with dropout p, None: the
    teacher's); 'mlp-<name>': a fresh `Precond(MLP)` of the `networks.mlp` preset <name> (tiny, toy); 'auto':
    the copy when the teacher has a network, else a fresh `Precond(MLP)` of width `hidden` and `depth` layers
    (`mlp_denoiser`). Fresh MLPs take the teacher's shape, levels and sigma_data. boundary: the consistency
    scalings, f(x, sigma_min) = x (EDM-preconditioned copies and fresh MLPs).
    """
    analytic = is_weightless(teacher)
    if preset in ("auto", "teacher") and not analytic:
        return copy_denoiser(teacher, boundary=boundary, dropout=dropout)
    if preset == "teacher":
        raise DiffdistillError("the teacher is analytic and has no network to copy (student preset 'teacher'); "
                               "use a fresh MLP student (mlp-toy or mlp-tiny)")
    if preset != "auto" and not (preset.startswith("mlp-") and len(preset) > 4):
        raise DiffdistillError(f"unknown student preset {preset!r} ({', '.join(STUDENT_PRESETS)})")
    kind = "boundary" if boundary else "edm"
    try:
        return mlp_denoiser(teacher.shape, teacher.sigma_data, teacher.label_dim, kind, teacher.sigma_min,
                            teacher.sigma_max, hidden=hidden, depth=depth,
                            preset=None if preset == "auto" else preset[4:])
    except ValueError as e:            # an unknown networks.mlp preset
        raise DiffdistillError(str(e)) from None


def eps_prediction(denoiser: Denoiser, through_wrappers: bool = True) -> tuple[str, str] | None:
    """How a denoiser predicts eps, as (family, description): family 'vp' (EDM's VPPrecond, cosine-schedule eps,
    DDPM/diffusers prediction 'epsilon': D = x - sigma eps) or 've' (EDM's VEPrecond: D = x + sigma F); None for
    x, v, 'both' and EDM-mixture outputs. Guidance wrappers (`.denoiser`) are looked through unless told not to."""
    from ..teachers.discrete import DiscreteVPDenoiser

    inner = getattr(denoiser, "denoiser", None)
    if through_wrappers and isinstance(inner, Denoiser):
        return eps_prediction(inner)
    if isinstance(denoiser, Precond):
        kind, prediction = denoiser.precond.kind, denoiser.precond.prediction
        if kind == "vp":
            return "vp", "EDM's VP preconditioning (VPPrecond, an eps-prediction network)"
        if kind == "ve":
            return "ve", "EDM's VE preconditioning (D = x + sigma F, an eps-prediction network)"
        if kind == "cosine" and prediction == "eps":
            return "vp", "a cosine-schedule eps-prediction network"
    if isinstance(denoiser, DiscreteVPDenoiser) and denoiser.prediction == "epsilon":
        return "vp", "a DDPM eps-prediction network (prediction_type 'epsilon')"
    return None


def check_sigma(denoiser: Denoiser, sigma: float, what: str = "init sigma") -> float:
    if not denoiser.sigma_min <= sigma <= denoiser.sigma_max:
        raise DiffdistillError(f"{what} {sigma:g} lies outside the teacher's range "
                               f"[{denoiser.sigma_min:g}, {denoiser.sigma_max:g}]")
    return float(sigma)


def generate(generator: Denoiser, z: Tensor, init_sigma: float, cond: Tensor | None = None) -> Tensor:
    """One-step generation x_g = G(init_sigma * z; init_sigma) from unit noise z (official Diff-Instruct and GDD)."""
    return generator(init_sigma * z, init_sigma, cond)


def onestep_recipe(init_sigma: float) -> dict:
    """The sampling recipe of a one-step generator (must use the training init_sigma, as official Diff-Instruct
    does for training, FID and sampling)."""
    return {"sampler": "onestep", "sigmas": [float(init_sigma), 0.0]}


def random_labels(denoiser: Denoiser, n: int, device) -> Tensor | None:
    """Uniform class labels for data-free generation (None for unconditional denoisers)."""
    if denoiser.label_dim == 0:
        return None
    return torch.randint(denoiser.label_dim, (n,), device=device)


def zero_loss(module: nn.Module) -> Tensor:
    """A loss of exactly 0 that still reaches every trainable parameter (a skipped update)."""
    return sum((0.0 * p.sum() for p in module.parameters() if p.requires_grad), torch.zeros(()))


def unit_noise(n: int, shape: Sequence[int], device) -> Tensor:
    """Unit Gaussian noise from the global RNG (the loop seeds it per step from (seed, rank, step))."""
    return torch.randn(n, *shape, device=device)


# --------------------------------------------------------------------------------------------------
# The fake-score update (Diff-Instruct, official `training/di_loss.py: DI_EDMLoss.__call__`; also DMD2 and SiD)


def sample_sigma(n: int, denoiser: Denoiser, p_mean: float = -1.2, p_std: float = 1.2, device=None) -> Tensor:
    """EDM's lognormal training levels (Karras et al. 2022, Table 1), clamped to the denoiser's range."""
    sigma = schedules.sample_lognormal_sigma(n, p_mean, p_std, device=device)
    return sigma.clamp(denoiser.sigma_min, denoiser.sigma_max)


def fake_score_loss(fake: Denoiser, x_g: Tensor, cond: Tensor | None = None, p_mean: float = -1.2,
                    p_std: float = 1.2, pipe: AugmentPipe | None = None) -> Tensor:
    """Train the fake score on (detached) generator samples with the teacher's own EDM loss (official
    Diff-Instruct `DI_EDMLoss.__call__`).

    With an augment pipe, EDM's loss with augmentation (Karras et al. 2022, official EDM `training/loss.py`;
    official DI and SiD on CIFAR-10): draw sigma, augment the clean sample, noise it, denoise with the augment
    labels (only when the network takes them: augment_dim > 0) and compare with the augmented clean sample."""
    x = x_g.detach()
    sigma = sample_sigma(x.shape[0], fake, p_mean, p_std, device=x.device)
    if pipe is None:
        return edm_loss(fake, x, sigma, cond)
    y, labels = pipe(x)
    net = functools.partial(fake, augment_labels=labels) if augment_dim(fake) else fake
    return edm_loss(net, y, sigma, cond, sigma_data=fake.sigma_data)


OFFICIAL_AUGMENT = 0.12   # EDM's --augment default, kept by the official DI command and SiD's CIFAR-10 runs


def make_augment_pipe(teacher: Denoiser, fake: Denoiser, p: float | None) -> AugmentPipe | None:
    """The fake score's augmentation: p None = the official 0.12 when the fake network takes augment labels
    (an EDM teacher's copy, trained with that pipeline), else none; p = 0: none. Needs image teachers [C, H, W]
    and 9 augment labels."""
    if p is None:
        p = OFFICIAL_AUGMENT if augment_dim(fake) else 0.0
    if not 0.0 <= p <= 1.0:
        raise UsageError(f"--augment must lie in [0, 1], got {p}")
    if p == 0:
        return None
    if len(teacher.shape) != 3:
        raise UsageError(f"--augment {p:g}: EDM's augmentation needs image samples [C, H, W], the teacher makes "
                         f"{tuple(teacher.shape)} (use --augment 0)")
    pipe = AugmentPipe(p=p)
    k = augment_dim(fake)
    if k and k != pipe.label_dim:
        raise DiffdistillError(f"the fake score's network takes {k} augment labels, EDM's pipeline gives "
                               f"{pipe.label_dim}")
    return pipe


AUGMENT_HELP = (f"EDM augmentation probability of the fake score's samples (0: none; default: the official "
                f"{OFFICIAL_AUGMENT:g} when the teacher's network takes augment labels, i.e. EDM teachers trained "
                "with it, else 0; needs image teachers)")


# --------------------------------------------------------------------------------------------------
# Two denoisers on the same input with the same dropout masks (Diff-Instruct's generator update, official
# `training/di_loss.py: DI_EDMLoss.gloss`)


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, cuda


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def paired_denoise(nets: Sequence[Denoiser], x: Tensor, sigma, cond: Tensor | None = None,
                   dropout: str = "shared") -> list[Tensor]:
    """Evaluate several denoisers on one input.

    dropout='shared' (official Diff-Instruct): every net in train mode, the RNG state restored before each, so
    nets of the same architecture draw the same dropout masks. dropout='eval': every net in eval mode.
    Modes are restored afterwards; gradients are not disabled here (the caller decides).
    """
    if dropout not in ("shared", "eval"):
        raise ValueError(f"dropout must be 'shared' or 'eval', got {dropout!r}")
    modes = [net.training for net in nets]
    state = _rng_state(x.device)
    outs = []
    try:
        for net in nets:
            net.train(dropout == "shared")
            _set_rng_state(x.device, state)
            outs.append(net(x, sigma, cond))
    finally:
        for net, mode in zip(nets, modes):
            net.train(mode)
    return outs


# --------------------------------------------------------------------------------------------------
# GDD-I freezing by layer role (official GDD `train.py --freeze`, `training_loop.py`), on EDM SongUNet
# parameter names (`...block0.conv0`, `...proj`, ...)

FREEZE_ROLES: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("conv0", "conv1", "proj"),          # block 3x3 convolutions and attention output projections
    2: ("conv0", "conv1", "proj", "qkv"),   # ... and attention qkv
    3: ("conv0", "conv1", "proj", "qkv", "skip"),  # ... and the blocks' skip convolutions
}


ANALYTIC_FAKE_WARMUP = 300  # fresh fake scores of analytic teachers fit the generator alone this many steps first


FAKE_WARMUP_HELP = (f"steps that train only the fake score first (default 0; {ANALYTIC_FAKE_WARMUP} for analytic "
                    "teachers, whose fake score starts as a fresh network)")


def fake_warmup_steps(value: int | None, teacher: Denoiser) -> int:
    """--fake-warmup-steps, defaulting to 0 for network teachers (the fake score is a copy of the teacher)."""
    if value is not None:
        return value
    return ANALYTIC_FAKE_WARMUP if is_weightless(teacher) else 0



def student_dropout_option(default: float | None, why: str):
    """The `student_dropout` field of a score-distillation config, with the method's default and its reason."""
    return option(default, "dropout probability of the generator and fake score copied from the teacher, or "
                  f"'teacher' to keep the teacher's (default: {why})", parse=dropout_value, metavar="P|teacher")


@dataclass
class ScoreDistillationConfig(MethodConfig):
    """The settings of `ScoreDistillation`'s frame, shared by Diff-Instruct, SiD and DMD2 (each sets its own
    `student_dropout` default). `resolve` gives the fake-score warm-up its teacher-dependent default; a
    subclass that resolves more calls it."""

    student_dropout: float | None = student_dropout_option(None, "the teacher's")
    fake_warmup_steps: int | None = option(None, FAKE_WARMUP_HELP)
    lr_decay: str = option("constant", "LR schedule of the generator and the fake score: constant (the papers', "
                           "default %(default)s) or linear to 0 at the end of the run", choices=("constant", "linear"))
    mlp_hidden: int = option(128, "fresh MLP width (analytic teachers only)", cli=False)
    mlp_depth: int = option(3, "fresh MLP depth (analytic teachers only)", cli=False)

    def resolve(self, teacher, loop):
        """fake_warmup_steps: 0 for network teachers (the fake score is a copy of the teacher),
        ANALYTIC_FAKE_WARMUP for analytic ones (a fresh network first fitted to the initial generator)."""
        return replace(self, fake_warmup_steps=fake_warmup_steps(self.fake_warmup_steps, teacher))


class ScoreDistillation:
    """The frame shared by Diff-Instruct, SiD and DMD2 (mixed into their `Method`): a frozen teacher, a one-step
    generator and an online fake score, each a copy of the teacher (fresh MLPs for analytic teachers) with
    dropout `cfg.student_dropout` (None: the teacher's); the fake score's augmentation (`cfg.augment`, DI and
    SiD; DMD2 has none); an EMA of the generator. `cfg` is a `ScoreDistillationConfig` with teacher_dropout and
    gen_every. The fake-score warm-up is the
    generator group's `start` (the loop neither evaluates nor steps the generator before it)."""

    def _init_networks(self, teacher: Denoiser, cfg, generator: Denoiser | None, fake: Denoiser | None) -> None:
        if cfg.teacher_dropout not in ("shared", "eval"):
            raise DiffdistillError(f"teacher_dropout must be 'shared' or 'eval', got {cfg.teacher_dropout!r}")
        if cfg.gen_every < 1:
            raise UsageError(f"gen_every must be >= 1, got {cfg.gen_every}")
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        mlp = dict(hidden=cfg.mlp_hidden, depth=cfg.mlp_depth, dropout=cfg.student_dropout)
        self.generator = generator if generator is not None else student_from_teacher(teacher, **mlp)
        self.fake = fake if fake is not None else student_from_teacher(teacher, **mlp)
        self.augment_pipe = make_augment_pipe(teacher, self.fake, getattr(cfg, "augment", 0.0))

    def augment_summary(self) -> str:
        pipe = self.augment_pipe
        if pipe is None:
            return "no augmentation"
        return f"augmentation p={pipe.p:g} " + ("with augment labels" if augment_dim(self.fake) else
                                               "WITHOUT augment labels (the network takes none)")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()          # its dropout is switched on only inside paired_denoise
        return self

    def generate_onestep(self, n: int, device, grad: bool) -> tuple[Tensor, Tensor | None]:
        """x_g = G(init_sigma z; init_sigma) with random labels; without gradients G runs in eval mode."""
        cond = random_labels(self.teacher, n, device)
        z = unit_noise(n, self.teacher.shape, device)
        if grad:
            self.generator.train()
            return generate(self.generator, z, self.init_sigma, cond), cond
        mode = self.generator.training
        self.generator.eval()
        try:
            with torch.no_grad():
                return generate(self.generator, z, self.init_sigma, cond), cond
        finally:
            self.generator.train(mode)

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def recipe(self) -> dict:
        return onestep_recipe(self.init_sigma)

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        return (ema or {}).get("generator", self.generator), self.recipe()


def count_params(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def freeze_by_role(module: nn.Module, level: int) -> tuple[int, int]:
    """Freeze the parameters of layers whose own name is in FREEZE_ROLES[level]; returns (trainable, total).

    A parameter `a.b.conv0.weight` belongs to the layer named `conv0`. Raises if the level freezes nothing
    (the network has no such layers) or everything.
    """
    if level not in FREEZE_ROLES:
        raise DiffdistillError(f"freeze level must be one of {sorted(FREEZE_ROLES)}, got {level}")
    roles = set(FREEZE_ROLES[level])
    total = count_params(module, trainable_only=False)
    if not roles:
        return count_params(module), total
    frozen = 0
    for name, p in module.named_parameters():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in roles:
            p.requires_grad_(False)
            frozen += p.numel()
    trainable = count_params(module)
    if frozen == 0:
        raise DiffdistillError(f"freeze level {level} matches no layer of this network (no {sorted(roles)} "
                               "layers: it is not an EDM-style UNet)")
    if trainable == 0:
        raise DiffdistillError(f"freeze level {level} would freeze every parameter of the generator")
    return trainable, total
