"""The library's entry point for distillation: `diffdistill.distill(...)`, used from Python (a notebook, a script)
and by `diffdistill distill METHOD` alike.

    import diffdistill as dd
    run = dd.distill("di", teacher="runs/digits", out="runs/di-digits", loop=dd.TrainConfig(
        out="runs/di-digits", total_kimg=120, batch=64), gen_lr=1e-4, fake_lr=1e-4, init_sigma=2.5)
    student = run.student()                       # the exported EMA generator, ready for dd.sample(...)

The keyword arguments are the method's settings (`diffdistill.methods.get("di").config`'s fields, the same names
as the command line's options without the dashes); the defaults and the teacher-dependent ones are the
command line's, because both go through `MethodConfig.resolve`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from .errors import UsageError
from .methods.recipes import LOOP_FLAGS

# The loop settings a recipe may set, with their command-line flags.
LOOP_RECIPE_KEYS = LOOP_FLAGS
# The data settings a recipe may set (the papers' random horizontal flips), with their command-line flags.
DATA_RECIPE_KEYS = {"xflip": "--xflip"}
DEFAULT_KIMG, DEFAULT_BATCH = 100.0, 128        # `distill`'s run length and batch when none is given


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators, right before a command builds its networks: so a
    teacher's fresh network, a student's fresh heads, discriminators and fake scores are the same for the same
    seed (the loop then reseeds every micro-batch from (seed, step, micro-batch, group)). A run killed before its
    first checkpoint restarts from the same initialisation."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def distill_loop(out: str, total_kimg: float = DEFAULT_KIMG, batch: int = DEFAULT_BATCH, **settings):
    """The TrainConfig of a distillation run, with the defaults that scale with its length: 20 stats lines,
    4 checkpoints and a grid of the student's samples at the end (RUN/samples-final.png)."""
    from .train.loop import TrainConfig

    settings.setdefault("tick_kimg", max(total_kimg / 20, 1e-3))
    settings.setdefault("checkpoint_kimg", max(total_kimg / 4, 1e-3))
    settings.setdefault("final_grid", True)
    return TrainConfig(out=str(out), total_kimg=total_kimg, batch=batch, **settings)


def build_method(spec, cfg, teacher, data, loop):
    """The method's `Method` from its settings: the teacher- and run-dependent defaults resolved, then every
    generator seeded with the run's seed (fresh networks are the same for the same seed), then built."""
    cfg = cfg.resolve(teacher, loop)
    seed_everything(loop.seed)
    return spec.create(cfg, teacher, data, loop), cfg


def recipe_sources(spec) -> dict[str, str]:
    """The recipes of a method, name -> where its values come from: its papers' and the library's."""
    from .methods.recipes import LIBRARY

    return {**{name: r.source for name, r in spec.recipes.items()}, **LIBRARY}


def recipe_settings(spec, name: str, teacher=None, kimg: float = DEFAULT_KIMG, batch: int = DEFAULT_BATCH) -> dict:
    """A recipe of `spec` as a dict of settings (config fields and the loop's LOOP_RECIPE_KEYS): one of its papers'
    (`spec.recipes`), `converged` or `short` (the library's, methods/recipes.py: for the teacher's kind, and
    `short` for a run of `kimg` at `batch`). The command line and the Python API both read recipes here."""
    from .methods import common, recipes

    if name in recipes.LIBRARY:
        kind = "ring" if common.is_weightless(teacher) else "image"
        if name == "converged":
            return recipes.converged_settings(spec.name, kind)
        return recipes.short_run_settings(spec.name, kind, kimg, batch)
    if name not in spec.recipes:
        raise UsageError(f"{spec.name} has no recipe {name!r} (known: {', '.join(sorted(recipe_sources(spec)))})")
    options = spec.recipes[name].options
    return dict(options(teacher) if callable(options) else options)   # callable: SiD's CIFAR-10 length


def run_meta(method: str, teacher: str | Path | None, data: str | Path | None, recipe: str | None = None) -> dict:
    """A distillation's description in config.json: its method, teacher and data specs (as text; None for loaded
    ones) and recipe. Without data, an analytic teacher's spec is the data: its distribution is what it denoises."""
    from .teachers import is_analytic_spec

    teacher = None if teacher is None else str(teacher)
    if data is None and teacher is not None and is_analytic_spec(teacher):
        data = teacher
    return dict(method=method, teacher=teacher, data=None if data is None else str(data), recipe=recipe)


@dataclass
class DistillResult:
    """A finished (or interrupted) run: its directory, the exported student's directory (RUN/model, or
    RUN/latest for an interrupted run), the steps and images trained and the resolved settings."""

    run: Path
    model: Path | None
    interrupted: bool
    step: int
    nimg: int
    config: object
    best: dict | None = None

    def student(self, device: str = "cpu"):
        """The exported student, a denoiser carrying its sampling recipe (`diffdistill.sample(student, ...)`)."""
        from .io import load_snapshot

        if self.model is None:
            raise UsageError(f"{self.run}: the run exported no student")
        return load_snapshot(self.model, device=device)[0]


