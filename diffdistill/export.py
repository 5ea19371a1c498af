"""Students in other libraries' formats: `export_diffusers` writes a diffusers pipeline folder that diffusers itself
loads (`DiffusionPipeline.from_pretrained`) and samples exactly as `diffdistill sample` does, from the same noise.

What is exported, and how. A student of a diffusers teacher is the teacher's UNet2DModel, trained further, behind
`DiffusersDenoiser` (teachers/diffusers.py, teachers/discrete.py): D(x; sigma) feeds the UNet z = x / sqrt(1 +
sigma^2) at the timestep t nearest to sigma and turns its eps / v / x0 output into x0 with sigma itself. A diffusers
scheduler does the same with its own table sigma_t = sqrt((1 - abar_t) / abar_t). So the exported scheduler's
table is the teacher's with abar_t set to 1 / (1 + sigma^2) at each timestep the student runs at (its levels are
rarely the table's: DI's 1.0, SiD's 2.5, PD's Karras grid), cut after the first of them, and written as
`trained_betas` (float32 values whose cumulative product diffusers computes back to the student's float64 table
at float32 rounding, `float32_betas`). The UNet's weights are the student's, untouched.

- A one-step student (recipe 'onestep': DI, SiD, GDD, one-level DMD2, KD of v/x-prediction teachers), x =
  D(sigma_0 u; sigma_0) from unit noise u: EulerDiscreteScheduler with timestep_spacing 'trailing', whose
  init_noise_sigma is then sigma_0 (the table's top), so the pipeline starts from sigma_0 u, gives the UNet
  sigma_0 u / sqrt(1 + sigma_0^2) at timestep t_0, and its one Euler step to sigma = 0 returns x0.
- A DDIM (= Euler) student (recipe 'euler' / 'ddim': progressive distillation), which `samplers.sample` starts
  from the VP prior (unit noise at the first level, as diffusers' pipelines): DPMSolverMultistepScheduler with
  solver_order 1 and 'dpmsolver++' (first-order DPM-Solver++ is DDIM, with eps recomputed from x0), whose dynamic
  thresholding with sample_max_value 1 clamps x0 to [-1, 1] (PD's clip_denoised) or is the recipe's own.

Equal means equal to float32 rounding: diffusers' Euler step returns x + (x - x0)/sigma_0 (0 - sigma_0) with x =
sigma_0 u, so a one-step student at a large level (DDPM's top, 157) comes back with ~ulp(157 |u|) ~ 5e-5 of rounding
(about 1e-6 at sigma_0 <= 2.5, and for the DDIM plan, whose last step returns x0 itself). `export_diffusers` samples
a few seeds both ways and refuses to write a folder that differs by more.

The pipeline is diffusers' ConsistencyModelPipeline, the UNet2DModel pipeline that starts from the scheduler's
init_noise_sigma, calls scale_model_input, passes class labels and takes `timesteps=` (its loop is a generic
scheduler loop: any scheduler with these methods runs in it, and `from_pretrained` loads the pair). One step, or a DDIM
student whose timesteps the scheduler's 'trailing'/'linspace' spacing gives, samples with
`pipe(num_inference_steps=N)`; other few-step students with `pipe(timesteps=[...])`, written to
`diffdistill_export.json` ("call").

Refused in one line, saying why: KD's paper student G(u) = u - eps(u, t) (diffusers turns eps into x0 with a gain
1/sqrt(abar) on the input, never 1); consistency students (`BoundaryDenoiser`: no diffusers scheduler applies the
boundary scalings to a DDPM UNet); this project's own networks (`Precond` over its UNets or MLPs: no diffusers
UNet2DModel has their blocks, embeddings and preconditioning, so no exact weight mapping exists); stochastic or
second-order samplers (multistep, ddpm, heun, dpmpp_2m); DDIM's clip that keeps the unclipped eps; fractional
timesteps (timestep_rule 'interp'); learned variances.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DiffdistillError, UsageError
from .io import umask

PIPELINE = "ConsistencyModelPipeline"
EXPORT_JSON = "diffdistill_export.json"
SUPPORTED = ("students of diffusers teachers (the teacher's UNet2DModel behind DiffusersDenoiser) with a one-step "
             "('onestep') or DDIM ('euler'/'ddim') recipe")
CHECK_RTOL = 1e-4     # the export is refused when the pipeline differs from `samplers.sample` by more than this
#                       x max(1, max |x|), plus, for one step, EULER_ULPS float32 roundings of sigma_0 max |u|
EULER_ULPS = 4        # diffusers' Euler step returns x + (x - x0)/sigma (0 - sigma) in float32: at sigma_0 = 157
#                       (DDPM's top level) x = sigma_0 u is ~600, so x0 comes back with ~ulp(600) = 6e-5 of rounding


@dataclass
class DiffusersPlan:
    """How diffusers samples a student: the scheduler class and its constructor kwargs, the pipeline call, and the
    diffdistill sampler it reproduces (sampler, sigmas, options: what `samplers.sample` runs)."""

    scheduler: str                       # EulerDiscreteScheduler | DPMSolverMultistepScheduler
    config: dict                         # its constructor kwargs (trained_betas, spacing, thresholding, ...)
    timesteps: list[int]                 # the UNet timesteps, one per step
    call: dict                           # ConsistencyModelPipeline.__call__ kwargs (num_inference_steps / timesteps)
    sampler: str                         # the student's sampler: onestep | euler | ddim
    sigmas: list[float]                  # its grid, ending in 0
    options: dict = field(default_factory=dict)   # its options (clip_denoised, dynamic_threshold, ...)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise DiffdistillError("export diffusers needs the optional dependency diffusers: "
                               "pip install 'diffdistill[diffusers]'") from None
    return diffusers


@contextlib.contextmanager
def _quiet_scheduler_tables():
    """Silence the one warning diffusers' schedulers raise with numpy >= 2: their `__init__` and `set_timesteps`
    call np.array(tensor), and numpy warns (DeprecationWarning) that torch's Tensor.__array__ takes no `copy`
    keyword. It is diffusers' and torch's to fix and fires on every scheduler made or run here (`python -W
    error::DeprecationWarning` failed the export), so only that message is ignored, only around these calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword",
                                category=DeprecationWarning)
        yield


