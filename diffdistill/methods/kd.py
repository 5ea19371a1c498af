"""Knowledge distillation, "Denoising Student" (Luhman & Luhman 2021; algorithms.md §2).

Stage 1 (`diffdistill kd-pairs`, or the start of `distill kd`): the teacher's deterministic sampler maps unit
noise x_T to samples y; the pairs are written in shards (`diffdistill.data.pairs`), resumably.
Stage 2: a one-step student, initialised from the teacher's network (without dropout: the official student
has none), regresses y from x_T in image space. The official student (`models.py: Onestep_Model`) is
G(z) = z - F(z, 999): the teacher's eps-network fed the unit noise z itself at the last timestep, its output
subtracted from z (§2.3). For eps-prediction VP students (DDPM/diffusers eps teachers, EDM's VPPrecond, cosine
eps) diffdistill trains exactly that G (`PaperStudent`): a denoiser evaluated as D(sigma_max z; sigma_max) would
be sigma_max (z' - F(z', 999)), i.e. G with a gain of sigma_max (~157 for DDPM), under which the paper's Adam
learning rate moves the output ~157x further per step. Students of other parameterisations (EDM, v or x
prediction, analytic teachers' MLPs), whose output already has a gain of about 1, run as D(sigma z; sigma) at the
fixed level sigma = the student's sigma_max. Loss: L1 (CIFAR-10) or L2, summed over pixels and averaged over the
batch (§2.4). The loop keeps an EMA (the paper's: 0.995 per step, no ramp-up); the EMA with the best held-out
loss is what `export` returns (§2.4's model selection), found through the loop's evaluate hook (`kd.evaluate`).
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..data import pairs as P
from ..diffusion import param
from ..diffusion.denoiser import Denoiser, Precond, PrecondConfig
from ..errors import DiffdistillError
from ..io import build_denoiser, register_builder
from ..train import dist
from ..train.ema import halflife_from_decay
from . import common
from .base import Batch, Group, Method, OptimConfig, Recipe

HELP = "Knowledge distillation (Denoising Student): a one-step student regresses the teacher's ODE samples"
NEEDS_DATA = False
BEST_METRIC = "heldout_loss"   # for the CLI: train(..., evaluate=kd.evaluate) with best_metric=BEST_METRIC
EMA_HELP = ("EMA half-life of the student in kimg, with EDM's ramp-up 0.05 (default: the paper's per-step decay "
            "--ema-decay 0.995 with no ramp-up, a half-life of B ln(0.5)/ln(0.995)/1000 kimg at batch B: 70.8 kimg "
            "at 512)")
DROPOUT_HELP = "KD: 0, as the official student (models.py: Onestep_Model) has no dropout"


@dataclass
class KDConfig:
    """Student training settings; defaults follow the CIFAR-10 recipe of §2.4 (official `get_settings`)."""

    loss: str = "l1"                    # l1 | l2, summed over pixels, averaged over the batch (CIFAR-10: l1)
    lr: float = 2e-4                    # Adam learning rate (CelebA 5e-5, LSUN 5e-6)
    betas: tuple[float, float] = (0.9, 0.98)  # Adam betas (LSUN 0.98, 0.999)
    adam_eps: float = 1e-8              # Adam epsilon (official 1e-8; Keras adds it to sqrt(v) before the bias
    #                                     correction, torch after: the two agree once 1 - beta2^t ~ 1)
    warmup_kimg: float = 2560.0         # linear LR warm-up (paper: 5000 steps of 512 images), then constant
    grad_clip: float | None = None      # global-norm clipping (the paper has none)
    sigma: float | None = None          # the fixed level the student runs at (None: the student's sigma_max)
    ema_decay: float = 0.995            # per-step EMA decay when the loop is given no --ema (tfa MovingAverage,
    #                                     no ramp-up; LSUN 0.9995)
    seed: int = 0                       # order in which the training pairs are visited
    eval_batch: int = 512               # batch size of the held-out evaluation


def is_vp_eps(net: Denoiser) -> bool:
    """True for eps-prediction VP networks, whose denoiser output has a gain of sigma over the eps head:
    discrete DDPM/diffusers teachers with prediction 'epsilon', EDM's VPPrecond, cosine-schedule eps."""
    eps = common.eps_prediction(net, through_wrappers=False)
    return eps is not None and eps[0] == "vp"


