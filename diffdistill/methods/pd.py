"""Progressive distillation (Salimans & Ho 2022, arXiv 2202.00512), in EDM sigma space.

Each round halves the number of DDIM steps: the student (a copy of the round's teacher) learns to take in one
step what the teacher takes in two. On a student grid of N steps, with i ~ U{0..N-1}, x_t = x + sigma_t n:
  two teacher DDIM half-steps sigma_t -> sigma_t' -> sigma_t'' (Salimans & Ho 2022, Algorithm 2; DDIM = Euler
  in sigma, Karras et al. 2022, Table 1), the target x~ = (x_t'' - r x_t) / (1 - r), r = sigma_t''/sigma_t
  (Algorithm 2's x~ with alpha = 1, as official consistency_models `cm/karras_diffusion.py: progdist_losses`),
  which makes one student step from x_t land on x_t''; at the final step (sigma_t'' = 0)
  x~ = D_teacher(x_t'), the teacher's midpoint prediction (official `dpm.py: Model.training_losses`; the
  formula gives the same),
  loss = max(SNR_t, 1) * mean (D_student(x_t) - x~)^2 per example ('snr_trunc' = max(x_mse, eps_mse)), then
  the batch mean (official `dpm.py: Model.training_losses`).
Grids: the cosine logSNR schedule t = k/N (official `schedules.py`) for cosine teachers (VP-cosine, or diffusers
squaredcos_cap_v2), else a Karras-spaced grid sigma(u) = (sigma_max^(1/rho) + (1-u)(sigma_min^(1/rho) -
sigma_max^(1/rho)))^rho at u = k/N (as `progdist_losses`); both end in 0 and the student's grid is every other
level of the teacher's, so halving is exact.
The rounds are `run`, the method's driver: one call of the loop per round (a `train.loop.Stage`), each with a
fresh optimiser and its own linear LR decay over the round; the finished student is saved as RUN/round-NNsteps
and becomes the next teacher (its current parameters; no EMA by default, as the official `ema_decay=0`; with
--pd-ema each round has its own EMA, so an exported N-step student holds no weights of earlier rounds). The
student is "same as teacher but with 0 dropout" (official cifar_distill.py). The exported recipe is DDIM (euler)
on the student's grid, clipping x-hat to [-1, 1] for images as the official evaluation does
(`eval_clip_denoised=True`; eps recomputed from the clipped x-hat).
Teachers that predict eps are refused (Salimans & Ho 2022 use x, v or 'both' outputs): x-hat =
(z - sigma eps)/alpha is ill-conditioned at the top levels where a few-step student does most of its work.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import dist
from ..diffusion import param, schedules
from ..diffusion.denoiser import Denoiser, Precond
from ..errors import DiffdistillError, UsageError
from ..io import atomic_write, atomic_write_json
from ..samplers.ode import ddim_step
from . import MethodSpec, common
from .base import Batch, Group, Method, OptimConfig, Recipe
from .kd import make_student
from .kd_pairs import check_deterministic_teacher
from .options import MethodConfig, option

WEIGHTINGS = ("snr_trunc", "snr", "snr+1", "constant")
EMA_HELP = ("EMA half-life of the student in kimg, used only with --pd-ema (default: no EMA, as the paper's "
            "ema_decay=0; with --pd-ema: 500 kimg with EDM's ramp-up, restarted at every round)")


def n_rounds(start_steps: int, end_steps: int) -> int:
    """The halvings from start_steps to end_steps (powers of two, `check_steps`)."""
    return int(math.log2(start_steps // end_steps))


def even_round_kimg(total_kimg: float, start_steps: int, end_steps: int) -> float:
    """Each round's length when a run of `total_kimg` is split evenly over its rounds (the default)."""
    return total_kimg / n_rounds(start_steps, end_steps)


def _official(start: int, batch: int, lr: float) -> dict:
    """The official distillation config: 50k Adam steps per halving (kimg = 50k x batch / 1000), linear LR decay
    to 0 per round, betas (0.9, 0.999), no weight decay, grad clip 1.0, no EMA, dropout 0, snr_trunc, random
    flips, DDIM evaluation with x-hat clipped; down to 1 step."""
    rounds = n_rounds(start, 1)
    round_kimg = 50_000 * batch / 1000
    return dict(start_steps=start, end_steps=1, round_kimg=round_kimg, total_kimg=rounds * round_kimg, batch=batch,
                lr=lr, betas=(0.9, 0.999), grad_clip=1.0, weighting="snr_trunc", clip_denoised=True, xflip=True)


