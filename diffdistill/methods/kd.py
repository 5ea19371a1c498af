"""Knowledge distillation, "Denoising Student" (Luhman & Luhman 2021; official tcl9876/Denoising_Student).

Stage 1 (`diffdistill kd-pairs`, or the start of `distill kd`): the teacher's deterministic sampler maps unit
noise x_T to samples y (`methods/kd_pairs.py`); the pairs are written resumably in the shards of
`diffdistill.data.pairs`, which stage 2 trains on: the loop streams the training pairs as its data set
(`data.pairs.PairsDataset`, given to it by `SPEC.run`, so KD takes no --data) in its seeded order, a new
permutation of all the pairs every epoch; the method's loss gets them as `Batch.fields`.
Stage 2: a one-step student, initialised from the teacher's network (without dropout: the official student
has none), regresses y from x_T in image space. The official student (`models.py: Onestep_Model`) is
G(z) = z - F(z, 999): the teacher's eps-network fed the unit noise z itself at the last timestep, its output
subtracted from z. For eps-prediction VP students (DDPM/diffusers eps teachers, EDM's VPPrecond, cosine
eps) diffdistill trains exactly that G (`PaperStudent`): a denoiser evaluated as D(sigma_max z; sigma_max) would
be sigma_max (z' - F(z', 999)), i.e. G with a gain of sigma_max (~157 for DDPM), under which the paper's Adam
learning rate moves the output ~157x further per step. Students of other parameterisations (EDM, v or x
prediction, analytic teachers' MLPs), whose output already has a gain of about 1, run as D(sigma z; sigma) at the
fixed level sigma = the student's sigma_max. Loss: L1 (CIFAR-10) or L2, summed over pixels and averaged over the
batch (official `training.py`). The loop keeps an EMA (the paper's: 0.995 per step, no ramp-up); the EMA with
the best held-out loss is what `export` returns (the official `training.py` model selection), found through the
loop's evaluate hook (`KnowledgeDistillation.evaluate`, `SPEC.best_metric`).

Settings: `KDConfig`, whose pair fields (`PairsSettings`) are also the options of `diffdistill kd-pairs`.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import dist
from ..data import pairs as P
from ..diffusion import param
from ..diffusion.denoiser import Denoiser
from ..errors import DiffdistillError, UsageError
from ..io import build_denoiser
from ..validate import MAX_BATCH, count_value, seed_value
from . import MethodSpec, common, kd_pairs
from .base import Batch, Group, Method, OptimConfig, Recipe, halflife_from_decay
from .options import MethodConfig, config_from_namespace, option

EMA_HELP = ("EMA half-life of the student in kimg, with EDM's ramp-up 0.05 (default: the paper's per-step decay "
            "--ema-decay 0.995 with no ramp-up, a half-life of B ln(0.5)/ln(0.995)/1000 kimg at batch B: 70.8 kimg "
            "at 512)")
PAPER_WARMUP_KIMG = 2560.0     # the paper's LR warm-up: 5000 steps of 512 images, 10% of its 25.6 Mimg run

_PAIRS = kd_pairs.PairsConfig()  # the defaults of a new pairs directory
_EXISTING = "as the existing --pairs directory, else"


@dataclass
class PairsSettings(MethodConfig):
    """Stage 1: the (noise, teacher sample) pairs to train on, made, completed or extended as asked; the options
    of `diffdistill kd-pairs` and, through `KDConfig`, of `distill kd`. None: as an existing pairs directory,
    else the default of `kd_pairs.PairsConfig`."""

    pairs: str | None = option(None, "pairs directory (`distill kd`'s default: RUN-pairs, beside the run)",
                               metavar="DIR")
    n_pairs: int | None = option(None, f"training pairs (default: all those of an existing --pairs directory, else "
                                 f"{_PAIRS.n_pairs}); fewer than the directory holds uses its first N, more extends "
                                 "it", parse=count_value(1, 2**40))
    heldout: int | None = option(None, f"held-out pairs (default: {_EXISTING} {_PAIRS.heldout}); fewer uses the "
                                 "first, more extends", parse=count_value(0, 2**40))
    shard_size: int | None = option(None, f"pairs per shard of a new directory (default {_PAIRS.shard_size}; an "
                                    "existing one keeps its own)", parse=count_value(1, 2**32))
    pairs_sampler: str | None = option(None, "teacher sampler: ddim-quad (DDPM teachers: 100 quadratic steps from "
                                       "index 800), ddim-uniform (50 uniform), heun (EDM, 18 steps = 35 NFE), "
                                       "euler; auto: ddim-quad for discrete teachers, else heun (default: "
                                       f"{_EXISTING} {_PAIRS.sampler})",
                                       choices=("auto", "ddim-quad", "ddim-uniform", "heun", "euler"))
    pairs_steps: int | None = option(None, f"sampler steps (0: the sampler's default; default: {_EXISTING} "
                                     f"{_PAIRS.steps})", parse=count_value(0, 100_000))
    target_dtype: str | None = option(None, "target storage: uint8 is the paper's (clipped to [-1,1], truncated); "
                                      "auto: uint8 for images, float16 otherwise (default: "
                                      f"{_EXISTING} {_PAIRS.target_dtype})", choices=("auto", "float16", "uint8"))
    gen_batch: int = option(_PAIRS.batch, "generation batch; does not change the pairs (default %(default)s)",
                            parse=count_value(1, MAX_BATCH))
    pairs_seed: int | None = option(None, f"seed of the noise (default: {_EXISTING} {_PAIRS.seed})",
                                    parse=seed_value)

    def pairs_config(self) -> kd_pairs.PairsConfig:
        """The pairs asked for (None fields: as an existing directory, else the defaults)."""
        return kd_pairs.PairsConfig(n_pairs=self.n_pairs, heldout=self.heldout, shard_size=self.shard_size,
                                    sampler=self.pairs_sampler, steps=self.pairs_steps,
                                    target_dtype=self.target_dtype, batch=self.gen_batch, seed=self.pairs_seed)


PAIR_FIELDS = tuple(f.name for f in fields(PairsSettings))


@dataclass
class KDConfig(PairsSettings):
    """Knowledge distillation settings: the pairs (stage 1, `PairsSettings`) and the student's training (stage 2);
    defaults follow the official CIFAR-10 recipe (`utils.py: get_settings`)."""

    loss: str = option("l1", "regression loss, summed over pixels and averaged over the batch (default %(default)s, "
                       "CIFAR-10; the others l2)", choices=("l1", "l2"))
    student_preset: str = option("auto", "auto | teacher (copy of the teacher network, the paper) | mlp-tiny | "
                                 "mlp-toy (fresh MLP for analytic teachers); default auto: teacher when it has a "
                                 "network")
    lr: float = option(2e-4, "Adam learning rate (default %(default)s, CIFAR-10; CelebA 5e-5, LSUN 5e-6)")
    betas: tuple[float, float] = option((0.9, 0.98), "Adam betas (default %(default)s, CIFAR-10 and CelebA; LSUN "
                                        "0.98 0.999)", metavar=("B1", "B2"))
    # Adam epsilon: the official 1e-8 (Keras adds it to sqrt(v) before the bias correction, torch after: the two
    # agree once 1 - beta2^t ~ 1)
    adam_eps: float = option(1e-8, "Adam epsilon (default %(default)s)")
    ema_decay: float = option(0.995, "per-step EMA decay used when --ema is not given, no ramp-up (default "
                              "%(default)s, CIFAR-10 and CelebA; LSUN 0.9995)")
    warmup_kimg: float | None = option(None, f"LR warm-up, then a constant LR (default: 10%% of --kimg, at most the "
                                       f"paper's {PAPER_WARMUP_KIMG:g} = 5000 steps of 512, which is 10%% of its "
                                       "25.6 Mimg run)")
    student_sigma: float | None = option(None, "fixed level of the one-step student (default: its sigma_max)")
    student_dropout: float | None = option(0.0, "dropout probability of the student copied from the teacher, or "
                                           "'teacher' to keep the teacher's (default: 0, as the official student, "
                                           "models.py: Onestep_Model, has no dropout)",
                                           parse=common.dropout_value, metavar="P|teacher")
    grad_clip: float | None = option(None, "global-norm gradient clipping (the paper has none)", cli=False)
    eval_batch: int = option(512, "batch size of the held-out evaluation", cli=False)

    def resolve(self, teacher, loop) -> KDConfig:
        """The defaults that depend on the run (none depends on the teacher): warmup_kimg 10% of the run
        (loop.total_kimg), at most the paper's 2560 kimg, which is also the value without a run; pairs: RUN-pairs
        beside the run directory (without a run it must be given). Checks the loss and the EMA decay."""
        if self.loss not in ("l1", "l2"):
            raise UsageError(f"unknown KD loss {self.loss!r} (--loss l1 or l2)")
        if not 0 <= self.ema_decay < 1:
            raise UsageError(f"--ema-decay: the EMA decay must lie in [0, 1), got {self.ema_decay:g}")
        warmup, pairs = self.warmup_kimg, self.pairs
        if warmup is None:   # the paper's proportion (10% of the run), capped at its absolute length
            warmup = min(PAPER_WARMUP_KIMG, 0.1 * loop.total_kimg) if loop is not None and loop.total_kimg \
                else PAPER_WARMUP_KIMG
        if pairs is None and loop is not None:
            pairs = default_pairs_dir(loop.out)
        return replace(self, warmup_kimg=float(warmup), pairs=None if pairs is None else str(pairs))


def is_vp_eps(net: Denoiser) -> bool:
    """True for eps-prediction VP networks, whose denoiser output has a gain of sigma over the eps head:
    discrete DDPM/diffusers teachers with prediction 'epsilon', EDM's VPPrecond, cosine-schedule eps."""
    eps = common.eps_prediction(net, through_wrappers=False)
    return eps is not None and eps[0] == "vp"


