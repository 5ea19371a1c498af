"""Teachers: adapters from checkpoints people already have into the one denoiser interface."""

from .analytic import Gaussian, GaussianMixture, is_analytic_spec, load_analytic  # noqa: F401
from .diffusers import DiffusersDenoiser, load_diffusers, snapshot_from_diffusers  # noqa: F401
from .discrete import DiscreteVPDenoiser, ddim_timesteps, discrete_sigmas_for  # noqa: F401
from .guidance import CFGDenoiser  # noqa: F401
from .load import load_teacher  # noqa: F401
