"""Named presets for training a teacher: the network, the loop settings, and what each should reach.

`toy` (2-D points, MLP), `digits` (sklearn 8x8 digits), `mnist` (28x28) and `cifar10` (EDM's DDPM++ recipe,
Karras et al. 2022; the official train.py). `build_network(preset, shape, label_dim)` makes the backbone;
`train_config(preset, ...)` the loop settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import DiffdistillError
from .train.loop import TrainConfig


@dataclass(frozen=True)
class Preset:
    """A teacher-training recipe."""

    name: str
    network: str                      # 'mlp' or a UNet preset of diffdistill.networks.unet (UNET_PRESETS)
    network_options: dict = field(default_factory=dict)  # overrides of the network's constructor arguments
    total_kimg: float = 200.0         # training length
    batch: int = 128                  # global batch
    lr: float = 1e-3                  # Adam learning rate
    warmup_kimg: float = 0.0          # linear LR warm-up
    grad_clip: float | None = None    # global-norm gradient clipping
    sigma_data: float = 0.5           # EDM data standard deviation (preconditioning and loss weight)
    ema_halflife_kimg: float = 10.0   # EMA half-life (EDM's rule, ramp-up 0.05)
    tick_kimg: float = 10.0           # stats line
    checkpoint_kimg: float = 100.0    # checkpoint for resumption
    snapshot_kimg: float = 0.0        # sampler-ready snapshots (0 = only RUN/model at the end)
    grid_kimg: float = 100.0          # sample grids
    grid_n: int = 64                  # samples per grid
    expect: str = ""                  # what a run of this preset should reach


PRESETS: dict[str, Preset] = {
    # 2-D toy data (toy:ring8, per-coordinate std 0.71): Heun-18 samples keep all 8 modes with fractions near
    # 1/8, most of them within 3 std (0.3) of a mode (tests/test_teacher.py, test_toy_teacher_keeps_all_eight_modes,
    # trains it and checks both). Quick on one CPU core.
    "toy": Preset("toy", "mlp", dict(hidden=128, num_layers=3), total_kimg=400, batch=512, lr=5e-3,
                  sigma_data=0.7, ema_halflife_kimg=20, tick_kimg=50, checkpoint_kimg=100, grid_kimg=200,
                  grid_n=1000, expect="all 8 ring modes, fractions 1/8 +- 0.015; ~90% within 0.3 of a mode"),
    # sklearn digits (8x8 grey, 1797 images, 10 classes, class-conditional): recognisable digits of the right
    # class in the Heun-18 grid from ~50 kimg on; 150 kimg = 1172 steps. Minutes on a CPU (a measured digits
    # teacher, its wall time and FID: BENCHMARKS.md, section 2).
    "digits": Preset("digits", "digits", {}, total_kimg=150, batch=128, lr=2e-3, ema_halflife_kimg=20,
                     tick_kimg=20, checkpoint_kimg=50, grid_kimg=50, grid_n=100,
                     expect="recognisable digits of the right class in the Heun-18 grid"),
    # MNIST 28x28 (1.75M parameters). 200 kimg on a CPU (hours) gives clean, recognisable digits; its wall time,
    # Heun-18 FID in diffdistill's own MNIST-classifier features (not an Inception FID) and class accuracy are in
    # BENCHMARKS.md, section 3. The preset's 2 Mimg is for a GPU (not measured here).
    "mnist": Preset("mnist", "mnist", {}, total_kimg=2000, batch=128, lr=1e-3, warmup_kimg=50,
                    ema_halflife_kimg=50, tick_kimg=20, checkpoint_kimg=200, snapshot_kimg=500, grid_kimg=100,
                    grid_n=100, expect="clean digits; at 200 kimg own-classifier FID ~27 (Heun 18)"),
    # 32x32 RGB (CIFAR-10) on a CPU: a 1.26M-parameter UNet (one block per level) instead of EDM's 56M. Trained
    # on the 10k CIFAR-10 test images (xflip), 120 kimg gives natural colours and layouts without recognisable
    # objects; its wall time and Heun-18 FID in diffdistill's own CIFAR-10 classifier features (not an Inception
    # FID) are in BENCHMARKS.md, section 3. The preset's 300 kimg was not run here.
    "cifar10-small": Preset("cifar10-small", "cifar10-small", {}, total_kimg=300, batch=128, lr=1e-3,
                            warmup_kimg=10, ema_halflife_kimg=20, tick_kimg=10, checkpoint_kimg=50,
                            grid_kimg=50, grid_n=64,
                            expect="natural colours and layouts; at 120 kimg own-classifier FID ~15 (Heun 18)"),
    # EDM CIFAR-10 DDPM++ recipe (EDM's train.py): batch 512, Adam lr 1e-3 with 10 Mimg warm-up, EMA half-life 500 kimg,
    # dropout 0.13, 200 Mimg. EDM reports FID 1.97 (uncond) / 1.79 (cond) with 18-step Heun (35 NFE) when trained
    # with its augmentation pipeline (p=0.12), which this library does not implement: expect somewhat worse
    # (use xflip in the data spec).
    "cifar10": Preset("cifar10", "cifar10", {}, total_kimg=200_000, batch=512, lr=1e-3, warmup_kimg=10_000,
                      ema_halflife_kimg=500, tick_kimg=50, checkpoint_kimg=5000, snapshot_kimg=5000,
                      grid_kimg=5000, grid_n=64, expect="FID ~2-3 (EDM with augmentation: 1.97 uncond)"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise DiffdistillError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


# The generic architecture options of `train-teacher` and the constructor argument each sets, per network kind
# (None: the kind has no such setting).
NETWORK_OPTIONS = {
    "channels": {"unet": "model_channels", "mlp": "hidden"},
    "channel_mult": {"unet": "channel_mult", "mlp": None},
    "blocks": {"unet": "num_blocks", "mlp": "num_layers"},
    "attn": {"unet": "attn_resolutions", "mlp": None},
    "dropout": {"unet": "dropout", "mlp": None},
}


def network_options(args) -> dict:
    """The architecture options given on a command line (argparse namespace) or in a teacher-training config,
    without the unset ones."""
    return {k: getattr(args, k) for k in NETWORK_OPTIONS if getattr(args, k, None) is not None}


def default_preset(shape: tuple[int, ...]) -> str:
    """The preset for data of sample shape `shape`: toy for points, digits up to 8x8, mnist up to 28x28, else
    cifar10."""
    if len(shape) == 1:
        return "toy"
    size = max(shape[1:])
    return "digits" if size <= 8 else "mnist" if size <= 28 else "cifar10"


def int_list(text: str) -> list[int]:
    """'1,2,2' -> [1, 2, 2]; 'none' -> [] (--channel-mult, --attn). ValueError when not positive integers."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"expected comma-separated positive integers (or 'none'), got {text!r}")
    return values