def paper_output(net: Denoiser, u: Tensor, level: float, cond: Tensor | None = None) -> Tensor:
    """Denoising Student's G(u) = u - eps(u, t(level)) for an eps-prediction VP network (official
    `models.py: Onestep_Model`).

    The network sees the VP state u itself, i.e. x = u / alpha = u sqrt(1 + level^2) in EDM space, and its eps
    is read back from the denoiser, eps = (x - D(x; level)) / level, so the gradient reaches the eps head with
    weight exactly 1, as in the paper."""
    x = u * math.sqrt(1 + level**2)
    return u - param.eps_from_denoised(x, net(x, level, cond), level)


class PaperStudent(Denoiser):
    """The paper's one-step student G(u) = u - eps(u, t_max) of an eps-prediction VP network `net`, as a
    denoiser that `sample_onestep` runs: D(x; sigma) = G(x / sigma) at any sigma (it is a generator of the unit
    noise u = x / sigma, and `level` is the fixed noise level of its eps network, sigma at t_max = 999)."""

    def __init__(self, net: Denoiser, level: float):
        if not is_vp_eps(net):
            raise DiffdistillError(f"the paper's student G(z) = z - F(z, t_max) needs an eps-prediction VP network, "
                                   f"not a {type(net).__name__}")
        super().__init__(net.shape, net.sigma_min, net.sigma_max, net.sigma_data, net.label_dim)
        self.net = net
        self.level = float(level)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        u = x / param.append_dims(sigma, x)
        return paper_output(self.net, u, self.level, cond).to(x.dtype)

    def config(self) -> dict:
        return dict(type="kd-onestep", level=self.level, denoiser=self.net.config())