def distill(method: str, teacher, data=None, out: str | Path | None = None, *, loop=None, recipe: str | None = None,
            evaluate=None, callback=None, device: str | None = None, **settings) -> DistillResult:
    """Distil `teacher` into a student with `method` on the one training loop and return the run.

    teacher: a spec (a run or snapshot of this project, a diffusers folder, a converted EDM teacher, toy:ring8,
    gmm:PATH.json) or a loaded denoiser. data: a data spec, an opened data set or None (methods that need real
    data say so). out: the run directory (default runs/METHOD), used when `loop` is not given. loop: a
    TrainConfig (default: `distill_loop(out)`, 100 kimg at batch 128; a recipe's length, batch and EMA apply only
    then). recipe: one of the method's published recipes, applied beneath `settings`. evaluate: the loop's
    evaluate hook, `evaluate(method, ema, nimg) -> {metric: value}` (e.g. to record quality during training).
    callback: `callback(event, obj)` to instrument a run without patching the library: ('teacher', the loaded
    teacher), ('method', the built Method), ('result', the loop's result dict), in that order.
    settings: the method's settings by field name (e.g. gen_lr=1e-4).
    """
    callback = callback or _no_callback
    from . import methods
    from .methods.options import make_config

    spec = methods.get(method)
    if loop is not None and out is not None and str(out) != str(loop.out):
        raise UsageError(f"distill: out={out} differs from loop.out={loop.out}; give one")
    meta = run_meta(method, teacher if isinstance(teacher, (str, Path)) else None,
                    data if isinstance(data, (str, Path)) else None, recipe)
    if isinstance(teacher, (str, Path)):
        from .teachers import load_teacher

        teacher = load_teacher(str(teacher), device=(loop.device if loop else None) or device or _default_device())
    callback("teacher", teacher)
    run = dict(kimg=loop.total_kimg, batch=loop.batch) if loop is not None else {}
    overrides = recipe_settings(spec, recipe, teacher, **run) if recipe else {}
    loop_overrides = {k: overrides.pop(k) for k in list(overrides) if k in LOOP_RECIPE_KEYS}
    data_overrides = {k: overrides.pop(k) for k in list(overrides) if k in DATA_RECIPE_KEYS}
    overrides.update(settings)
    cfg = make_config(spec.config, overrides, what=f"distill {method}")
    if loop is None:
        loop = distill_loop(out or f"runs/{method}", device=device, **loop_overrides)
    if spec.needs_data and data is None:
        raise UsageError(f"{method} needs real data: pass data=SPEC (a folder, .zip, .npz, digits, toy:ring8, ...)")
    if isinstance(data, (str, Path)):
        from .data import open_dataset

        data = open_dataset(str(data), **data_overrides)
    if data is not None and tuple(data.shape) != tuple(teacher.shape):
        raise UsageError(f"the data has samples of shape {tuple(data.shape)}, the teacher makes "
                         f"{tuple(teacher.shape)}")
    if not loop.meta:       # config.json's run description, as `diffdistill distill` writes it
        loop = replace(loop, meta=meta)
    built, cfg = build_method(spec, cfg, teacher, data, loop)
    callback("method", built)
    if evaluate is None and spec.best_metric is not None:
        evaluate = own_evaluation
        if loop.best_metric is None:
            loop = replace(loop, best_metric=spec.best_metric, best_mode="min",
                           eval_kimg=loop.eval_kimg or max(loop.total_kimg / 10, 1e-3))
    return _train(built, loop, data, evaluate, callback, cfg, DistillResult, spec=spec)


def _train(method, loop, data, evaluate, callback, cfg, result_type, spec=None):
    """The loop (a method's own driver when its spec has one), then the run as `result_type` (the exported
    model: RUN/model, or RUN/latest if interrupted)."""
    if spec is not None:
        from .methods import run_method

        result = run_method(spec, method, loop, data, evaluate)
    else:
        from .train.loop import train

        result = train(method, loop, data, evaluate=evaluate)
    callback("result", result)
    model = result.get("model") or result.get("latest")
    return result_type(run=Path(result["run_dir"]), model=Path(model) if model else None,
                       interrupted=bool(result.get("interrupted")), step=result["step"], nimg=result["nimg"],
                       config=cfg, best=result.get("best"))


def _no_callback(event: str, obj) -> None:
    pass


def own_evaluation(method, ema, nimg):
    """The loop's evaluate hook for a method with its own model selection (`MethodSpec.best_metric`: KD's held-out
    loss picks the model its export returns)."""
    return method.evaluate(ema)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Training a teacher: `diffdistill.train_teacher(...)`, the same path as `diffdistill train-teacher`


@dataclass
class TeacherResult(DistillResult):
    """A finished (or interrupted) teacher run: as DistillResult, with `config` the resolved TrainTeacherConfig
    and `teacher()` the trained EMA denoiser with its sampling recipe."""

    def teacher(self, device: str = "cpu"):
        """The trained teacher (RUN/model, or RUN/latest of an interrupted run), ready for `diffdistill.sample`
        and as the teacher of `diffdistill.distill`."""
        from .io import load_snapshot

        if self.model is None:
            raise UsageError(f"{self.run}: the run exported no model")
        return load_snapshot(self.model, device=device)[0]


