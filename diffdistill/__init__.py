"""diffdistill: distil diffusion models into one- to four-step generators.

The public API; everything else is reachable through the subpackages (see docs/architecture.md). The names are
imported on first use (`dd.sample` imports the samplers then; `_lazy`), so that `import diffdistill` and the
command line's start (`diffdistill --help`) do not pay for torch, scipy and every subpackage up front.
"""

from ._lazy import install

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "CFGDenoiser": ".teachers",
    "Denoiser": ".diffusion.denoiser",
    "DistillResult": ".api",
    "Gaussian": ".teachers",
    "GaussianMixture": ".teachers",
    "Method": ".methods.base",
    "Precond": ".diffusion.denoiser",
    "PrecondConfig": ".diffusion.denoiser",
    "TrainConfig": ".train.loop",
    "iter_samples": ".samplers",
    "distill": ".api",
    "karras_sigmas": ".diffusion.schedules",
    "load_analytic": ".teachers",
    "load_snapshot": ".io",
    "load_teacher": ".teachers",
    "methods": ".methods",
    "metrics": ".metrics",
    "open_dataset": ".data",
    "sample": ".samplers",
    "sample_ddpm": ".samplers",
    "sample_dpmpp_2m": ".samplers",
    "sample_euler": ".samplers",
    "sample_heun": ".samplers",
    "sample_multistep": ".samplers",
    "sample_onestep": ".samplers",
    "save_image_grid": ".train.stats",
    "save_scatter": ".train.stats",
    "save_snapshot": ".io",
    "train": ".train.loop",
    "train_teacher": ".api",
}
__all__ = sorted(_API)

install(__name__, _API, modules=("methods", "metrics"))
del install
