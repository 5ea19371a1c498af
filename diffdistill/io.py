"""Saving and loading data, never code: weights as safetensors plus a JSON config, written atomically.

A *snapshot* is a directory holding `model.safetensors` (may be absent for weightless analytic denoisers) and
`model.json` = {"denoiser": <Denoiser.config()>, "sampling": <recipe>, "meta": {...}}.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import DiffdistillError

SNAPSHOT_JSON = "model.json"
SNAPSHOT_WEIGHTS = "model.safetensors"
# A run directory's snapshots: RUN/model (a finished run's export), RUN/latest (an interrupted one's, newer than
# RUN/model when both exist: the loop deletes it when the run finishes or starts over).
MODEL_DIR, LATEST_DIR = "model", "latest"


def umask() -> int:
    """The process's file-mode creation mask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# errno values meaning the file system cannot take the file: full, over quota, file too large, read-only.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}


class CannotWrite(DiffdistillError):
    """A write that failed for want of room (disk full, quota, read-only file system; OSError or safetensors'
    SafetensorError). Nothing was left behind and a file that was at `path` before is intact."""

    def __init__(self, path: str | Path, reason: str, existed: bool):
        self.path, self.reason = Path(path), reason
        prior = f"the previous {self.path.name} is intact" if existed else "nothing was left behind"
        super().__init__(f"cannot write {path} ({reason}); {prior}")


