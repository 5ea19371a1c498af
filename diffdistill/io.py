"""Saving and loading data, never code: weights as safetensors plus a JSON config, written atomically.

A *snapshot* is a directory holding `model.safetensors` (may be absent for weightless analytic denoisers) and
`model.json` = {"denoiser": <Denoiser.config()>, "sampling": <recipe>, "meta": {...}}.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DiffdistillError

SNAPSHOT_JSON = "model.json"
_UMASK = os.umask(0)
os.umask(_UMASK)
SNAPSHOT_WEIGHTS = "model.safetensors"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(tmp_path)`, fsync it, then rename it over `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode a plain open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DiffdistillError(f"{path}: not a readable safetensors file ({e})") from None


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where, what: str = "the config"):
    """Load `state` into `module` after checking that every tensor is there with its shape (no silent skips)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DiffdistillError(f"{where}: weights do not match {what} (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise DiffdistillError(f"{where}: tensor {k} has shape {tuple(v.shape)}, {what} needs "
                                   f"{tuple(expected[k].shape)}")
    module.load_state_dict(state)
    return module


# --------------------------------------------------------------------------------------------------
# Rebuilding denoisers from their JSON config

_BUILDERS: dict[str, Callable[[dict], torch.nn.Module]] = {}


def register_builder(type_name: str):
    """Decorator: `fn(config) -> Denoiser` for configs with config['type'] == type_name."""
    def deco(fn):
        _BUILDERS[type_name] = fn
        return fn
    return deco


def build_denoiser(config: dict):
    """Rebuild a denoiser (random or empty weights) from its `config()`."""
    from . import networks, teachers  # noqa: F401  (registers builders)
    from .methods import kd  # noqa: F401  (registers 'kd-onestep', the paper's student of eps teachers)

    kind = config.get("type")
    if kind not in _BUILDERS:
        raise DiffdistillError(f"unknown denoiser type {kind!r} in config (known: {sorted(_BUILDERS)})")
    return _BUILDERS[kind](config)


def check_saveable(denoiser) -> dict:
    """Refuse, before any training, a denoiser that `save_snapshot` could not write or `load_snapshot` could not
    rebuild; returns its config. A `Precond` needs a backbone with `config() -> {'name': <a registered network>,
    **constructor kwargs}` (`networks.build_network` rebuilds it); other denoisers need `config()` with a 'type'
    that `register_builder` knows (see docs/own_model.md)."""
    what = type(denoiser).__name__
    try:
        config = denoiser.config()
    except (NotImplementedError, TypeError, AttributeError) as e:
        backbone = getattr(denoiser, "backbone", None)
        if backbone is not None and not callable(getattr(backbone, "config", None)):
            raise DiffdistillError(f"cannot save {what}: backbone {type(backbone).__name__} has no config(); "
                                   "add `def config(self): return dict(name=..., **constructor "
                                   "kwargs)` naming a network build_network knows (see docs/own_model.md)") from None
        raise DiffdistillError(f"cannot save {what}: its config() fails ({type(e).__name__}: {e}); add a config() "
                               "that returns a JSON dict with a registered 'type' (see docs/own_model.md)") from None
    try:
        json.dumps(config)
    except (TypeError, ValueError) as e:
        raise DiffdistillError(f"cannot save {what}: its config() is not JSON ({e})") from None
    try:
        try:
            with torch.device("meta"):       # the structure only, without allocating weights
                build_denoiser(config)
        except (RuntimeError, NotImplementedError):   # a builder that reads tensor values: build it for real
            build_denoiser(config)
    except (DiffdistillError, ValueError, TypeError, KeyError) as e:
        raise DiffdistillError(f"cannot save {what}: a snapshot could not be loaded again, its config() is not "
                               f"rebuildable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return config


def save_snapshot(path: str | Path, denoiser, sampling: dict | None = None, meta: dict | None = None) -> Path:
    """Write a sampler-ready snapshot directory (weights first, then the JSON that marks it complete)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in denoiser.state_dict().items()}
    if state:
        atomic_save_tensors(path / SNAPSHOT_WEIGHTS, state)
    atomic_write_json(path / SNAPSHOT_JSON, dict(denoiser=denoiser.config(), sampling=sampling or {},
                                                 meta=meta or {}))
    return path


def load_snapshot(path: str | Path, device="cpu"):
    """(denoiser in eval mode, sampling recipe, meta) from a snapshot directory. The denoiser also carries the
    recipe as its `sampling` attribute, which `samplers.sample` follows when given no sampler, steps or sigmas."""
    path = Path(path)
    cfg_path = path / SNAPSHOT_JSON
    if not cfg_path.is_file():
        raise DiffdistillError(f"{path}: not a diffdistill snapshot (no {SNAPSHOT_JSON})")
    try:
        cfg = json.loads(cfg_path.read_text())
        den_cfg = cfg["denoiser"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DiffdistillError(f"{cfg_path}: malformed snapshot config ({e})") from None
    denoiser = build_denoiser(den_cfg)
    if denoiser.state_dict():
        load_state_strict(denoiser, load_tensors(path / SNAPSHOT_WEIGHTS), path / SNAPSHOT_WEIGHTS)
    sampling = cfg.get("sampling") or {}
    denoiser.sampling = dict(sampling) if isinstance(sampling, dict) else {}
    return denoiser.to(device).eval().requires_grad_(False), sampling, cfg.get("meta", {})