def float32_betas(abar: Tensor) -> list[float]:
    """Betas whose cumulative product, as diffusers' schedulers compute it (float32 factors 1 - beta, multiplied
    up with a float64 accumulator, stored as float32), gives `abar` (float64) at every entry to float32 rounding:
    each factor is chosen against the product so far, so rounding errors do not add up over the table."""
    betas, prod = [], 1.0
    for a in abar.double().tolist():
        factor = float(np.float32(a / prod))
        betas.append(float(np.float32(1.0) - np.float32(factor)))     # exact for factors in [0.5, 1]
        prod *= factor
    return betas


def _refuse_student(student, where: str) -> None:
    """One-line refusals for the students with no exact diffusers counterpart."""
    from .diffusion.denoiser import BoundaryDenoiser, Precond
    from .methods.kd import PaperStudent
    from .teachers.diffusers import DiffusersDenoiser

    if isinstance(student, PaperStudent):
        raise DiffdistillError(
            f"{where}: KD's paper student G(u) = u - eps(u, t) cannot be exported exactly: every diffusers scheduler "
            "turns eps into x0 as (z - sqrt(1 - abar) eps) / sqrt(abar), a gain of 1/sqrt(abar) > 1 on its input, "
            f"never G's 1; export diffusers supports {SUPPORTED}")
    if isinstance(student, BoundaryDenoiser):
        raise DiffdistillError(
            f"{where}: a consistency student (c_skip(sigma) x + c_out(sigma) D, the boundary condition) cannot be "
            "exported exactly: no diffusers scheduler applies these scalings to a DDPM UNet (CMStochasticIterative"
            f"Scheduler expects an EDM-preconditioned network); export diffusers supports {SUPPORTED}")
    if isinstance(student, Precond):
        net = type(student.backbone).__name__
        raise DiffdistillError(
            f"{where}: this project's own network ({net} behind Precond '{student.precond.kind}') has no exact "
            "diffusers UNet2DModel equivalent (other blocks, embeddings and preconditioning: no weight mapping), so "
            f"it is not exported; export diffusers supports {SUPPORTED}")
    if not isinstance(student, DiffusersDenoiser):
        raise DiffdistillError(f"{where}: a {type(student).__name__} cannot be exported to diffusers; export "
                               f"diffusers supports {SUPPORTED}")
    if student.timestep_rule != "nearest":
        raise DiffdistillError(f"{where}: the student feeds fractional timesteps (timestep_rule "
                               f"{student.timestep_rule!r}), which a scheduler's table cannot reproduce; only "
                               "'nearest' students are exported")
    if student._split_variance:
        raise DiffdistillError(f"{where}: a UNet with a learned variance (variance_type "
                               f"{student.scheduler.variance_type!r}) is not exported (EulerDiscreteScheduler and "
                               "the DDIM plan read its whole output as the prediction)")
    size = student.model.config.sample_size
    if not isinstance(size, int) and len(set(size)) != 1:
        raise DiffdistillError(f"{where}: sample_size {list(size)} is not square; ConsistencyModelPipeline makes "
                               "square images only")