RECIPES = {
    "cifar10": Recipe(
        source="Salimans & Ho 2022 / official diffusion_distillation/config/cifar_distill.py: 8192 -> 1 steps "
               "(13 rounds of 50k steps at batch 128 = 6400 kimg), Adam lr 5e-5 linearly to 0 per round, "
               "betas (0.9, 0.999), grad clip 1, no EMA, dropout 0, snr_trunc, x-hat clipped at evaluation; "
               "the official teacher is a VP-cosine x-prediction network (the grid is then cosine)",
        options=_official(8192, 128, 5e-5)),
    "imagenet64": Recipe(
        source="official diffusion_distillation/config/imagenet64_distill.py: 1024 -> 1 steps (10 rounds of 50k "
               "steps at batch 2048 = 102400 kimg), Adam lr 1e-4 linearly to 0 per round, grad clip 1, no EMA, "
               "dropout 0, snr_trunc, x-hat clipped; the official teacher is a class-conditional VP-cosine "
               "'both'-prediction network",
        options=_official(1024, 2048, 1e-4)),
}


GRIDS = ("auto", "cosine", "karras")


@dataclass
class PDConfig(MethodConfig):
    """Progressive distillation settings; the official CIFAR-10 recipe (`config/cifar_distill.py`) except for the
    step counts and the round length (default: the run's --kimg split evenly over the rounds)."""

    start_steps: int = option(1024, "DDIM steps of the first teacher, a power of two (default %(default)s; paper "
                                    "8192)")
    end_steps: int = option(1, "steps of the final student, a power of two (default %(default)s)")
    round_kimg: float | None = option(None, "training images per round, in thousands (default: --kimg split evenly "
                                            "over the rounds)")
    grid: str = option("auto", "step grid: cosine logSNR (VP-cosine or diffusers squaredcos_cap_v2 teachers) or "
                               "Karras-spaced (default auto)", choices=GRIDS)
    rho: float = option(7.0, "Karras grid exponent", cli=False)
    weighting: str = option("snr_trunc", "loss weighting in x space (default %(default)s = max(SNR, 1))",
                            choices=WEIGHTINGS)
    student_preset: str = option("auto", "auto | teacher (copy of the teacher network) | mlp-tiny | mlp-toy "
                                         "(analytic teachers)")
    student_dropout: float | None = option(0.0, "dropout probability of the student copied from the teacher, or "
                                                "'teacher' to keep the teacher's (default %(default)s: the official "
                                                "student is 'same as teacher but with 0 dropout', cifar_distill.py)",
                                           parse=common.dropout_value, metavar="P|teacher")
    pd_ema: bool = option(False, "export an EMA of the student, restarted every round (paper: no EMA); half-life: "
                                 "--ema")
    lr: float = option(5e-5, "Adam learning rate, decayed linearly to 0 in each round (default %(default)s, paper)")
    betas: tuple[float, float] = option((0.9, 0.999), "Adam betas (default %(default)s, the official)",
                                        metavar=("B1", "B2"))
    grad_clip: float | None = option(1.0, "global gradient-norm clipping, 0 = off (default %(default)s, the "
                                          "official)")
    clip_denoised: bool | None = option(None, "the students' recipe clips x-hat to [-1, 1] at every DDIM step "
                                              "(default: for images, as the official evaluation, "
                                              "eval_clip_denoised=True)")

    def resolve(self, teacher, loop) -> PDConfig:
        """The settings checked, with round_kimg (None: the run's total_kimg split evenly over the rounds; it must
        be given outside a run), clip_denoised (None: for images, i.e. teachers of shape C x H x W) and grad_clip
        (0 = off, kept as None) filled in."""
        check_steps(self.start_steps, self.end_steps)
        if self.grid not in GRIDS:
            raise UsageError(f"--grid {self.grid!r}: expected one of {', '.join(GRIDS)}")
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"--weighting {self.weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
        if not self.lr > 0:         # (NaN too)
            raise UsageError(f"--lr must be positive, got {self.lr:g}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise UsageError(f"--grad-clip must be positive, or 0 for no clipping, got {self.grad_clip:g}")
        dropout = None if self.student_dropout == "teacher" else self.student_dropout
        if dropout is not None and not 0 <= dropout < 1:
            raise UsageError(f"--student-dropout must be a probability in [0, 1) or 'teacher', got {dropout!r}")
        round_kimg = self.round_kimg
        if round_kimg is None:
            if loop is None:
                raise UsageError("pd: give round_kimg (--round-kimg): outside a run there is no run length "
                                 "(--kimg) to split over the rounds")
            if not loop.total_kimg:
                raise UsageError("give --round-kimg or --kimg (split evenly over the rounds)")
            round_kimg = even_round_kimg(loop.total_kimg, self.start_steps, self.end_steps)
        if not round_kimg > 0:
            raise UsageError(f"--round-kimg must be positive, got {round_kimg:g}")
        clip = self.clip_denoised if self.clip_denoised is not None else len(teacher.shape) == 3
        return replace(self, round_kimg=float(round_kimg), grad_clip=self.grad_clip or None, student_dropout=dropout,
                       clip_denoised=bool(clip))


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def check_steps(start: int, end: int) -> None:
    if not is_power_of_two(start) or not is_power_of_two(end):
        raise UsageError(f"--start-steps ({start}) and --end-steps ({end}) must be powers of two")
    if start <= end:
        raise UsageError(f"--start-steps ({start}) must be larger than --end-steps ({end})")


# --------------------------------------------------------------------------------------------------
# Grids


def cosine_range(denoiser: Denoiser) -> tuple[float, float]:
    """The logSNR clipping of a VP-cosine network; alpha_1 = 0 (logsnr_min = -inf) is clipped to -20."""
    pc = denoiser.precond
    lo = pc.logsnr_min if math.isfinite(pc.logsnr_min) else -20.0
    hi = pc.logsnr_max if math.isfinite(pc.logsnr_max) else 20.0
    return lo, hi


def cosine_teacher_range(teacher: Denoiser) -> tuple[float, float] | None:
    """The logSNR range of a cosine-schedule teacher, or None for other teachers.

    A VP-cosine `Precond` gives its clipping (`cosine_range`). A discrete VP teacher (diffusers / DDPM) whose
    alphas_cumprod equal the iDDPM cosine schedule ('squaredcos_cap_v2', compared with the closed form) gives the
    logSNR of its table's ends, log(abar / (1 - abar)) = -2 log sigma at timesteps T-1 and 0: the cosine grid then
    runs uniformly over its own timesteps (both are uniform in the angle atan(sigma), up to the cap on beta).
    """
    from ..teachers.discrete import DiscreteVPDenoiser

    if isinstance(teacher, Precond) and teacher.precond.kind == "cosine":
        return cosine_range(teacher)
    if isinstance(teacher, DiscreteVPDenoiser):
        abar = teacher.alphas_cumprod.double().cpu()
        cos = schedules.ddpm_alphas_cumprod(abar.numel(), kind="squaredcos_cap_v2")
        if torch.allclose(abar, cos, rtol=1e-4, atol=0):
            sig = torch.as_tensor(teacher.discrete_sigmas, dtype=torch.float64)
            return -2 * math.log(float(sig[-1])), -2 * math.log(float(sig[0]))
    return None


def pd_sigmas(n: int, grid: str, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
              logsnr_range: tuple[float, float] = (-20.0, 20.0)) -> Tensor:
    """An n-step grid (float64, descending, ending in 0) at times u = 1, (n-1)/n, ..., 1/n, then 0.

    cosine: sigma(u) = exp(-lambda(u)/2) of the cosine logSNR schedule (Salimans & Ho 2022, official
    `schedules.py`; here `schedules.cosine_sigmas`);
    karras: sigma(u) = Karras et al.'s interpolation between sigma_max (u=1) and sigma_min (u -> 0) (as official
    consistency_models `progdist_losses`).
    """
    if grid == "cosine":
        return schedules.cosine_sigmas(n, *logsnr_range)
    if grid == "karras":
        u = torch.arange(n, 0, -1, dtype=torch.float64) / n
        levels = schedules.karras_index_sigma(1 - u, 2, sigma_min, sigma_max, rho)
        return torch.cat([levels, levels.new_zeros(1)])
    raise DiffdistillError(f"unknown PD grid {grid!r} (auto, cosine, karras)")


def check_not_eps(teacher: Denoiser) -> None:
    """Refuse eps-predicting teachers (Salimans & Ho 2022 distil x-, v- and 'both'-prediction models)."""
    eps = common.eps_prediction(teacher)
    if eps is not None:
        what = eps[1]
        raise DiffdistillError(f"progressive distillation refuses this teacher, {what}: its x-hat = (z - sigma "
                               "eps)/alpha multiplies eps errors by sigma/alpha (up to e^10 at alpha_1 ~ 0), at "
                               "the top levels where a 1-4 step student does most of its work, so the paper "
                               "uses x, v or 'both' outputs (Salimans & Ho 2022, Sec. 4); use such a teacher (or an "
                               "EDM-preconditioned one), or distil this one with kd, cd, di, gdd, dmd2 or sid")


# --------------------------------------------------------------------------------------------------
# The target (Salimans & Ho 2022, Algorithm 2; official `dpm.py`, consistency_models `progdist_losses`)


@torch.no_grad()
def pd_target(teacher: Denoiser, x_t: Tensor, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor,
              cond: Tensor | None = None) -> Tensor:
    """x~: the x-prediction that makes one DDIM step sigma -> sigma_next land on the teacher's two half-steps.

    Teacher outputs are not clipped (official `dpm.py`: clip_x=False). The combination is formed in float64
    (1 - r is O(1/N)).
    """
    d1 = teacher(x_t, sigma, cond).double()
    x_mid = ddim_step(x_t.double(), d1, sigma.double(), sigma_mid.double())
    d2 = teacher(x_mid.to(x_t.dtype), sigma_mid, cond).double()
    x_next = ddim_step(x_mid, d2, sigma_mid.double(), sigma_next.double())
    r = param.append_dims(sigma_next.double() / sigma.double(), x_next)
    x_tilde = (x_next - r * x_t.double()) / (1 - r)
    final = (sigma_next == 0).reshape(-1, *([1] * (x_next.ndim - 1)))
    return torch.where(final, d2, x_tilde).to(x_t.dtype)    # final step: the teacher's midpoint x_hat


# --------------------------------------------------------------------------------------------------
# The method


class ProgressiveDistillation(Method):
    """One round of halving at a time (`start_round`); one group, 'student'. `run` trains the rounds."""

    name = "pd"

    def __init__(self, teacher: Denoiser, cfg: PDConfig | None = None, student: Denoiser | None = None):
        super().__init__()
        self.cfg = cfg = (cfg or PDConfig()).resolve(teacher, None)
        check_deterministic_teacher(teacher)
        check_not_eps(teacher)
        cosine = cosine_teacher_range(teacher)
        grid = cfg.grid if cfg.grid != "auto" else ("cosine" if cosine else "karras")
        if grid == "cosine" and not cosine:
            raise DiffdistillError("grid 'cosine' needs a cosine-schedule teacher (a Precond of kind 'cosine', or "
                                   "a diffusers/DDPM teacher with beta_schedule 'squaredcos_cap_v2')")
        self.grid = grid
        self.grid_kw = dict(sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max, rho=cfg.rho,
                            logsnr_range=cosine or (-20.0, 20.0))
        self.teacher = teacher.eval().requires_grad_(False)           # round 0's teacher
        # The student's dropout is PD's decision (cfg.student_dropout), made here for given students too.
        student = student if student is not None else make_student(teacher, cfg.student_preset, dropout=None)
        common.set_dropout(student, cfg.student_dropout)
        self.student = student.train().requires_grad_(True)
        self.clip_denoised = cfg.clip_denoised
        # Later rounds' teacher: the previous student (same architecture, so checkpoints keep their keys).
        self.prev = copy.deepcopy(self.student).eval().requires_grad_(False)
        self.n_rounds = n_rounds(cfg.start_steps, cfg.end_steps)
        self.round = 0
        self.register_buffer("loss_sum", torch.zeros(2, dtype=torch.float64))   # this round's: sum of losses, count

    # -- rounds --------------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        self.prev.eval()
        return self

    def teacher_steps(self, r: int | None = None) -> int:
        return self.cfg.start_steps >> (self.round if r is None else r)

    def student_steps(self, r: int | None = None) -> int:
        return self.teacher_steps(r) // 2

    def round_teacher(self) -> Denoiser:
        return self.teacher if self.round == 0 else self.prev

    def grids(self, r: int | None = None) -> tuple[Tensor, Tensor]:
        """(teacher grid with 2N steps, student grid with N steps = every other level)."""
        t = pd_sigmas(self.teacher_steps(r), self.grid, **self.grid_kw)
        return t, t[::2]

    def start_round(self, r: int) -> None:
        """Make this the method of round r (0-based). From round 1 on, the student as it is now (the previous
        round's, its current parameters: the official run has no EMA) becomes the teacher, and the student
        continues from those same parameters, i.e. starts as a copy of its new teacher."""
        if r > 0:
            self.prev.load_state_dict(self.student.state_dict())
        self.round = r
        self.loss_sum.zero_()

    def round_starts(self, batch: int) -> list[int]:
        """The first step of rounds 1..n_rounds (the last: where the last round's nominal length ends) at `batch`
        images per step: the first step whose image count reaches r * round_kimg."""
        starts = []
        for r in range(1, self.n_rounds + 1):
            need = r * self.cfg.round_kimg * 1000
            s = int(need // batch)                      # float floor division and int-float comparison are exact
            starts.append(s + (s * batch < need))
        return starts

    # -- loss ----------------------------------------------------------------------------------------
    def groups(self) -> dict[str, Group]:
        c = self.cfg
        return {"student": Group(list(self.student.parameters()),
                                 OptimConfig(lr=c.lr, betas=c.betas, decay="linear", decay_kimg=c.round_kimg,
                                             grad_clip=c.grad_clip),
                                 loss=self.student_loss, needs_data=True)}

    def student_loss(self, batch: Batch) -> dict[str, Tensor]:
        if batch.x is None:
            raise DiffdistillError("progressive distillation needs real data (--data)")
        x = batch.x.to(batch.device)
        t_grid, _ = self.grids()
        t_grid = t_grid.to(x.device)
        n_student = self.student_steps()
        # i ~ U{0..N-1} on the student's grid only (Salimans & Ho 2022, Algorithm 2); k = N-1-i indexes the
        # descending grid.
        k = torch.randint(n_student, (x.shape[0],), device=x.device)
        sigma, sigma_mid, sigma_next = (t_grid[2 * k + j].to(x.dtype) for j in range(3))
        cond = batch.cond.to(x.device) if batch.cond is not None and self.student.label_dim else None
        x_t = x + param.append_dims(sigma, x) * torch.randn_like(x)
        target = pd_target(self.round_teacher(), x_t, sigma, sigma_mid, sigma_next, cond)
        pred = self.student(x_t, sigma, cond)
        x_mse = (pred.float() - target.float()).flatten(1).pow(2).mean(1)
        loss = (param.snr_weight(sigma, self.cfg.weighting).float() * x_mse).mean()
        self.loss_sum += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64, device=self.loss_sum.device)
        return {"loss": loss, "x_mse": x_mse.mean().detach()}

    # -- export and state ----------------------------------------------------------------------------
    def ema_targets(self) -> dict[str, nn.Module]:
        return {"student": self.student} if self.cfg.pd_ema else {}

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        """The current round's student and its own DDIM (= Euler) grid."""
        net = (ema or {}).get("student", self.student) if self.cfg.pd_ema else self.student
        recipe = {"sampler": "euler", "sigmas": self.grids()[1].tolist()}
        if self.clip_denoised:
            recipe["clip_denoised"] = True        # the official evaluation (eval_clip_denoised=True)
        return net, recipe


def run(method: ProgressiveDistillation, loop, data, evaluate=None) -> dict:
    """PD's driver (`MethodSpec.run`): the rounds, one call of the loop each (`train.loop.Stage`) on the method set
    to that round (`start_round`); returns the last call's result. Round r runs from the first step whose image
    count reaches r * round_kimg to that of the next round, the last one to the run's end (past its nominal end at
    LR 0: the decay ends with the round's length); rounds the run does not reach are not run. A finished round's
    student is RUN/round-NNsteps, the run's last one RUN/model. RUN/rounds.json and rounds.md (rank 0) get a row
    per round when it ends; those finished by an earlier session of the run (a rerun after a kill) are kept."""
    from ..train.loop import Stage, run_steps, train

    total, starts = run_steps(loop), [0, *method.round_starts(loop.batch)]
    run_dir, rows, stage = Path(loop.out), [], None
    for r in range(method.n_rounds):
        if r > 0 and starts[r] >= total:
            break
        end = starts[r + 1] if r < method.n_rounds - 1 else total
        method.start_round(r)
        snapshot = f"round-{method.student_steps():02d}steps" if starts[r + 1] <= total else None
        dist.print0(f"pd: round {r + 1}/{method.n_rounds}: {method.teacher_steps()} -> {method.student_steps()} "
                    "steps")
        stage = Stage(end=end, export=snapshot, after=stage)
        result = train(method, loop, data, evaluate, stage=stage)
        if result["interrupted"]:
            break
        if stage.skipped:       # finished by an earlier session: its row as that session wrote it
            rows += [row for row in _read_rows(run_dir) if row.get("round") == r + 1][:1]
            continue
        loss_sum, n = method.loss_sum.tolist()
        rows.append(dict(round=r + 1, teacher_steps=method.teacher_steps(), student_steps=method.student_steps(),
                         start_kimg=starts[r] * loop.batch / 1000, end_kimg=result["nimg"] / 1000,
                         mean_loss=loss_sum / n if n else None, snapshot=snapshot or "model"))
        if dist.is_main():
            write_rounds(run_dir, rows)
    return result


def _read_rows(run_dir: Path) -> list[dict]:
    try:
        rows = json.loads((run_dir / "rounds.json").read_text())
    except (OSError, ValueError):
        return []
    return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []


def write_rounds(run_dir: Path, rows: list[dict]) -> None:
    """RUN/rounds.json and RUN/rounds.md: a row per round."""
    atomic_write_json(run_dir / "rounds.json", rows)
    lines = ["| round | teacher steps | student steps | kimg | mean loss | snapshot |", "|---|---|---|---|---|---|"]
    for r in rows:
        loss = "-" if r.get("mean_loss") is None else f"{r['mean_loss']:.4g}"
        lines.append(f"| {r['round']} | {r['teacher_steps']} | {r['student_steps']} | "
                     f"{r['start_kimg']:g}-{r['end_kimg']:g} | {loss} | {r['snapshot']} |")
    atomic_write(run_dir / "rounds.md", lambda p: p.write_text("\n".join(lines) + "\n"))


def create(cfg: PDConfig, teacher: Denoiser, data=None, loop=None) -> ProgressiveDistillation:
    """The method of a run: real data required."""
    if data is None:
        raise UsageError("progressive distillation needs real training data: give --data "
                         "(it is not data-free)")
    if tuple(data.shape) != tuple(teacher.shape):
        raise DiffdistillError(f"the data ({getattr(data, 'name', 'data')}) has shape {tuple(data.shape)}, "
                               f"the teacher {tuple(teacher.shape)}")
    method = ProgressiveDistillation(teacher, cfg)
    cfg, n_rounds = method.cfg, method.n_rounds
    total = loop.total_kimg if loop is not None else None
    if total and total < n_rounds * cfg.round_kimg - 1e-9:
        dist.print0(f"pd: warning: --kimg {total:g} covers only part of the {n_rounds} rounds of "
                    f"{cfg.round_kimg:g} kimg")
    dist.print0(f"pd: {n_rounds} rounds {cfg.start_steps} -> {cfg.end_steps} steps, {cfg.round_kimg:g} kimg "
                f"each, grid {method.grid}; {asdict(cfg)}")
    return method


SPEC = MethodSpec(name="pd", help="Progressive distillation: halve the teacher's DDIM steps round by round (needs "
                                  "real data)",
                  config=PDConfig, create=create, needs_data=True, title="progressive distillation",
                  recipes=RECIPES, ema_help=EMA_HELP, run=run)
