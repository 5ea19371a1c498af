"""Samplers: stateless functions over (denoiser, noise, sigmas), and a `sample` convenience.

Noise comes from per-sample seeds, so image k depends on seed k only: the batch size never changes a sample.
`sample` / `iter_samples` start the ODE and ancestral samplers from the denoiser's prior at the grid's first
level (`prior_scale`: sigma_0 z for EDM-style denoisers, z sqrt(1 + sigma_0^2) for VP-discrete teachers, as
diffusers' pipelines do); the few-step samplers start from sigma_0 z, the input their students trained on.
Given no sampler, steps or sigmas, they follow the denoiser's own recipe (`recipe_of`: the `sampling` attribute
that `load_snapshot` / `load_teacher` attach from a snapshot), else Heun with 18 steps. `sample_batches` samples
by a snapshot's recipe with class labels from the seeds: the samples `diffdistill eval` and evaluation during
training hand to `metrics.protocol.evaluate`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..diffusion.schedules import check_sigmas, karras_sigmas
from ..errors import DiffdistillError
from .few_step import sample_multistep, sample_onestep
from .ode import call_denoiser, sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_heun

SAMPLERS = {
    "euler": sample_euler,
    "ddim": sample_ddim,
    "heun": sample_heun,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "onestep": sample_onestep,
    "multistep": sample_multistep,
}
STOCHASTIC = {"ddpm", "multistep"}
PRIOR_SAMPLERS = {"euler", "ddim", "heun", "ddpm", "dpmpp_2m"}   # integrate the teacher's process from its prior

__all__ = ["SAMPLERS", "call_denoiser", "default_sigmas", "get_sampler", "initial_noise_scale", "iter_samples",
           "make_noise", "nfe", "prior_scale", "recipe_of", "sample", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m",
           "sample_batches", "sample_euler", "sample_heun", "sample_multistep", "sample_onestep", "seed_labels"]


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise DiffdistillError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[name]


def make_noise(seeds: Sequence[int], shape, device="cpu") -> Tensor:
    """Unit Gaussian noise [len(seeds), *shape]; row k is drawn from its own generator seeded by seeds[k]."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device)


def initial_noise_scale(denoiser, sigma: float) -> float:
    """Standard deviation of the start x of an ODE/ancestral sampler whose grid begins at `sigma`.

    A denoiser's own `initial_noise_scale(sigma)` when it has one; else, for a discrete-time (DDPM/DDIM, VP)
    teacher (`discrete_sigmas` set, guidance wrappers included), the VP prior z ~ N(0, I) at that level:
    x = z / alpha = z sqrt(1 + sigma^2), as diffusers' pipelines start; else EDM's sigma (x = sigma z)."""
    own = getattr(denoiser, "initial_noise_scale", None)
    if callable(own):
        return float(own(sigma))
    if getattr(denoiser, "discrete_sigmas", None) is not None:
        return math.sqrt(1 + float(sigma) ** 2)
    return float(sigma)


def prior_scale(denoiser, sigma: float) -> float:
    """The factor on unit noise that a sampler then scales by its first level `sigma`:
    initial_noise_scale / sigma (1 for EDM-style denoisers). `sample` and the KD pairs use it."""
    sigma = float(sigma)
    return initial_noise_scale(denoiser, sigma) / sigma if sigma > 0 else 1.0


def _sampler_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    # A second stream per seed for the noise a stochastic sampler injects along the way.
    return [torch.Generator().manual_seed(int(s) + 2**31) for s in seeds]


def default_sigmas(denoiser, steps: int, sampler: str = "heun", rho: float = 7.0) -> Tensor:
    """The grid a sampler uses for a denoiser: one level for 'onestep'; the denoiser's own grid when it has one
    (`denoiser.default_sigmas(steps)`, e.g. a diffusers scheduler's spacing); for another discrete-time teacher,
    `steps` of its own levels spaced evenly (top level first); else the Karras grid on the denoiser's range."""
    if sampler == "onestep":
        return torch.tensor([denoiser.sigma_max, 0.0], dtype=torch.float64)
    if sampler == "multistep":
        # Consistency-style: the Karras grid of steps+1 levels without its last level sigma_min, where a
        # boundary-conditioned student is the identity (a step there would be wasted), then 0.
        grid = karras_sigmas(steps + 1, denoiser.sigma_min, denoiser.sigma_max, rho)
        return torch.cat([grid[:steps], grid.new_zeros(1)])
    if callable(getattr(denoiser, "default_sigmas", None)):
        return torch.as_tensor(denoiser.default_sigmas(steps), dtype=torch.float64)
    discrete = getattr(denoiser, "discrete_sigmas", None)
    if discrete is not None:
        table = torch.as_tensor(discrete, dtype=torch.float64).flip(0)  # descending
        idx = torch.linspace(0, len(table) - 1, steps).round().long()
        return torch.cat([table[idx], table.new_zeros(1)])
    return karras_sigmas(steps, denoiser.sigma_min, denoiser.sigma_max, rho)