def _recipe_grid(student, recipe: dict, where: str) -> tuple[str, list[float], dict]:
    """(sampler, sigmas, options) of a sampling recipe, as `samplers.sample` would run it."""
    from .diffusion.schedules import check_sigmas
    from .samplers import default_sigmas

    recipe = dict(recipe or {})
    sampler = recipe.pop("sampler", None) or "heun"
    steps, sigmas = recipe.pop("steps", None), recipe.pop("sigmas", None)
    if sampler not in ("onestep", "euler", "ddim"):
        raise DiffdistillError(f"{where}: the student samples with {sampler!r}, which is not exported (exact "
                               f"diffusers counterparts exist for 'onestep' and 'euler'/'ddim' only: stochastic "
                               "samplers draw their own noise, Heun and DPM-Solver++(2M) are not planned)")
    if sigmas is None:
        sigmas = default_sigmas(student, int(steps or (1 if sampler == "onestep" else 18)), sampler)
    try:
        sigmas = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64)).tolist()
    except ValueError as e:
        raise DiffdistillError(f"{where}: bad sampling grid in the recipe ({e})") from None
    if sampler == "onestep":
        sigmas = [sigmas[0], 0.0]
        if recipe:
            raise DiffdistillError(f"{where}: recipe options {sorted(recipe)} are not exported")
    return sampler, sigmas, recipe


def _thresholding(options: dict, where: str) -> dict:
    """DPMSolverMultistepScheduler's x0 treatment for a DDIM recipe's options (x0 clamp or thresholding)."""
    from .samplers.ode import clip_limit

    options = dict(options)
    keeps_eps = bool(options.pop("clip_keeps_eps", False))
    clip = options.pop("clip_denoised", False)
    ratio, top = options.pop("dynamic_threshold", None), float(options.pop("threshold_max", 1.0))
    if options:
        raise DiffdistillError(f"{where}: recipe options {sorted(options)} are not exported")
    lim = clip_limit(clip) if ratio is None else None
    if ratio is None and lim is None:
        return dict(thresholding=False)
    if keeps_eps:
        raise DiffdistillError(f"{where}: the recipe treats x-hat as DDIMScheduler does (clipped x-hat, unclipped "
                               "eps), which only DDIMPipeline reproduces, and it cannot take this student's "
                               "timesteps; not exported")
    if ratio is not None:
        return dict(thresholding=True, dynamic_thresholding_ratio=float(ratio), sample_max_value=top)
    if lim != 1.0:
        raise DiffdistillError(f"{where}: x-hat clipped to [-{lim:g}, {lim:g}] has no diffusers counterpart for "
                               "this sampler (its thresholding clamps to [-1, 1] only); not exported")
    # dynamic thresholding with sample_max_value 1: s = clamp(quantile, 1, 1) = 1, a clamp to [-1, 1]
    return dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)