def paper_output(net: Denoiser, u: Tensor, level: float, cond: Tensor | None = None) -> Tensor:
    """Denoising Student's G(u) = u - eps(u, t(level)) for an eps-prediction VP network (§2.3, `Onestep_Model`).

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


@register_builder("kd-onestep")
def _build_paper_student(config: dict) -> PaperStudent:
    if "denoiser" not in config or "level" not in config:
        raise DiffdistillError("a 'kd-onestep' denoiser config needs 'denoiser' and 'level'")
    return PaperStudent(build_denoiser(config["denoiser"]), float(config["level"]))


def predict(student: Denoiser, z: Tensor, sigma: float, cond: Tensor | None = None) -> Tensor:
    """The one-step student from unit noise z: D(sigma z; sigma), `sample_onestep`'s map (a `PaperStudent`: G(z))."""
    return student(sigma * z, sigma, cond)


def regression_loss(pred: Tensor, target: Tensor, kind: str) -> Tensor:
    """Per-sample sum over pixels of |.| (l1) or (.)^2 (l2), averaged over the batch (§2.4)."""
    diff = (pred.float() - target.float()).flatten(1)
    per_sample = diff.abs().sum(1) if kind == "l1" else diff.pow(2).sum(1)
    return per_sample.mean()


class KnowledgeDistillation(Method):
    """Denoising Student on the shared loop: one group, 'student', fed from a pairs directory. An eps-prediction
    VP student is trained as the paper's G (wrapped in a `PaperStudent` at level cfg.sigma or its sigma_max)."""

    name = "kd"

    def __init__(self, student: Denoiser, pairs_root: str | Path, cfg: KDConfig | None = None,
                 manifest: dict | None = None):
        super().__init__()
        self.cfg = cfg = cfg or KDConfig()
        if cfg.loss not in ("l1", "l2"):
            raise DiffdistillError(f"unknown KD loss {cfg.loss!r} (l1, l2)")
        if not 0 <= cfg.ema_decay < 1:
            raise DiffdistillError(f"the EMA decay must lie in [0, 1), got {cfg.ema_decay}")
        if isinstance(student, PaperStudent):
            self.sigma = student.level
        else:
            self.sigma = float(cfg.sigma if cfg.sigma is not None else student.sigma_max)
            if is_vp_eps(student):       # train the paper's G(z) = z - F(z, t_max), not sigma_max times it
                student = PaperStudent(student, self.sigma)
        self.student = student.train().requires_grad_(True)
        self.pairs = P.PairStream(pairs_root, manifest or P.verify_pairs(pairs_root), seed=cfg.seed)
        shape = tuple(self.pairs.m["shape"])
        if shape != tuple(student.shape):
            raise DiffdistillError(f"{pairs_root}: pairs of shape {shape} do not fit a student of shape "
                                   f"{tuple(student.shape)}")
        # The EMA with the best held-out loss so far (a frozen copy, so checkpoints carry it).
        self.best = copy.deepcopy(student).eval().requires_grad_(False)
        self.register_buffer("best_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.cursor = 0                 # position in the pair stream (global, across ranks)

    def train(self, mode: bool = True):
        super().train(mode)
        self.best.eval()
        return self

    def groups(self) -> dict[str, Group]:
        c = self.cfg
        return {"student": Group(list(self.student.parameters()),
                                 OptimConfig(lr=c.lr, betas=c.betas, eps=c.adam_eps, warmup_kimg=c.warmup_kimg,
                                             grad_clip=c.grad_clip))}

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """The paper's EMA: a per-step decay of cfg.ema_decay (0.995) from the first step, no ramp-up."""
        return halflife_from_decay(self.cfg.ema_decay, batch), None

    def loss(self, group: str, batch: Batch) -> dict[str, Tensor]:
        if group != "student":
            raise KeyError(f"unknown group {group!r}")
        n, rank, world = batch.size, dist.rank(), dist.world_size()
        z, y, cond = self.pairs.rows(self.cursor + rank * n, n)   # rank r reads its own slice of the stream
        self.cursor += world * n
        cond = None if cond is None else cond.to(batch.device)
        pred = predict(self.student, z.to(batch.device), self.sigma, cond)
        return {"loss": regression_loss(pred, y.to(batch.device), self.cfg.loss)}

    @torch.no_grad()
    def heldout_loss(self, net: Denoiser) -> float | None:
        """The loss of `net` on the held-out shard (None when the pairs have none)."""
        held = self.pairs.heldout()
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
                pred = predict(net, z[sl].to(device), self.sigma, c)
                total += float(regression_loss(pred, y[sl].to(device), self.cfg.loss)) * len(z[sl])
        finally:
            net.train(mode)
        return total / len(z)

    @torch.no_grad()
    def evaluate(self, ema: dict[str, nn.Module] | None = None, **_) -> dict[str, float]:
        """Evaluate hook: held-out loss of the EMA (else of the student); keeps the best one (§2.4)."""
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

    def extra_state(self) -> dict:
        return {"cursor": self.cursor}

    def load_extra_state(self, state: dict) -> None:
        self.cursor = int(state.get("cursor", 0))


def evaluate(method: KnowledgeDistillation, ema: dict[str, nn.Module] | None, nimg: int) -> dict[str, float]:
    """The loop's evaluate hook (`train(..., evaluate=kd.evaluate)`, with best_metric='heldout_loss')."""
    return method.evaluate(ema)


# --------------------------------------------------------------------------------------------------
# Students


def mlp_student(teacher: Denoiser, preset: str) -> Denoiser:
    """A fresh EDM-preconditioned MLP of the teacher's (flat) shape (analytic teachers have no network)."""
    from ..networks.mlp import mlp_preset

    if len(teacher.shape) != 1:
        raise DiffdistillError(f"an MLP student needs flat data (shape (D,)), not {teacher.shape}")
    net = mlp_preset(preset, int(teacher.shape[0]), teacher.label_dim)
    cfg = PrecondConfig(kind="edm", sigma_data=teacher.sigma_data, sigma_min=teacher.sigma_min,
                        sigma_max=teacher.sigma_max)
    return Precond(net, teacher.shape, teacher.label_dim, cfg).train()


def make_student(teacher: Denoiser, preset: str = "auto", dropout: float | None = 0.0) -> Denoiser:
    """'teacher': a trainable deep copy of the teacher's network (§2.3) with dropout `dropout` (default 0, the
    official student's; None keeps the teacher's); 'mlp-<preset>': a fresh Precond(MLP); 'auto': the copy when
    the teacher has a network, else 'mlp-toy' (analytic teachers). `KnowledgeDistillation` wraps an eps-prediction
    VP copy into the paper's `PaperStudent`."""
    has_net = not common.is_weightless(teacher)
    if preset == "auto":
        preset = "teacher" if has_net else "mlp-toy"
        if not has_net:
            dist.print0("the teacher is analytic (no network to copy): the student is a fresh MLP (mlp-toy); "
                        "choose another with --student-preset")
    if preset == "teacher":
        if not has_net:
            raise DiffdistillError("the teacher is analytic and has no network to initialise the student "
                                   "from; use --student-preset mlp-toy (or mlp-tiny)")
        return common.copy_denoiser(teacher, dropout=dropout)
    if preset.startswith("mlp-"):
        try:
            return mlp_student(teacher, preset[4:])
        except ValueError as e:
            raise DiffdistillError(str(e)) from None
    raise DiffdistillError(f"unknown student preset {preset!r} (auto, teacher, mlp-tiny, mlp-toy)")


# --------------------------------------------------------------------------------------------------
# CLI hooks: `diffdistill distill kd` (cli/distill.py) and `diffdistill kd-pairs`


def _add_pair_options(g, required: bool) -> None:
    from ..cli.common import MAX_BATCH, count_value, seed_value

    d = P.PairsConfig()
    existing = "as the existing --pairs directory, else"
    g.add_argument("--pairs", required=required, metavar="DIR",
                   help="pairs directory" + ("" if required else " (default: RUN-pairs, beside the run)"))
    g.add_argument("--n-pairs", type=count_value(1, 2**40), default=None,
                   help=f"training pairs (default: all those of an existing --pairs directory, else {d.n_pairs}); "
                        "fewer than the directory holds uses its first N, more extends it")
    g.add_argument("--heldout", type=count_value(0, 2**40), default=None,
                   help=f"held-out pairs (default: {existing} {d.heldout}); fewer uses the first, more extends")
    g.add_argument("--shard-size", type=count_value(1, 2**32), default=None,
                   help=f"pairs per shard of a new directory (default {d.shard_size}; an existing one keeps its own)")
    g.add_argument("--pairs-sampler", default=None,
                   choices=["auto", "ddim-quad", "ddim-uniform", "heun", "euler"],
                   help="teacher sampler: ddim-quad (DDPM teachers: 100 quadratic steps from index 800), "
                        "ddim-uniform (50 uniform), heun (EDM, 18 steps = 35 NFE), euler; auto: ddim-quad "
                        f"for discrete teachers, else heun (default: {existing} auto)")
    g.add_argument("--pairs-steps", type=count_value(0, 100_000), default=None,
                   help=f"sampler steps (0: the sampler's default; default: {existing} 0)")
    g.add_argument("--target-dtype", default=None, choices=["auto", "float16", "uint8"],
                   help="target storage: uint8 is the paper's (clipped to [-1,1], truncated); auto: uint8 "
                        f"for images, float16 otherwise (default: {existing} auto)")
    g.add_argument("--gen-batch", type=count_value(1, MAX_BATCH), default=d.batch,
                   help="generation batch; does not change the pairs (default %(default)s)")
    g.add_argument("--pairs-seed", type=seed_value, default=None,
                   help=f"seed of the noise (default: {existing} {d.seed})")


def _pairs_config(args) -> P.PairsConfig:
    """The pair options given (None: as an existing directory, else the default)."""
    return P.PairsConfig(n_pairs=args.n_pairs, heldout=args.heldout, shard_size=args.shard_size,
                         sampler=args.pairs_sampler, steps=args.pairs_steps, target_dtype=args.target_dtype,
                         batch=args.gen_batch, seed=args.pairs_seed)


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `diffdistill kd-pairs` (besides --teacher and --device)."""
    _add_pair_options(parser.add_argument_group("pairs"), required=True)


def _describe_pairs(root, m: dict) -> str:
    r = m["recipe"]
    gib = sum(P.shard_bytes(m, s.get("stored", s["count"])) for s in m["shards"]) / 2**30
    return (f"{root}: {m['n_pairs']} training + {m['heldout']} held-out pairs in {len(m['shards'])} shards "
            f"({gib:.3f} GiB), teacher {m['teacher']}, sampler {r['name']} ({len(r['sigmas']) - 1} steps)")


def run_pairs(args: argparse.Namespace, teacher: Denoiser) -> int:
    """`diffdistill kd-pairs`: make, complete or extend a pairs directory."""
    device = getattr(args, "device", None) or "cpu"
    m = P.generate_pairs(teacher, args.pairs, _pairs_config(args), device=device,
                         progress=not getattr(args, "no_progress", False))
    dist.print0(_describe_pairs(args.pairs, m))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = KDConfig()
    g = parser.add_argument_group("knowledge distillation")
    g.add_argument("--loss", choices=["l1", "l2"], default=d.loss,
                   help="regression loss (default %(default)s)")
    g.add_argument("--student-preset", default="auto",
                   help="auto | teacher (copy of the teacher network, the paper) | mlp-tiny | mlp-toy "
                        "(fresh MLP for analytic teachers); default auto: teacher when it has a network")
    g.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default %(default)s, CIFAR-10)")
    g.add_argument("--betas", type=float, nargs=2, default=d.betas, metavar=("B1", "B2"),
                   help="Adam betas (default %(default)s, CIFAR-10 and CelebA; LSUN 0.98 0.999)")
    g.add_argument("--adam-eps", type=float, default=d.adam_eps, help="Adam epsilon (default %(default)s)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="per-step EMA decay used when --ema is not given, no ramp-up (default %(default)s, "
                        "CIFAR-10 and CelebA; LSUN 0.9995)")
    g.add_argument("--warmup-kimg", type=float, default=None,
                   help=f"LR warm-up (default: 10%% of --kimg, at most the paper's {d.warmup_kimg:g} = 5000 steps "
                        "of 512, which is 10%% of its 25.6 Mimg run)")
    g.add_argument("--student-sigma", type=float, default=None,
                   help="fixed level of the one-step student (default: its sigma_max)")
    _add_pair_options(parser.add_argument_group("pairs (stage 1)"), required=False)


def default_pairs_dir(run_dir: str | Path) -> Path:
    """RUN-pairs beside the run directory (the loop wants RUN to hold only its own files)."""
    run_dir = Path(run_dir)
    return run_dir.with_name(run_dir.name + "-pairs")


def build(args: argparse.Namespace, teacher: Denoiser, data=None) -> KnowledgeDistillation:
    """Stage 1 (pairs, resumable), then the stage-2 method."""
    root = Path(args.pairs) if args.pairs else default_pairs_dir(args.out)
    device = getattr(args, "device", None) or "cpu"
    d = KDConfig()
    student = make_student(teacher, args.student_preset,                  # fails early on a bad preset
                           dropout=common.resolve_dropout(args, 0.0))
    warmup = args.warmup_kimg
    if warmup is None:  # the paper's proportion (10% of the run), capped at its absolute length
        warmup = min(d.warmup_kimg, 0.1 * (getattr(args, "kimg", None) or d.warmup_kimg * 10))
    cfg = KDConfig(loss=args.loss, lr=getattr(args, "lr", None) or d.lr,
                   betas=tuple(getattr(args, "betas", None) or d.betas),
                   adam_eps=getattr(args, "adam_eps", d.adam_eps), warmup_kimg=warmup, sigma=args.student_sigma,
                   ema_decay=getattr(args, "ema_decay", d.ema_decay), seed=getattr(args, "seed", 0) or 0)
    if not 0 <= cfg.ema_decay < 1:
        raise DiffdistillError(f"--ema-decay must lie in [0, 1), got {cfg.ema_decay}")
    m = P.generate_pairs(teacher, root, _pairs_config(args), device=device,
                         progress=not getattr(args, "no_progress", False))
    method = KnowledgeDistillation(student, root, cfg, manifest=m)
    n_params = sum(p.numel() for p in student.parameters())
    form = ("G(z) = z - F(z, t_max), the paper's" if isinstance(method.student, PaperStudent)
            else "D(sigma z; sigma)")
    dist.print0(f"kd: {m['n_pairs']} pairs in {root}; student {n_params:,} parameters, {form}, at sigma "
                f"{method.sigma:g}, dropout {common.dropout_of(student) or 0:g}; {asdict(cfg)}")
    return method


# --------------------------------------------------------------------------------------------------
# Published recipes (official utils.py: get_settings; training.py; create_dataset.py)


def _paper_recipe(*, loss: str, lr: str, betas: tuple[str, str], warmup_steps: int, batch: int, epochs: int,
                  ema_decay: str, shard_size: int, heldout: int, sampler: str, steps: int) -> tuple[str, ...]:
    """One of get_settings' entries as options: 1.024M pairs (uint8 targets), `epochs` passes over them, Adam with
    a linear warm-up of `warmup_steps` then a constant LR, the per-step EMA from the first step. The student's
    dropout is KD's default, 0 (the official student has none). Not expressed: the official evaluates the EMA
    once per epoch (LSUN: every 80 shards); `distill` evaluates it 10 times per run."""
    n_pairs = 1_024_000
    return ("--loss", loss, "--lr", lr, "--betas", *betas, "--adam-eps", "1e-8",
            "--warmup-kimg", f"{warmup_steps * batch / 1000:g}", "--batch", str(batch),
            "--kimg", f"{epochs * n_pairs / 1000:g}", "--ema-decay", ema_decay, "--student-preset", "teacher",
            "--n-pairs", str(n_pairs), "--heldout", str(heldout),
            "--shard-size", str(shard_size), "--pairs-sampler", sampler, "--pairs-steps", str(steps),
            "--target-dtype", "uint8")


_SOURCE = ("official tcl9876/Denoising_Student: utils.py get_settings('{}'), training.py, create_dataset.py; "
           "for its teacher, {}")
RECIPES = {
    "cifar10": Recipe(
        source=_SOURCE.format("cifar10", "DDPM's CIFAR-10 eps model"),
        options=_paper_recipe(loss="l1", lr="2e-4", betas=("0.9", "0.98"), warmup_steps=5000, batch=512,
                              epochs=25, ema_decay="0.995", shard_size=102_400, heldout=51_200,
                              sampler="ddim-quad", steps=100)),
    "celeba": Recipe(
        source=_SOURCE.format("celeba", "DDIM's CelebA-64 eps model"),
        options=_paper_recipe(loss="l2", lr="5e-5", betas=("0.9", "0.98"), warmup_steps=5000, batch=512,
                              epochs=35, ema_decay="0.995", shard_size=25_600, heldout=10_240,
                              sampler="ddim-quad", steps=100)),
    "lsun_church": Recipe(
        source=_SOURCE.format("lsun_church", "DDPM's LSUN church-256 eps model"),
        options=_paper_recipe(loss="l2", lr="5e-6", betas=("0.98", "0.999"), warmup_steps=1000, batch=32,
                              epochs=40, ema_decay="0.9995", shard_size=2560, heldout=2560,
                              sampler="ddim-uniform", steps=50)),
    "lsun_bedroom": Recipe(
        source=_SOURCE.format("lsun_bedroom", "DDPM's LSUN bedroom-256 eps model"),
        options=_paper_recipe(loss="l2", lr="5e-6", betas=("0.98", "0.999"), warmup_steps=1000, batch=32,
                              epochs=50, ema_decay="0.9995", shard_size=2560, heldout=2560,
                              sampler="ddim-uniform", steps=50)),
}