def build_paper_student(config: dict) -> PaperStudent:
    if "denoiser" not in config or "level" not in config:
        raise DiffdistillError("a 'kd-onestep' denoiser config needs 'denoiser' and 'level'")
    return PaperStudent(build_denoiser(config["denoiser"]), float(config["level"]))


def regression_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-sample sum over pixels of |.| (l1) or (.)^2 (l2), averaged over the batch (official `training.py`)."""
    diff = (pred.float() - target.float()).flatten(1)
    per_sample = diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1)
    return per_sample.mean()


class KnowledgeDistillation(Method):
    """Denoising Student on the shared loop: one group, 'student', whose data set is the training pairs of a
    pairs directory (`self.pairs`, a `PairsDataset`: `SPEC.run` trains on it); the held-out pairs pick the best
    EMA. An eps-prediction VP student is trained as the paper's G (wrapped in a `PaperStudent` at level
    cfg.student_sigma or its sigma_max)."""

    name = "kd"

    def __init__(self, student: Denoiser, pairs_root: str | Path, cfg: KDConfig | None = None,
                 manifest: dict | None = None):
        super().__init__()
        self.cfg = cfg = (cfg or KDConfig()).resolve(None, None)    # checks the loss and the EMA decay
        if isinstance(student, PaperStudent):
            self.sigma = student.level
        else:
            self.sigma = float(cfg.student_sigma if cfg.student_sigma is not None else student.sigma_max)
            if is_vp_eps(student):       # train the paper's G(z) = z - F(z, t_max), not sigma_max times it
                student = PaperStudent(student, self.sigma)
        self.student = student.train().requires_grad_(True)
        self.pairs = P.PairsDataset(pairs_root, manifest or P.verify_pairs(pairs_root))
        shape = tuple(self.pairs.m["shape"])
        if shape != tuple(student.shape):
            raise DiffdistillError(f"{pairs_root}: pairs of shape {shape} do not fit a student of shape "
                                   f"{tuple(student.shape)}")
        # The EMA with the best held-out loss so far (a frozen copy, so checkpoints carry it).
        self.best = copy.deepcopy(student).eval().requires_grad_(False)
        self.register_buffer("best_loss", torch.tensor(math.inf, dtype=torch.float64))

    def train(self, mode: bool = True):
        super().train(mode)
        self.best.eval()
        return self

    def groups(self) -> dict[str, Group]:
        c = self.cfg
        return {"student": Group(list(self.student.parameters()),
                                 OptimConfig(lr=c.lr, betas=c.betas, eps=c.adam_eps, warmup_kimg=c.warmup_kimg,
                                             grad_clip=c.grad_clip), loss=self.student_loss, needs_data=True)}

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """The paper's EMA: a per-step decay of cfg.ema_decay (0.995) from the first step, no ramp-up."""
        return halflife_from_decay(self.cfg.ema_decay, batch), None

    def student_loss(self, batch: Batch) -> dict[str, Tensor]:
        """The regression loss on the micro-batch's pairs (`Batch.fields` of the `PairsDataset`)."""
        pairs = batch.fields
        pred = common.generate(self.student, pairs["noise"], self.sigma, pairs.get("cond"))
        return {"loss": regression_loss(pred, pairs["target"], self.cfg.loss)}

    @torch.no_grad()
    def heldout_loss(self, net: Denoiser) -> float | None:
        """The loss of `net` on the held-out shard (None when the pairs have none)."""
        held = P.read_heldout(self.pairs.root, self.pairs.m)
        if held is None:
            return None
        z, y, cond = held
        device = next(net.parameters()).device
        mode = net.training
        net.eval()
        total = 0.0
        try:
            for i in range(0, len(z), self.cfg.eval_batch):
                sl = slice(i, i + self.cfg.eval_batch)
                c = None if cond is None else cond[sl].to(device)
                pred = common.generate(net, z[sl].to(device), self.sigma, c)
                total += float(regression_loss(pred, y[sl].to(device), self.cfg.loss)) * len(z[sl])
        finally:
            net.train(mode)
        return total / len(z)

    @torch.no_grad()
    def evaluate(self, ema: dict[str, nn.Module] | None = None, **_) -> dict[str, float]:
        """Evaluate hook: held-out loss of the EMA (else of the student); keeps the best one (as official
        `training.py`)."""
        net = (ema or {}).get("student", self.student)
        value = self.heldout_loss(net)
        if value is None:
            return {}
        if value < float(self.best_loss):
            self.best.load_state_dict(net.state_dict())
            self.best_loss.fill_(value)
        return {"heldout_loss": value, "best_heldout_loss": float(self.best_loss)}

    def ema_targets(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        """The best-by-held-out EMA once evaluated, else the EMA (or the student); one step at self.sigma."""
        if math.isfinite(float(self.best_loss)):
            net = self.best
        else:
            net = (ema or {}).get("student", self.student)
        return net, {"sampler": "onestep", "sigmas": [self.sigma, 0.0]}


# --------------------------------------------------------------------------------------------------
# Students


def make_student(teacher: Denoiser, preset: str = "auto", dropout: float | None = 0.0) -> Denoiser:
    """KD's and PD's --student-preset through the one factory, `common.student_from_teacher`: 'teacher' copies
    the teacher's network (official `models.py: Onestep_Model`) with dropout `dropout` (default 0, the official
    student's; None keeps the teacher's), 'mlp-<preset>' is a fresh Precond(MLP), and 'auto' is the copy when the
    teacher has a network, else 'mlp-toy' (analytic teachers). `KnowledgeDistillation` wraps an eps-prediction
    VP copy into the paper's `PaperStudent`."""
    if preset == "auto" and common.is_weightless(teacher):
        preset = "mlp-toy"
        dist.print0("the teacher is analytic (no network to copy): the student is a fresh MLP (mlp-toy); "
                    "choose another with --student-preset")
    return common.student_from_teacher(teacher, dropout=dropout, preset=preset)


# --------------------------------------------------------------------------------------------------
# Stage 1 and the method: `diffdistill kd-pairs`, `diffdistill distill kd` (SPEC), `diffdistill.distill("kd")`


def default_pairs_dir(run_dir: str | Path) -> Path:
    """RUN-pairs beside the run directory (the loop wants RUN to hold only its own files)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + "-pairs")


def _pairs_device(teacher: Denoiser, device: str | None) -> str:
    """Where the teacher generates its pairs: where its weights are, else `device` (the run's), else the CPU."""
    t = next(itertools.chain(teacher.parameters(), teacher.buffers()), None)
    return str(t.device) if t is not None else device or "cpu"


def add_pairs_arguments(parser) -> None:
    """The options of `diffdistill kd-pairs` (besides --teacher, --device, --seed, --no-progress): the fields of
    `PairsSettings`, --pairs required."""
    from .options import add_config_arguments

    add_config_arguments(parser, PairsSettings, "pairs")
    for action in parser._actions:
        if action.dest == "pairs":
            action.required = True


def _describe_pairs(root, m: dict) -> str:
    r = m["recipe"]
    gib = sum(P.shard_bytes(m, s.get("stored", s["count"])) for s in m["shards"]) / 2**30
    return (f"{root}: {m['n_pairs']} training + {m['heldout']} held-out pairs in {len(m['shards'])} shards "
            f"({gib:.3f} GiB), teacher {m['teacher']}, sampler {r['name']} ({len(r['sigmas']) - 1} steps)")


def run_pairs(args, teacher: Denoiser) -> int:
    """`diffdistill kd-pairs`: make, complete or extend the pairs directory --pairs."""
    settings = config_from_namespace(PairsSettings, args)
    m = kd_pairs.generate_pairs(teacher, settings.pairs, settings.pairs_config(),
                         device=_pairs_device(teacher, getattr(args, "device", None)),
                         progress=not getattr(args, "no_progress", False))
    dist.print0(_describe_pairs(settings.pairs, m))
    return 0


def train_on_pairs(method: KnowledgeDistillation, loop, data=None, evaluate=None) -> dict:
    """`SPEC.run`: one call of the loop on the method's training pairs (`method.pairs`); KD takes no real data, so
    `data` is not used. Returns the loop's result."""
    from ..train.loop import train

    return train(method, loop, method.pairs, evaluate=evaluate)


def create(cfg: KDConfig, teacher: Denoiser, data=None, loop=None) -> KnowledgeDistillation:
    """Stage 1 (the pairs of cfg.pairs made, completed or extended, resumably), then the stage-2 method. Without
    a run (`loop` None) cfg.pairs must be given."""
    cfg = cfg.resolve(teacher, loop)
    if cfg.pairs is None:
        raise UsageError("kd: give the pairs directory (pairs=DIR) when the method is built without a run")
    root = Path(cfg.pairs)
    student = make_student(teacher, cfg.student_preset, dropout=cfg.student_dropout)   # fails early on a bad preset
    m = kd_pairs.generate_pairs(teacher, root, cfg.pairs_config(),
                         device=_pairs_device(teacher, loop.device if loop is not None else None),
                         progress=loop.progress if loop is not None else True)
    method = KnowledgeDistillation(student, root, cfg, manifest=m)
    n_params = sum(p.numel() for p in student.parameters())
    form = ("G(z) = z - F(z, t_max), the paper's" if isinstance(method.student, PaperStudent)
            else "D(sigma z; sigma)")
    training = {k: v for k, v in asdict(cfg).items() if k not in PAIR_FIELDS}
    dist.print0(f"kd: {m['n_pairs']} pairs in {root}; student {n_params:,} parameters, {form}, at sigma "
                f"{method.sigma:g}, dropout {common.dropout_of(student) or 0:g}; {training}")
    return method


# --------------------------------------------------------------------------------------------------
# Published recipes (official utils.py: get_settings; training.py; create_dataset.py)


def _paper_recipe(*, loss: str, lr: float, betas: tuple[float, float], warmup_steps: int, batch: int, epochs: int,
                  ema_decay: float, shard_size: int, heldout: int, sampler: str, steps: int) -> dict:
    """One of get_settings' entries as settings: 1.024M pairs (uint8 targets), `epochs` passes over them, Adam with
    a linear warm-up of `warmup_steps` then a constant LR, the per-step EMA from the first step. The student's
    dropout is KD's default, 0 (the official student has none). Not expressed: the official evaluates the EMA
    once per epoch (LSUN: every 80 shards); `distill` evaluates it 10 times per run."""
    n_pairs = 1_024_000
    return dict(loss=loss, lr=lr, betas=betas, adam_eps=1e-8, warmup_kimg=warmup_steps * batch / 1000, batch=batch,
                total_kimg=epochs * n_pairs / 1000, ema_decay=ema_decay, student_preset="teacher", n_pairs=n_pairs,
                heldout=heldout, shard_size=shard_size, pairs_sampler=sampler, pairs_steps=steps,
                target_dtype="uint8")


_SOURCE = ("official tcl9876/Denoising_Student: utils.py get_settings('{}'), training.py, create_dataset.py; "
           "for its teacher, {}")
RECIPES = {
    "cifar10": Recipe(
        source=_SOURCE.format("cifar10", "DDPM's CIFAR-10 eps model"),
        options=_paper_recipe(loss="l1", lr=2e-4, betas=(0.9, 0.98), warmup_steps=5000, batch=512,
                              epochs=25, ema_decay=0.995, shard_size=102_400, heldout=51_200,
                              sampler="ddim-quad", steps=100)),
    "celeba": Recipe(
        source=_SOURCE.format("celeba", "DDIM's CelebA-64 eps model"),
        options=_paper_recipe(loss="l2", lr=5e-5, betas=(0.9, 0.98), warmup_steps=5000, batch=512,
                              epochs=35, ema_decay=0.995, shard_size=25_600, heldout=10_240,
                              sampler="ddim-quad", steps=100)),
    "lsun_church": Recipe(
        source=_SOURCE.format("lsun_church", "DDPM's LSUN church-256 eps model"),
        options=_paper_recipe(loss="l2", lr=5e-6, betas=(0.98, 0.999), warmup_steps=1000, batch=32,
                              epochs=40, ema_decay=0.9995, shard_size=2560, heldout=2560,
                              sampler="ddim-uniform", steps=50)),
    "lsun_bedroom": Recipe(
        source=_SOURCE.format("lsun_bedroom", "DDPM's LSUN bedroom-256 eps model"),
        options=_paper_recipe(loss="l2", lr=5e-6, betas=(0.98, 0.999), warmup_steps=1000, batch=32,
                              epochs=50, ema_decay=0.9995, shard_size=2560, heldout=2560,
                              sampler="ddim-uniform", steps=50)),
}

SPEC = MethodSpec(name="kd", help="Knowledge distillation (Denoising Student): a one-step student regresses the "
                                  "teacher's ODE samples",
                  config=KDConfig, create=create, title="knowledge distillation", recipes=RECIPES,
                  ema_help=EMA_HELP, best_metric="heldout_loss", run=train_on_pairs)