def teacher_meta(settings, method, data_spec, xflip: bool) -> dict:
    """The run description in a teacher run's config.json (the resolved settings)."""
    cfg = method.cfg
    return dict(data=data_spec, xflip=xflip, preset=settings.preset, loss=cfg.loss, prediction=cfg.prediction,
                schedule=cfg.schedule, weighting=cfg.weighting, sigma_data=cfg.sigma_data,
                label_dropout=cfg.label_dropout, lr=cfg.optim.lr, warmup_kimg=cfg.optim.warmup_kimg,
                label_dim=method.denoiser.label_dim, sample_steps=settings.sample_steps,
                network=settings.network_options())


def prepare_teacher(settings, data, loop, *, data_spec=None, xflip: bool = False):
    """Everything before a teacher trains, for `train-teacher` and `train_teacher` alike: (method, loop
    TrainConfig, resolved settings). settings: a TrainTeacherConfig (the preset-dependent defaults are resolved
    here, from the data's shape); data: an opened data set; loop: a TrainConfig (used as given) or a dict with
    `out` and TrainConfig fields over the preset's loop settings. Seeds every generator with the run's seed right
    before the network is built, so the same seed gives the same initial weights."""
    from .methods import teacher
    from .presets import train_config
    from .train.loop import TrainConfig

    settings = settings.resolve(shape=tuple(data.shape))
    if not isinstance(loop, TrainConfig):
        loop = dict(loop)
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(loop) - known)
        if unknown:
            raise UsageError(f"train_teacher: unknown loop setting(s) {', '.join(unknown)} (TrainConfig fields: "
                             f"{', '.join(sorted(known))})")
        loop = train_config(settings.preset, str(loop.pop("out")), **loop)
    seed_everything(loop.seed)             # the fresh network's initialisation
    method = teacher.create(settings, data)
    loop = replace(loop, meta=dict(teacher_meta(settings, method, data_spec, xflip), **loop.meta))
    return method, loop, settings


def train_teacher(data, out: str | Path | None = None, *, preset: str | None = None, loop=None, evaluate=None,
                  callback=None, device: str | None = None, xflip: bool = False, **settings) -> TeacherResult:
    """Train a teacher on `data` with the one training loop, as `diffdistill train-teacher` does (the same
    defaults, the same resolved settings, the same weights for the same seed), and return the run.

    data: a data spec (a folder, .zip, .npz, digits, toy:ring8, ...) or an opened data set. out: the run
    directory (default runs/teacher). preset: toy | digits | mnist | cifar10-small | cifar10 (default: by the
    data's shape). loop: a dict of TrainConfig fields over the preset's loop settings (e.g. dict(total_kimg=2,
    batch=64)), or a whole TrainConfig used as given. evaluate: the loop's evaluate hook, `evaluate(method, ema,
    nimg) -> {metric: value}` (every loop.eval_kimg, default 10 times per run). callback: `callback(event, obj)`
    with ('method', the built TeacherTraining) and ('result', the loop's result dict). device: cpu, cuda, cuda:N
    (with a dict loop). xflip: horizontal flips of a data spec's images.
    settings: `train-teacher`'s options by field name (`diffdistill.methods.teacher.TrainTeacherConfig`: lr,
    warmup, loss, pred, schedule, weighting, sigma_data, label_dropout, sample_steps, uncond, channels,
    channel_mult, blocks, attn, dropout).
    """
    callback = callback or _no_callback
    from .methods.options import make_config
    from .methods.teacher import TrainTeacherConfig
    from .train.loop import TrainConfig

    if preset is not None:
        settings["preset"] = preset
    cfg = make_config(TrainTeacherConfig, settings, what="train_teacher")
    cfg.check()
    if isinstance(loop, TrainConfig):
        if out is not None and str(out) != str(loop.out):
            raise UsageError(f"train_teacher: out={out} differs from loop.out={loop.out}; give one")
    else:
        loop = dict(loop or {})
        if out is not None and "out" in loop and str(out) != str(loop["out"]):
            raise UsageError(f"train_teacher: out={out} differs from loop['out']={loop['out']}; give one")
        loop.setdefault("out", str(out or "runs/teacher"))
        if device is not None:
            loop.setdefault("device", device)
    data_spec = None
    if isinstance(data, (str, Path)):
        from .data import open_dataset

        data_spec = str(data)
        data = open_dataset(data_spec, xflip=xflip, use_labels=not cfg.uncond)
    elif xflip:
        raise UsageError("train_teacher: xflip applies to a data spec; open the data set with xflip=True instead")
    method, loop, cfg = prepare_teacher(cfg, data, loop, data_spec=data_spec, xflip=xflip)
    callback("method", method)
    if evaluate is not None and not loop.eval_kimg:
        loop = replace(loop, eval_kimg=max(loop.total_kimg / 10, 1e-3))
    return _train(method, loop, data, evaluate, callback, cfg, TeacherResult)