def plan_diffusers(student, recipe: dict | None, where: str = "student") -> DiffusersPlan:
    """The diffusers scheduler and pipeline call that sample `student` exactly as its `recipe` does, or a
    DiffdistillError saying why there is none (see the module docstring)."""
    _refuse_student(student, where)
    sampler, sigmas, options = _recipe_grid(student, recipe or {}, where)
    levels = torch.tensor(sigmas[:-1], dtype=torch.float64)
    timesteps = [int(t) for t in student.timestep(levels).tolist()]
    if len(set(timesteps)) != len(timesteps):
        raise DiffdistillError(f"{where}: the student's levels {[round(s, 6) for s in sigmas[:-1]]} share "
                               f"timesteps ({timesteps}): a scheduler's table has one level per timestep")
    abar = student.alphas_cumprod.detach().double().cpu().clone()
    for s, t in zip(levels.tolist(), timesteps):
        abar[t] = 1.0 / (1.0 + s * s)
    abar = abar[: timesteps[0] + 1]
    if not bool((abar[1:] < abar[:-1]).all()):
        raise DiffdistillError(f"{where}: the student's levels do not fit between the teacher's (timesteps "
                               f"{timesteps}); not exported")
    common = dict(num_train_timesteps=len(abar), trained_betas=float32_betas(abar),
                  prediction_type=student.prediction, steps_offset=0, final_sigmas_type="zero")
    if sampler == "onestep":
        config = dict(common, timestep_spacing="trailing", interpolation_type="linear", timestep_type="discrete",
                      use_karras_sigmas=False)
        return DiffusersPlan("EulerDiscreteScheduler", config, timesteps, {"num_inference_steps": 1}, sampler,
                             sigmas, options)
    config = dict(common, solver_order=1, algorithm_type="dpmsolver++", lower_order_final=True,
                  euler_at_final=False, use_karras_sigmas=False, **_thresholding(options, where))
    n = len(timesteps)
    diffusers = _require_diffusers()
    for spacing in ("trailing", "linspace"):          # spacings that start at the table's top, i.e. at t_0
        with _quiet_scheduler_tables():
            sched = diffusers.DPMSolverMultistepScheduler(**config, timestep_spacing=spacing)
            sched.set_timesteps(n)
        if sched.timesteps.tolist() == timesteps:
            return DiffusersPlan("DPMSolverMultistepScheduler", dict(config, timestep_spacing=spacing), timesteps,
                                 {"num_inference_steps": n}, sampler, sigmas, options)
    return DiffusersPlan("DPMSolverMultistepScheduler", dict(config, timestep_spacing="trailing"), timesteps,
                         {"num_inference_steps": None, "timesteps": timesteps}, sampler, sigmas, options)


