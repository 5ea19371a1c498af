"""Backbones we own: F(x_in [B,*shape], c_noise [B], class_labels one-hot [B,L] or None) -> [B,*shape].

Each backbone has `config() -> dict` with a 'name' key; `build_network(config)` rebuilds it.
"""

from __future__ import annotations

from ..errors import DiffdistillError


def build_network(config: dict):
    config = dict(config)
    name = config.pop("name", None)
    if name == "mlp":
        from .mlp import MLP
        return MLP(**config)
    if name == "unet":
        from .unet import UNet
        return UNet(**config)
    if name == "songunet":
        from .edm_arch import SongUNet
        return SongUNet(**config)
    if name == "dhariwal":
        from .edm_arch import DhariwalUNet
        return DhariwalUNet(**config)
    raise DiffdistillError(f"unknown network {name!r} (mlp, unet, songunet, dhariwal)")


def _build_precond(config: dict):
    from ..diffusion.denoiser import Precond, PrecondConfig
    net = build_network(config["network"])
    return Precond(net, config["shape"], config.get("label_dim", 0), PrecondConfig(**config["precond"]))


def _register():
    from ..io import register_builder
    register_builder("precond")(_build_precond)


_register()
