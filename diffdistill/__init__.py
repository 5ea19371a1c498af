"""diffdistill: distil diffusion models into one- to four-step generators.

The public API; everything else is reachable through the subpackages (see docs/architecture.md).
"""

__version__ = "0.1.0"

from . import metrics  # noqa: F401
from .data import open_dataset
from .diffusion.denoiser import Denoiser, Precond, PrecondConfig
from .diffusion.schedules import karras_sigmas
from .io import load_snapshot, save_snapshot
from .methods.base import Method
from .samplers import (
    iter_samples,
    sample,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
    sample_multistep,
    sample_onestep,
)
from .teachers import CFGDenoiser, Gaussian, GaussianMixture, load_analytic, load_teacher
from .train.loop import TrainConfig, train
from .train.stats import save_image_grid, save_scatter

__all__ = [
    "CFGDenoiser", "Denoiser", "Gaussian", "GaussianMixture", "Method", "Precond", "PrecondConfig", "TrainConfig",
    "iter_samples", "karras_sigmas", "load_analytic", "load_snapshot", "load_teacher", "metrics", "open_dataset",
    "sample", "sample_ddpm", "sample_dpmpp_2m", "sample_euler", "sample_heun", "sample_multistep", "sample_onestep",
    "save_image_grid", "save_scatter", "save_snapshot", "train",
]