def _no_room(e: BaseException) -> str | None:
    """The reason when `e` is a failed write for want of room, else None."""
    if isinstance(e, SafetensorError):   # e.g. IoError(Os { code: 28, kind: StorageFull, message: "No space ..." })
        found = re.search(r'message: "([^"]*)"', str(e))
        return found.group(1) if found else (str(e).splitlines() or ["SafetensorError"])[0]
    if isinstance(e, OSError) and e.errno in _NO_ROOM:
        return e.strerror or os.strerror(e.errno)
    return None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write a file through `write(tmp_path)`, fsync it, then rename it over `path` (never half-written).

    The final name is replaced, never written through: a symbolic link at `path` is replaced by the file. A disk
    that is full raises `CannotWrite` (one line naming the file), with no temp file left behind."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _no_room(e) is not None:
            raise CannotWrite(path, _no_room(e), existed) from None
        raise
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; give the file the mode a plain open() would
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        reason = _no_room(e)
        if reason is not None:
            raise CannotWrite(path, reason, existed) from None
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its header checked first (`guard.safetensors_header`: a regular file,
    every tensor's declared bytes inside it)."""
    from .guard import safetensors_header

    safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (safetensors raises several types on damaged files)
        raise DiffdistillError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") \
            from None


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
# The library's own denoiser types: config['type'] -> "module:function" that rebuilds it, imported when a config
# of that type is first rebuilt (so no import elsewhere has to happen first); `register_builder` adds your own.
BUILTIN_BUILDERS = {
    "precond": "diffdistill.networks:build_precond",
    "boundary": "diffdistill.diffusion.denoiser:build_boundary",
    "kd-onestep": "diffdistill.methods.kd:build_paper_student",
    "cfg": "diffdistill.teachers.guidance:build_cfg",
    "gmm": "diffdistill.teachers.analytic:build_gmm",
    "diffusers": "diffdistill.teachers.diffusers:build_diffusers",
}


def register_builder(type_name: str):
    """Decorator: `fn(config) -> Denoiser` for configs with config['type'] == type_name."""
    def deco(fn):
        _BUILDERS[type_name] = fn
        return fn
    return deco


def build_denoiser(config: dict):
    """Rebuild a denoiser (random or empty weights) from its `config()`."""
    import importlib

    kind = config.get("type")
    if kind not in _BUILDERS and kind in BUILTIN_BUILDERS:
        module, name = BUILTIN_BUILDERS[kind].split(":")
        _BUILDERS[kind] = getattr(importlib.import_module(module), name)
    if kind not in _BUILDERS:
        raise DiffdistillError(f"unknown denoiser type {kind!r} in config (known: "
                               f"{sorted({*_BUILDERS, *BUILTIN_BUILDERS})})")
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
    from .guard import lexists
    from .schema import SNAPSHOT, load_json

    path = Path(path)
    cfg_path = path / SNAPSHOT_JSON
    if not lexists(cfg_path):
        raise DiffdistillError(f"{path}: not a diffdistill snapshot (no {SNAPSHOT_JSON})")
    cfg = load_json(cfg_path, SNAPSHOT, "snapshot config")   # every field's type and range (schema.SNAPSHOT)
    denoiser = load_denoiser(cfg["denoiser"], path / SNAPSHOT_WEIGHTS, cfg_path)
    sampling = cfg.get("sampling") or {}
    denoiser.sampling = dict(sampling)
    denoiser.source = str(path)   # named by errors of what it produces (samplers.iter_samples)
    return denoiser.to(device).eval().requires_grad_(False), sampling, cfg.get("meta") or {}


def run_snapshot(run_dir: str | Path) -> Path | None:
    """The snapshot a sampler should read in a run directory: RUN/latest/ when the run was interrupted (it is
    then the newest export), else RUN/model/; None when the run has neither."""
    for name in (LATEST_DIR, MODEL_DIR):
        if (Path(run_dir) / name / SNAPSHOT_JSON).is_file():
            return Path(run_dir) / name
    return None


def find_snapshot(spec: str | Path, *, unfinished: bool = True) -> Path | None:
    """The snapshot directory that `spec` names: a snapshot directory (or its model.json), or a run directory's
    `run_snapshot` (RUN/latest when the run was interrupted, else RUN/model; with unfinished=False RUN/model
    only). None when `spec` names no snapshot: an analytic spec, a diffusers folder, a data set, a path that does
    not exist. The one resolution of every command that takes a run or a snapshot (sample, eval, export) and of
    `teachers.load_teacher`."""
    path = Path(spec)
    if path.name == SNAPSHOT_JSON and path.is_file():
        path = path.parent
    if not path.is_dir():
        return None
    if (path / SNAPSHOT_JSON).is_file():
        return path
    if unfinished:
        return run_snapshot(path)
    return path / MODEL_DIR if (path / MODEL_DIR / SNAPSHOT_JSON).is_file() else None


class BuildErrors:
    """Errors of a builder run on a config read from `where` become one line naming `where` (a builder meets a
    config that passed the schema but whose values do not fit together, e.g. a resolution a network's levels do
    not divide)."""

    def __init__(self, where):
        self.where = str(where)

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if e is None or not isinstance(e, Exception):
            return False
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        if isinstance(e, DiffdistillError):
            if self.where in msg:
                return False
            raise DiffdistillError(f"{self.where}: {msg}") from None
        if isinstance(e, ValueError | TypeError | KeyError | IndexError | RuntimeError | NotImplementedError
                      | AssertionError | ArithmeticError | AttributeError | RecursionError):
            raise DiffdistillError(f"{self.where}: cannot build the denoiser of this config "
                                   f"({type(e).__name__}: {msg})") from None
        return False


def _meta_build(config: dict, where):
    """The denoiser of `config` on the meta device (shapes, no memory), or None when its builder needs real
    tensor values (an analytic mixture)."""
    with BuildErrors(where):
        try:
            with torch.device("meta"):
                return build_denoiser(config)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" in str(e).lower():
                return None
            raise


def _meta_forward(den, where) -> None:
    """Run the meta-device denoiser on one sample of its shape: a network that does not take its samples (a
    config's shape against its network's size) is found now, not at sampling time. Operations that meta tensors
    cannot run skip the check."""
    shape = tuple(den.shape)
    try:
        with torch.no_grad():
            out = den(torch.zeros(1, *shape, device="meta"), torch.ones(1, device="meta"))
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if isinstance(e, DiffdistillError) or "meta" in msg.lower():   # not a shape question: no check
            return

        raise DiffdistillError(f"{where}: the network of this config does not take samples of shape {shape} "
                               f"({type(e).__name__}: {msg})") from None
    if isinstance(out, torch.Tensor) and tuple(out.shape) != (1, *shape):
        raise DiffdistillError(f"{where}: the network of this config maps samples of shape {shape} to "
                               f"{tuple(out.shape)[1:]}")


def load_denoiser(config: dict, weights: str | Path, where) -> torch.nn.Module:
    """The denoiser of a (schema-checked) config with its weights, checked before anything is allocated: the
    network is first built on the meta device, its size compared with the machine's memory and its tensors'
    names and shapes with the weights file's header; then built for real, the weights loaded and checked finite.
    Every error names `where` (the config file) or the weights file."""
    from .guard import FLOAT_DTYPES, check_alloc, check_finite, safetensors_header

    weights = Path(weights)
    meta = _meta_build(config, where)
    if meta is not None:
        tensors = list(meta.parameters()) + list(meta.buffers())
        check_alloc(sum(t.numel() * t.element_size() for t in tensors), where, "the network of this config")
        expected = meta.state_dict()
        if expected:
            header = safetensors_header(weights)
            missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
            if missing or unexpected:
                raise DiffdistillError(f"{weights}: weights do not match {where} (missing {missing[:3]}, "
                                       f"unexpected {unexpected[:3]})")
            for k, (dtype, shape) in header.items():
                if shape != tuple(expected[k].shape):
                    raise DiffdistillError(f"{weights}: tensor {k} has shape {shape}, the config needs "
                                           f"{tuple(expected[k].shape)} ({where})")
                if expected[k].is_floating_point() and dtype not in FLOAT_DTYPES:
                    raise DiffdistillError(f"{weights}: tensor {k} has dtype {dtype}, expected floating point")
        _meta_forward(meta, where)
        del meta, tensors, expected
    with BuildErrors(where):
        denoiser = build_denoiser(config)
    if denoiser.state_dict():
        state = load_tensors(weights)
        check_finite(state, weights)
        load_state_strict(denoiser, state, weights)
    return denoiser

