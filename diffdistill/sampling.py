"""Sampling a model named by a spec: the library side of `diffdistill sample` and of the demo's evaluations.

`load_model(spec)` opens a run (its RUN/model, or RUN/latest when it was interrupted), a snapshot or any teacher
spec, with its sampling recipe; `sampling_plan` turns that recipe, changed by a step count, a sampler or a clip
value, into the sampler, noise levels and options to use; `labels_for` gives the class labels of a set of seeds;
`generate` draws the samples (image k from seed k alone: the batch never changes a sample); `save_figure` saves an
image grid or a scatter plot. The error messages name the command line's options (`--steps`, `--class`, `--clip`),
which pass their values here unchanged.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DiffdistillError, UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["few_step_sigmas", "generate", "is_image_shape", "labels_for", "load_model", "sampling_plan",
           "save_figure"]


def few_step_sigmas(denoiser, steps: int, rho: float = 7.0) -> list[float]:
    """`steps` noise levels from sigma_max for multistep consistency-style sampling, plus the final 0
    (`samplers.default_sigmas(..., 'multistep')`)."""
    from .samplers import default_sigmas

    return [float(s) for s in default_sigmas(denoiser, steps, "multistep", rho)]


def sampling_plan(denoiser, recipe: dict | None, steps: int | None = None,
                  sampler: str | None = None, clip: float | None = None) -> dict:
    """The sampler, noise levels and options to use: the model's recipe, changed by `steps`/`sampler`/`clip`.

    Returns {"sampler": name, "sigmas": [...descending, 0.0], "options": {...}, "nfe": int}. Rules: the recipe
    as is when nothing changes; a one-step student asked for N > 1 steps samples by multistep consistency
    sampling over the first N levels of its recipe when it has that many (DMD2's trained levels), else over
    `few_step_sigmas`; ODE samplers take `samplers.default_sigmas` for a new step count. `clip` (--clip V)
    replaces the recipe's x-hat treatment (clamp or thresholding) by a clamp to [-V, V], none for 0; the
    recipe's clip_keeps_eps stays (a diffusers teacher keeps its DDIM eps rule)."""
    import inspect

    from .samplers import SAMPLERS, default_sigmas, nfe

    recipe = dict(recipe or {})
    r_sampler = recipe.pop("sampler", None) or "heun"
    r_steps, r_sigmas = recipe.pop("steps", None), recipe.pop("sigmas", None)
    if r_sigmas is not None:
        r_sigmas = [float(s) for s in r_sigmas]
        r_steps = len(r_sigmas) - 1
    r_steps = int(r_steps or (1 if r_sampler == "onestep" else 18))
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if sampler is not None and sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    name = sampler or r_sampler
    n = steps or r_steps
    few = {"onestep", "multistep"}
    if name == "onestep" and n > 1:
        if sampler == "onestep":
            raise UsageError(f"the onestep sampler takes one step, not --steps {n}; use --sampler multistep")
        name = "multistep"
    same = name == r_sampler or {name, r_sampler} == {"euler", "ddim"}    # DDIM = Euler (DDIM paper, §4.3)
    same_family = same or {name, r_sampler} <= few
    options = recipe if same else {}
    if r_sigmas is not None and n == r_steps and same_family:
        sigmas = r_sigmas
    elif name in few:
        levels = [s for s in (r_sigmas or []) if s > 0] if r_sampler in few else []
        sigmas = levels[:n] + [0.0] if len(levels) >= n else few_step_sigmas(denoiser, n)
    else:
        sigmas = [float(s) for s in default_sigmas(denoiser, n, name)]
    if clip is not None:
        if not 0 <= clip < math.inf:
            raise UsageError(f"--clip must be a positive number (or 0: no clipping), got {clip}")
        if "clip_denoised" not in inspect.signature(SAMPLERS[name]).parameters:
            takes = [k for k, fn in SAMPLERS.items() if "clip_denoised" in inspect.signature(fn).parameters]
            raise UsageError(f"--clip: the {name} sampler does not clip x-hat (use --sampler {' or '.join(takes)})")
        options = {k: v for k, v in options.items() if k not in ("dynamic_threshold", "threshold_max")}
        if clip:
            options["clip_denoised"] = float(clip)
        else:
            options.pop("clip_denoised", None)
            options.pop("clip_keeps_eps", None)
    return dict(sampler=name, sigmas=sigmas, options=options, nfe=nfe(name, sigmas))


def load_model(spec: str, device="cpu", note=None):
    """(denoiser, recipe, meta) of a run dir, a snapshot, or any teacher spec `load_teacher` accepts (then the
    meta is {} and the recipe the teacher's own `sampling`: a diffusers folder's DDIMPipeline, 50 steps).

    Which snapshot is `io.find_snapshot`'s: for a run dir RUN/latest when the run was interrupted (`note(text)` is
    told so), else RUN/model. A training checkpoint (RUN/checkpoints/...) is refused in one line naming the snapshot to
    use: it holds the method's whole state, and only the method knows how to export its student."""
    from .io import LATEST_DIR, find_snapshot, load_snapshot
    from .teachers.analytic import is_analytic_spec
    from .teachers.load import load_teacher

    if not is_analytic_spec(spec):
        snap = find_snapshot(spec)
        if snap is not None:
            loaded = load_snapshot(snap, device)
            if snap == Path(spec) / LATEST_DIR and note is not None:    # a run dir that was interrupted
                meta = loaded[2]
                note(f"{spec}: the run did not finish; sampling {snap} (step {meta.get('step', '?')}, "
                     f"{meta.get('kimg', '?')} kimg)")
            return loaded
        _refuse_checkpoint(Path(spec))
    teacher = load_teacher(spec, device)
    return teacher, dict(getattr(teacher, "sampling", None) or {}), {}


def _refuse_checkpoint(path: Path) -> None:
    """A one-line error for a training checkpoint, or for a run that has checkpoints but no snapshot yet."""
    from .io import run_snapshot
    from .train.checkpoint import CHECKPOINT_DIR, list_checkpoints

    rerun = "rerun the run's command to continue it (Ctrl-C then writes RUN/latest)"
    if path.name == CHECKPOINT_DIR and path.is_dir():
        run = path.parent
    elif path.parent.name == CHECKPOINT_DIR and path.name.startswith("ckpt-") and path.exists():
        run = path.parent.parent
    elif path.is_dir() and (path / "config.json").is_file() and list_checkpoints(path):
        raise DiffdistillError(f"{path}: an unfinished run with checkpoints but no sampler-ready snapshot "
                               f"(RUN/model or RUN/latest); {rerun}")
    else:
        return
    snap = run_snapshot(run)
    use = f"sample {snap} (or the run, {run})" if snap is not None else f"{run} has none yet: {rerun}"
    raise DiffdistillError(f"{path}: a training checkpoint (the method's training state), not a sampler-ready "
                           f"snapshot; {use}")


def labels_for(denoiser, seeds: list[int], label: int | list[int] | None, spec: str,
               per_row: int | None = None) -> torch.Tensor | None:
    """Class labels: `label` for every sample; a list of labels cycled through (sample i gets
    label[i % len]), or with `per_row` one run of per_row samples per label (grid rows); else seed % label_dim
    (balanced); None when unconditional."""
    import torch

    label_dim = int(getattr(denoiser, "label_dim", 0) or 0)
    if label is not None:
        classes = [label] if isinstance(label, int) else list(label)
        text = ",".join(map(str, classes))
        if label_dim == 0:
            raise UsageError(f"--class {text}: {spec} is unconditional (it has no class labels)")
        bad = [c for c in classes if not 0 <= c < label_dim]
        if bad:
            raise UsageError(f"--class {text}: {spec} has classes 0..{label_dim - 1} (not {bad[0]})")
        pick = (lambda i: classes[min(i // per_row, len(classes) - 1)]) if per_row else \
            (lambda i: classes[i % len(classes)])
        return torch.tensor([pick(i) for i in range(len(seeds))], dtype=torch.long)
    if label_dim == 0:
        return None
    return torch.tensor([s % label_dim for s in seeds], dtype=torch.long)


def generate(denoiser, plan: dict, seeds: list[int], cond: torch.Tensor | None = None, device="cpu",
             batch: int = 256, progress: bool = False) -> torch.Tensor:
    """All samples [N, *shape] (CPU float32, not clamped) for the seeds, following a `sampling_plan`."""
    import torch

    from .samplers import iter_samples

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(seeds), unit="sample", desc=f"{plan['sampler']} {len(plan['sigmas']) - 1} steps",
                   leave=False)
    out = []
    with torch.no_grad():
        for x in iter_samples(denoiser, seeds, sampler=plan["sampler"], sigmas=plan["sigmas"], cond=cond,
                              device=device, batch=batch, **plan["options"]):
            out.append(x.cpu())
            if bar is not None:
                bar.update(len(x))
    if bar is not None:
        bar.close()
    return torch.cat(out)


def is_image_shape(shape) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def save_figure(x: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None,
                ncol: int | None = None, extent: float | None = None) -> Path:
    """An image grid ([-1, 1] images, 7x7 for 49) or a scatter plot (2-D points; `extent`: the half-width of
    the square shown, default: fitted to the points), with the shared helpers of `train.stats`."""
    from .train.stats import save_image_grid, save_scatter

    shape = tuple(x.shape[1:])
    if is_image_shape(shape):
        return save_image_grid(x.clamp(-1, 1), path, ncol=ncol or math.ceil(math.sqrt(len(x))))
    if len(shape) == 1 and shape[0] >= 2:
        return save_scatter(x, path, reference=reference, extent=extent)
    raise DiffdistillError(f"samples of shape {shape} are neither images (C, H, W) with C in 1, 3 nor "
                           "points; use `diffdistill sample npz`")
