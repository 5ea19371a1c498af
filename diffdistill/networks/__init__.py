"""Backbones we own: F(x_in [B,*shape], c_noise [B], class_labels one-hot [B,L] or None) -> [B,*shape].

Each backbone has `config() -> dict` with a 'name' key; `build_network(config)` rebuilds it.
  mlp   networks.mlp.MLP        toy data of shape (D,)
  unet  networks.unet.UNet      DDPM++ / NCSN++ (EDM's SongUNet names and shapes)
  adm   networks.adm.ADMUNet    ADM (EDM's DhariwalUNet names and shapes)
"""

from __future__ import annotations

import inspect

from ..errors import DiffdistillError

NETWORKS = ("mlp", "unet", "adm")


def network_class(name: str):
    """The backbone class registered under `name`."""
    if name == "mlp":
        from .mlp import MLP
        return MLP
    if name == "unet":
        from .unet import UNet
        return UNet
    if name == "adm":
        from .adm import ADMUNet
        return ADMUNet
    raise DiffdistillError(f"unknown network {name!r} ({', '.join(NETWORKS)})")


def build_network(config: dict):
    """Rebuild a backbone from its `config()`; unknown keys are errors."""
    config = dict(config)
    cls = network_class(config.pop("name", None))
    params = inspect.signature(cls).parameters
    unknown = sorted(set(config) - set(params))
    if unknown:
        raise DiffdistillError(f"network {cls.__name__}: unknown config keys {unknown}")
    return cls(**config)


def build_precond(config: dict):
    """A `Precond` denoiser from its config (io.BUILTIN_BUILDERS['precond'])."""
    from ..diffusion.denoiser import Precond, PrecondConfig
    net = build_network(config["network"])
    return Precond(net, config["shape"], config.get("label_dim", 0), PrecondConfig(**config["precond"]))