def build_pipeline(student, plan: DiffusersPlan):
    """diffusers' ConsistencyModelPipeline of a copy of the student's UNet (float32) and the plan's scheduler."""
    diffusers = _require_diffusers()
    unet = copy.deepcopy(student.model).float().eval().requires_grad_(False)
    size = unet.config.sample_size
    if not isinstance(size, int):
        unet.register_to_config(sample_size=int(size[0]))
    with _quiet_scheduler_tables():
        scheduler = getattr(diffusers, plan.scheduler)(**plan.config)
    pipe = getattr(diffusers, PIPELINE)(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_class_labels(student, labels: Tensor | None) -> list[int] | None:
    """The UNet class indices (what the pipeline's `class_labels` takes) of diffdistill class labels."""
    if labels is None or not student.label_dim:
        return None
    onehot = torch.nn.functional.one_hot(labels.long(), student.label_dim).float()
    return [int(i) for i in student._labels(onehot, len(labels), "cpu")]


def pipeline_sample(pipe, call: dict, seeds, class_labels: list[int] | None = None) -> Tensor:
    """The pipeline's final samples (before its [0, 1] post-processing), one per-seed generator each, which
    draw the unit noise `samplers.make_noise` draws for the same seeds."""
    final: list[Tensor] = []
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    with torch.no_grad(), _quiet_scheduler_tables():   # the pipeline runs the scheduler's set_timesteps
        pipe(batch_size=len(gens), generator=gens, class_labels=class_labels, output_type="pt",
             callback=lambda i, t, x: final.append(x), **call)
    return final[-1].float().cpu()


def _prepare_out(out: Path, force: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UsageError(f"{out}: already exists (give --force to replace it)")
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise DiffdistillError(f"{out}: a non-empty folder that is not a diffusers pipeline; not replaced, even "
                               "with --force")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing what is there (already checked by `_prepare_out`)."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _card(plan: DiffusersPlan, info: dict) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in plan.call.items())
    check = info.get("check")
    checked = (f"Checked at export: max |diff| {check['max_abs_diff']:.3g} against `diffdistill sample` on seeds "
               f"{check['seeds']} (samples up to {check['max_abs_sample']:.3g} in size)." if check else
               "Not checked at export (--check 0).")
    labels = ("\nClass labels: `class_labels` takes the UNet's class indices (" + info["class_labels"] + ").\n"
              if info.get("class_labels") else "")
    return (f"# {info['source']} (diffdistill {info['method'] or 'student'}, exported)\n\n"
            f"A {len(plan.timesteps)}-step student written by `diffdistill export diffusers`: the UNet2DModel in "
            f"`unet/` with a {plan.scheduler} in `scheduler/` configured for its own noise levels (timesteps "
            f"{plan.timesteps}), in a {PIPELINE}.\n\n"
            "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"PATH\")\n"
            f"images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), {call}).images\n```\n\n"
            f"{PIPELINE}'s loop is a generic scheduler loop; the {plan.scheduler} is intended. With a list of "
            "generators seeded s, sample k equals `diffdistill sample ... --seeds s` of the run (the same unit "
            f"noise), to float32 rounding. {checked}\n{labels}")


def export_diffusers(student, recipe: dict | None, out, *, force: bool = False, check: int = 2,
                     source: str = "student", meta: dict | None = None) -> dict:
    """Write `student` (with its sampling `recipe`) to `out` as a diffusers pipeline folder: model_index.json,
    unet/ (config + safetensors), scheduler/, plus diffdistill_export.json (the plan, the pipeline call and the
    check) and README.md. With check > 0, seeds 0..check-1 are sampled by the new pipeline and by
    `samplers.sample`, and nothing is written when they differ by more than CHECK_RTOL x max(1, max |x|).
    An existing `out` is refused unless `force` (and then only an empty folder or a diffusers pipeline folder is
    replaced); the folder is written next to `out` and renamed into place. Returns the export's information."""
    from .samplers import make_noise, sample

    out = Path(out)
    plan = plan_diffusers(student, recipe, source)
    _prepare_out(out, force)
    pipe = build_pipeline(student, plan)
    meta = meta or {}
    info = dict(source=str(source), method=meta.get("method"), pipeline=PIPELINE, scheduler=plan.scheduler,
                scheduler_config={k: v for k, v in plan.config.items() if k != "trained_betas"},
                call=plan.call, timesteps=plan.timesteps, student=dict(sampler=plan.sampler, sigmas=plan.sigmas,
                                                                    options=plan.options))
    if student.label_dim:
        null = student.null_class
        info["class_labels"] = ("diffdistill class k is index k" if null is None else
                                f"diffdistill class k is index k, or k + 1 from the null class {null} on")
    if check > 0:
        seeds = list(range(int(check)))
        labels = torch.tensor([s % student.label_dim for s in seeds]) if student.label_dim else None
        ref = sample(student, seeds, sampler=plan.sampler, sigmas=plan.sigmas, cond=labels, **plan.options)
        got = pipeline_sample(pipe, plan.call, seeds, unet_class_labels(student, labels))
        diff, size = float((got - ref).abs().max()), float(ref.abs().max())
        tol = CHECK_RTOL * max(1.0, size)
        if plan.sampler == "onestep":
            tol += EULER_ULPS * torch.finfo(torch.float32).eps * plan.sigmas[0] * float(make_noise(seeds,
                                                                                            student.shape).abs().max())
        if not diff <= tol:
            raise DiffdistillError(f"{source}: the exported pipeline's samples differ from diffdistill sample by "
                                   f"{diff:.3g} (samples up to {size:.3g}); nothing written")
        info["check"] = dict(seeds=seeds, max_abs_diff=diff, max_abs_sample=size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_card(plan, info))
        mask = umask()
        for path in (tmp, *tmp.rglob("*")):        # mkdtemp and some writers make 0700 / 0600: a plain folder's modes
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