def nfe(sampler: str, sigmas) -> int:
    """Network evaluations per sample of a sampler on a grid."""
    n = len(sigmas) - 1
    if sampler == "heun":
        return 2 * n - 1
    if sampler == "onestep":
        return 1
    return n


def recipe_of(denoiser) -> dict:
    """A copy of the sampling recipe a denoiser carries ({'sampler', 'steps' or 'sigmas', options...}; the
    `sampling` attribute a loaded snapshot gets), or {} when it has none."""
    recipe = getattr(denoiser, "sampling", None)
    return dict(recipe) if isinstance(recipe, dict) else {}


def iter_samples(denoiser, seeds: int | Sequence[int], steps: int | None = None, sampler: str | None = None,
                 sigmas=None, cond: Tensor | int | None = None, device="cpu", batch: int = 64,
                 **options) -> Iterator[Tensor]:
    """Yield float32 sample batches (on `device`) for the given seeds (an int n means seeds 0..n-1).

    `options` are the sampler's (e.g. a recipe's clip_denoised); ODE/ancestral samplers start from the
    denoiser's prior (`prior_scale`). With no `steps`, `sampler` or `sigmas`, the denoiser's own recipe
    (`recipe_of`) is followed, its other keys as options (yours win); else Heun, 18 steps."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if steps is None and sampler is None and sigmas is None:
        recipe = recipe_of(denoiser)
        sampler, steps, sigmas = recipe.pop("sampler", None), recipe.pop("steps", None), recipe.pop("sigmas", None)
        options = {**recipe, **options}
    sampler = sampler or "heun"
    fn = get_sampler(sampler)
    if sigmas is None:
        sigmas = default_sigmas(denoiser, steps or 18, sampler)
    sigmas = check_sigmas(torch.as_tensor(sigmas, dtype=torch.float64))
    if isinstance(cond, int):
        cond = torch.full((len(seeds),), cond, dtype=torch.long)
    scale = prior_scale(denoiser, float(sigmas[0])) if sampler in PRIOR_SAMPLERS else 1.0
    for start in range(0, len(seeds), batch):
        chunk = seeds[start:start + batch]
        noise = make_noise(chunk, denoiser.shape, device)
        if scale != 1.0:
            noise = noise.double() * scale
        c = None if cond is None else cond[start:start + batch].to(device)
        gens = _sampler_generators(chunk) if sampler in STOCHASTIC or options.get("s_churn") else None
        out = fn(denoiser, noise, sigmas, cond=c, generator=gens, **options).float()
        if not bool(torch.isfinite(out).all()):   # never hand on NaN or inf samples as if they were images
            where = getattr(denoiser, "source", None) or type(denoiser).__name__
            raise DiffdistillError(f"{where}: sampling produced {int((~torch.isfinite(out)).sum())} NaN or inf "
                                   f"values (seeds {chunk[0]}..{chunk[-1]}, {sampler} on {len(sigmas) - 1} "
                                   "steps): the model's weights or its sampling settings are broken")
        yield out


def sample(denoiser, seeds: int | Sequence[int], steps: int | None = None, sampler: str | None = None,
           sigmas=None, cond: Tensor | int | None = None, device="cpu", batch: int = 64, **options) -> Tensor:
    """All samples for `seeds` as one CPU float32 tensor [N, *shape]. See `iter_samples`."""
    return torch.cat([b.cpu() for b in iter_samples(denoiser, seeds, steps, sampler, sigmas, cond, device,
                                                    batch, **options)])


def seed_labels(seeds: Sequence[int], label_dim: int) -> Tensor | None:
    """Class labels of class-conditional sampling: seed % label_dim (balanced, a function of the seed)."""
    return None if label_dim == 0 else torch.tensor([int(s) % label_dim for s in seeds], dtype=torch.long)


def sample_batches(denoiser, seeds: Sequence[int], recipe: dict | None = None, device="cpu", batch: int = 256,
                   clamp: bool = False) -> Iterator[Tensor]:
    """Sample batches (on `device`) for `seeds` following a recipe, the evaluation protocol's samples.

    recipe: a snapshot's `sampling` ({"sampler", "steps"} or explicit "sigmas"; its other keys are sampler
    options); empty or None: the denoiser's own (`iter_samples`). A class-conditional denoiser gets the labels
    `seed_labels` (seed % label_dim). clamp: clip to [-1, 1] (images; never for points)."""
    seeds, recipe = [int(s) for s in seeds], dict(recipe or {})
    sampler, steps = recipe.pop("sampler", None), recipe.pop("steps", None)
    sigmas = recipe.pop("sigmas", None)
    labels = seed_labels(seeds, getattr(denoiser, "label_dim", 0))
    for x in iter_samples(denoiser, seeds, steps=steps, sampler=sampler, sigmas=sigmas, cond=labels,
                          device=device, batch=batch, **recipe):
        yield x.clamp(-1, 1) if clamp else x
