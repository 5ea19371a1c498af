"""diffdistill: distil diffusion models into one- to four-step generators."""

__version__ = "0.1.0"
