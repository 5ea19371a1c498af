"""Convert EDM pickles (NVlabs/edm network snapshots and published models) into diffdistill snapshots.

EDM pickles store each network with its Python source (`torch_utils.persistence`): plain `pickle.load`
would execute that source. We never do. A restricted unpickler resolves only an allow-list of data
constructors (tensor/storage rebuilders, OrderedDict, numpy scalars/arrays, torch containers); EDM's
persistence entry point `torch_utils.persistence._reconstruct_persistent_obj` is replaced by a stub that
records the class name, the constructor arguments and the object state, and ignores the embedded source.
From those records we rebuild our own `UNet` / `ADMUNet` and `Precond` with the same arguments, copy every
tensor (no missing, no unexpected, equal shapes: EDM's own `misc.copy_params_and_buffers(require_all=False)`
silently skips mismatched names) and save a safetensors + JSON snapshot.
The conversion happens once; training and sampling never read a pickle.
"""

from __future__ import annotations

import collections
import copyreg
import hashlib
import inspect
import io
import math
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..diffusion.denoiser import Precond, PrecondConfig
from ..errors import DiffdistillError
from ..guard import check_alloc, check_finite, memory_budget, read_bytes
from ..io import BuildErrors
from ..networks.adm import ADMUNet
from ..networks.unet import UNet
from ..schema import NETWORK, PRECOND, check

# Default sampling recipe of a converted teacher: EDM's deterministic Heun sampler, 18 steps (35 NFE).
EDM_SAMPLING = {"sampler": "heun", "steps": 18}

# EDM network classes -> our backbones with the same constructor arguments and state_dict names.
_NETWORKS = {"SongUNet": UNet, "DhariwalUNet": ADMUNet}
_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")


# --------------------------------------------------------------------------------------------------
# What the restricted unpickler builds instead of EDM's objects: plain records, no code.


@dataclass
class PersistentRecord:
    """An EDM persistent object as data: its class name, constructor arguments and `__dict__` state."""

    class_name: str                             # e.g. 'EDMPrecond', 'SongUNet', 'UNetBlock'
    init_args: tuple | None                     # positional constructor arguments (None if not recorded)
    init_kwargs: dict | None                    # keyword constructor arguments (None if not recorded)
    state: dict = field(default_factory=dict)   # the object's attributes (_parameters, _buffers, _modules)
    source_chars: int = 0                       # length of the embedded module source (never executed)


def _reconstruct_persistent_stub(meta):
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj: records, never executes."""
    if not isinstance(meta, dict) or not isinstance(meta.get("class_name"), str):
        raise ValueError("malformed persistent-object record (no class_name)")
    if meta.get("type", "class") != "class":
        raise ValueError(f"unsupported persistent-object type {meta.get('type')!r}")
    state = meta.get("state") or {}
    if not isinstance(state, dict):
        raise ValueError(f"state of {meta['class_name']} is not a dict")
    src = meta.get("module_src")
    return PersistentRecord(
        class_name=meta["class_name"],
        init_args=state.get("_init_args"),
        init_kwargs=state.get("_init_kwargs"),
        state=state,
        source_chars=len(src) if isinstance(src, str) else 0,
    )


class ContainerRecord:
    """A torch container module (ModuleDict, ModuleList, Sequential) as data: its `__dict__` state."""

    class_name = "Module"

    def __init__(self, *args, **kwargs):  # NEWOBJ may pass nothing; the state arrives via __setstate__
        self.state: dict = {}

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise ValueError(f"state of {self.class_name} is not a dict")
        self.state = state


def _container(name: str) -> type:
    return type(name + "Record", (ContainerRecord,), {"class_name": name})


class _EasyDict(dict):
    """Stands in for dnnlib.util.EasyDict (a dict with attribute access)."""


def _load_storage_from_bytes(data):
    """torch.storage._load_from_bytes, but through torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("tensor storage is not a byte string")
    import warnings

    with warnings.catch_warnings():   # torch warns (several lines) about odd protocols of damaged storages
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _rebuild_parameter(data, requires_grad, backward_hooks, *state):
    """torch._utils._rebuild_parameter(_with_state): we keep the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise ValueError("parameter data is not a tensor")
    return data


def _numpy_attr(module_names, name):
    for module_name in module_names:
        try:
            module = __import__(module_name, fromlist=[name])
            return getattr(module, name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(name)


_NP_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")

_ALLOWED: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_stub,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
for _module in ("numpy._core.multiarray", "numpy.core.multiarray"):
    _ALLOWED[(_module, "scalar")] = _numpy_attr(_NP_MULTIARRAY, "scalar")
    _ALLOWED[(_module, "_reconstruct")] = _numpy_attr(_NP_MULTIARRAY, "_reconstruct")
for _name in ("ModuleDict", "ModuleList", "Sequential"):
    _ALLOWED[("torch.nn.modules.container", _name)] = _container(_name)
# copyreg._reconstructor(cls, base, state) calls base.__new__/__init__: only on classes resolved above.


class _RefusedGlobal(DiffdistillError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals above; anything else is refused before it can be called."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        target = _ALLOWED.get((module, name))
        if target is None:
            raise _RefusedGlobal(f"{self.path}: refusing to load global {module}.{name} (not allowed in an "
                                 f"EDM network pickle; nothing was executed)")
        return target

    def persistent_load(self, pid):
        raise _RefusedGlobal(f"{self.path}: unexpected persistent id in pickle (not an EDM network pickle)")


def read_edm_pickle(path: str | Path):
    """Unpickle an EDM pickle as data (records instead of objects), without executing anything from it."""
    path = Path(path)
    # Read whole first (a FIFO or a device is refused, the size is checked against memory): unpickling from
    # memory, a length the pickle declares beyond its end is "truncated", never a huge allocation.
    data = read_bytes(path, "EDM pickle", memory_budget())
    try:
        with io.BytesIO(data) as f:
            return _RestrictedUnpickler(f, path).load()
    except DiffdistillError:
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise DiffdistillError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {_line(e)})") from None
    except MemoryError:   # a length field larger than memory: the unpickler allocates before it reads
        raise DiffdistillError(f"{path}: corrupt pickle (it declares an object larger than this machine's "
                               "memory)") from None
    except Exception as e:  # malformed data reaching an allow-listed constructor
        raise DiffdistillError(f"{path}: unreadable EDM pickle ({type(e).__name__}: {_line(e)})") from None


def _line(e: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters."""
    return str(e).splitlines()[0][:200] if str(e) else ""


