"""Teachers: adapters from checkpoints people already have into the one denoiser interface."""

from . import analytic  # noqa: F401  (registers the 'gmm' builder)
from .analytic import Gaussian, GaussianMixture, is_analytic_spec, load_analytic  # noqa: F401
from .diffusers import DiffusersDenoiser, load_diffusers, snapshot_from_diffusers  # noqa: F401 ('diffusers')
from .discrete import DiscreteVPDenoiser, ddim_timesteps, discrete_sigmas_for  # noqa: F401
from .guidance import CFGDenoiser  # noqa: F401  (registers 'cfg')
from .load import load_teacher  # noqa: F401