def _constructor_overrides(preset: Preset, options: dict) -> dict:
    kind = "mlp" if preset.network == "mlp" else "unet"
    out = dict(preset.network_options)
    for name, value in options.items():
        if name not in NETWORK_OPTIONS:
            raise DiffdistillError(f"unknown network option {name!r} (known: {', '.join(NETWORK_OPTIONS)})")
        arg = NETWORK_OPTIONS[name][kind]
        if arg is None:
            raise DiffdistillError(f"--{name.replace('_', '-')} does not apply to the {kind.upper()} of preset "
                                   f"{preset.name!r}")
        if name in ("channels", "blocks") and not value >= 1:
            raise DiffdistillError(f"--{name} must be at least 1, got {value}")
        if name == "channel_mult" and (not value or min(value) < 1):
            raise DiffdistillError(f"--channel-mult needs one multiplier >= 1 per level, got {value}")
        if name == "dropout" and not 0 <= value < 1:
            raise DiffdistillError(f"--dropout must lie in [0, 1), got {value}")
        out[arg] = value
    return out


def build_network(preset: Preset | str, shape, label_dim: int = 0, **options) -> nn.Module:
    """The preset's backbone for samples of `shape` ((D,) for the MLP, (C, H, W) with H == W for UNets);
    `options` (channels, channel_mult, blocks, attn, dropout) override the preset's architecture."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    shape = tuple(int(s) for s in shape)
    kwargs = _constructor_overrides(preset, options)
    if preset.network == "mlp":
        from .networks.mlp import MLP

        if len(shape) != 1:
            raise DiffdistillError(f"preset {preset.name!r} is for flat points (shape (D,)), the data has "
                                   f"shape {shape}; use digits, mnist or cifar10")
        return MLP(dim=shape[0], label_dim=label_dim, **kwargs)
    from .networks.unet import unet_preset

    if len(shape) != 3 or shape[1] != shape[2]:
        raise DiffdistillError(f"preset {preset.name!r} is for square images (C, H, H), the data has shape {shape}; "
                               "use --preset toy for points")
    what = f"preset {preset.name!r} with {_cli(options)}" if options else f"preset {preset.name!r}"
    try:
        net = unet_preset(preset.network, shape[1], shape[0], label_dim, **kwargs)
        if options:  # a custom architecture: one forward pass finds channel counts GroupNorm cannot split
            with torch.no_grad():
                net(torch.zeros(1, *shape), torch.zeros(1), torch.zeros(1, label_dim) if label_dim else None)
    except (ValueError, AssertionError, RuntimeError) as e:
        raise DiffdistillError(f"{what}: not a valid UNet for images of shape {shape} "
                               f"({str(e).splitlines()[0]})") from None
    return net


def _cli(options: dict) -> str:
    def value(v):
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    return " ".join(f"--{k.replace('_', '-')} {value(v) if v != [] else 'none'}" for k, v in options.items())


def train_config(preset: Preset | str, out: str, **overrides) -> TrainConfig:
    """Loop settings of a preset for the run directory `out`; `overrides` replace TrainConfig fields."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    cfg = TrainConfig(out=out, total_kimg=preset.total_kimg, batch=preset.batch,
                      ema_halflife_kimg=preset.ema_halflife_kimg, tick_kimg=preset.tick_kimg,
                      checkpoint_kimg=preset.checkpoint_kimg, snapshot_kimg=preset.snapshot_kimg,
                      grid_kimg=preset.grid_kimg, grid_n=preset.grid_n)
    return replace(cfg, **overrides)