# --------------------------------------------------------------------------------------------------
# From records to our networks


def _module_state(record, path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flatten a record tree into a state_dict: parameters, persistent buffers, then children, recursively."""
    if not isinstance(record, (PersistentRecord, ContainerRecord)):
        where = prefix.rstrip(".") or "<root>"
        raise DiffdistillError(f"{path}: module {where} is a {type(record).__name__}, not a network module")
    state = record.state
    out: dict[str, torch.Tensor] = {}
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, tensor in (state.get(group) or {}).items():
            if tensor is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(tensor, torch.Tensor):
                raise DiffdistillError(f"{path}: {prefix}{name} is a {type(tensor).__name__}, not a tensor")
            out[prefix + name] = tensor
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(_module_state(child, path, f"{prefix}{name}."))
    return out


def _bind_kwargs(record: PersistentRecord, cls, path: Path) -> dict:
    """The constructor arguments recorded for an EDM object, as keyword arguments of `cls`."""
    if record.init_kwargs is None:
        raise DiffdistillError(f"{path}: {record.class_name} has no recorded constructor arguments")
    try:
        bound = inspect.signature(cls).bind(*(record.init_args or ()), **dict(record.init_kwargs))
    except TypeError as e:
        raise DiffdistillError(f"{path}: cannot rebuild {record.class_name} as {cls.__name__} ({e})") \
            from None
    return dict(bound.arguments)


def _as_json(value):
    """Recorded EDM arguments as JSON-safe values (numpy scalars -> Python, non-finite floats -> strings)."""
    if isinstance(value, dict):
        return {str(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _precond_config(record: PersistentRecord, path: Path) -> PrecondConfig:
    """Our PrecondConfig for an EDM EDMPrecond / VPPrecond / VEPrecond (Karras et al. 2022, Table 1).

    The supported range is EDM's sampler default [0.002, 80] clamped to the wrapper's own range, as
    generate.py does (sigma_min = max(0.002, net.sigma_min), sigma_max = min(80, net.sigma_max)).
    """
    state = record.state
    kwargs = record.init_kwargs or {}

    def attr(name, default):
        value = state.get(name, kwargs.get(name, default))
        return float(value)

    sigma_min = max(0.002, attr("sigma_min", 0.0))
    sigma_max = min(80.0, attr("sigma_max", math.inf))
    if record.class_name == "EDMPrecond":
        return PrecondConfig(kind="edm", sigma_data=attr("sigma_data", 0.5), sigma_min=sigma_min,
                             sigma_max=sigma_max)
    if record.class_name == "VPPrecond":
        # Our 'vp' kind uses EDM's default VP schedule (schedules.vp_sigma_inv) with M = 1000.
        for name, default in (("beta_d", 19.9), ("beta_min", 0.1), ("M", 1000)):
            if not math.isclose(attr(name, default), default):
                raise DiffdistillError(f"{path}: VPPrecond with {name}={attr(name, default)} is not "
                                       f"supported (only the default {default})")
        return PrecondConfig(kind="vp", prediction="eps", sigma_min=sigma_min, sigma_max=sigma_max)
    return PrecondConfig(kind="ve", sigma_min=sigma_min, sigma_max=sigma_max)


def denoiser_from_edm_pickle(path: str | Path, key: str = "ema") -> tuple[Precond, dict]:
    """(our Precond with every EDM tensor copied, meta) from an EDM pickle; nothing from the file is run."""
    path = Path(path)
    data = read_edm_pickle(path)
    if not isinstance(data, dict) or key not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise DiffdistillError(f"{path}: not an EDM network pickle (no {key!r} network; found {found})")
    top = data[key]
    if not isinstance(top, PersistentRecord):
        raise DiffdistillError(f"{path}: {key!r} is a {type(top).__name__}, not an EDM network")
    if top.class_name == "iDDPMPrecond":
        raise DiffdistillError(f"{path}: iDDPMPrecond networks are not supported (EDMPrecond, VPPrecond, "
                               f"VEPrecond are)")
    if top.class_name not in _PRECONDS:
        raise DiffdistillError(f"{path}: {key!r} is an EDM {top.class_name}, expected one of "
                               f"{', '.join(_PRECONDS)}")
    model = (top.state.get("_modules") or {}).get("model")
    if not isinstance(model, PersistentRecord) or model.class_name not in _NETWORKS:
        name = model.class_name if isinstance(model, PersistentRecord) else type(model).__name__
        raise DiffdistillError(f"{path}: {top.class_name}.model is {name}, expected SongUNet or DhariwalUNet")

    # Rebuild our backbone with the recorded constructor arguments of EDM's network: their types and ranges
    # first (schema.NETWORK), then on the meta device (sizes, no memory), then for real.
    net_cls = _NETWORKS[model.class_name]
    net_kwargs = _bind_kwargs(model, net_cls, path)
    check({"name": "unet" if net_cls is UNet else "adm", **_as_json(net_kwargs)}, NETWORK, path,
          f"EDM pickle ({model.class_name}'s arguments)")
    with BuildErrors(path):
        res = int(top.state.get("img_resolution", net_kwargs["img_resolution"]))
        channels = int(top.state.get("img_channels", net_kwargs["in_channels"]))
        label_dim = int(top.state.get("label_dim", net_kwargs.get("label_dim", 0)))
        precond = _precond_config(top, path)
    check(asdict(precond), PRECOND, path, f"EDM pickle ({top.class_name}'s noise levels)")
    if (net_kwargs["img_resolution"], net_kwargs["in_channels"], net_kwargs["out_channels"],
            net_kwargs.get("label_dim", 0)) != (res, channels, channels, label_dim):
        raise DiffdistillError(f"{path}: {model.class_name} arguments do not match its {top.class_name} "
                               f"(resolution {res}, channels {channels}, labels {label_dim})")
    try:
        with torch.device("meta"):
            sizes = net_cls(**net_kwargs)
        check_alloc(sum(p.numel() * p.element_size() for p in sizes.parameters()), path,
                    f"{net_cls.__name__} with these arguments")
        del sizes
        backbone = net_cls(**net_kwargs)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise DiffdistillError(f"{path}: cannot build {net_cls.__name__} from {model.class_name}'s arguments "
                               f"({_line(e)})") from None
    denoiser = Precond(backbone, (channels, res, res), label_dim, precond)

    # Copy every tensor: EDM's `model.X` is our `backbone.X`; any mismatch is an error (EDM's own copy with
    # require_all=False would skip it silently).
    source = _module_state(top, path)
    renamed = {("backbone." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in source.items()}
    expected = denoiser.state_dict()
    missing = sorted(set(expected) - set(renamed))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise DiffdistillError(f"{path}: EDM tensors do not match {net_cls.__name__} ({len(missing)} "
                               f"missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
                               f"e.g. {unexpected[:3]})")
    for name, tensor in renamed.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise DiffdistillError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                   f"{net_cls.__name__} needs {tuple(expected[name].shape)}")
        if not tensor.dtype.is_floating_point:
            raise DiffdistillError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected floating point")
    check_finite(renamed, path)

    denoiser.load_state_dict({k: v.float() for k, v in renamed.items()})
    denoiser.eval().requires_grad_(False)

    meta = dict(
        source_format="edm-pickle",
        edm_key=key,
        edm_precond=top.class_name,
        edm_network=model.class_name,
        edm_precond_kwargs=_as_json(top.init_kwargs or {}),
        edm_use_fp16=bool(top.state.get("use_fp16", False)),
        num_tensors=len(renamed),
        num_parameters=sum(p.numel() for p in denoiser.parameters()),
    )
    return denoiser, meta


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_edm_pickle(pkl_path: str | Path, out_dir: str | Path, key: str = "ema") -> Path:
    """Convert an EDM pickle into a snapshot directory `out_dir` (model.safetensors + model.json).

    Everything is checked before anything is written; the snapshot is assembled in a temporary directory
    beside `out_dir` and renamed into place, so a failure leaves no output behind.
    """
    from ..io import save_snapshot

    pkl_path, out_dir = Path(pkl_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DiffdistillError(f"{out_dir}: output exists and is not an empty directory")
    denoiser, meta = denoiser_from_edm_pickle(pkl_path, key=key)
    meta = dict(source=str(pkl_path.resolve()), sha256=_sha256(pkl_path), **meta)

    created = next((p for p in reversed(out_dir.absolute().parents) if not p.exists()), None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        save_snapshot(tmp, denoiser, sampling=dict(EDM_SAMPLING), meta=meta)
        os.replace(tmp, out_dir)  # atomic; replaces an empty directory
    except BaseException:
        shutil.rmtree(created if created is not None else tmp, ignore_errors=True)
        raise
    return out_dir
