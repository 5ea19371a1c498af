"""One schema per JSON file kind, checked in one place: `load_json(path, KIND)`.

A tiny declarative checker: `Int`, `Num` (finite numbers), `Str`, `Bool`, `Null`, `Any`, `ListOf`, `Dict`,
`OneOf`, `Tagged` (a dict whose spec depends on one key, e.g. a denoiser config's 'type'). A value that does not
fit raises the project's one-line error naming the file, the field and what was expected:

    runs/x/model/model.json: field denoiser.precond.sigma_data: expected a finite number > 0, got 0

Kinds: `SNAPSHOT` (a snapshot's model.json, its denoiser config and sampling recipe), `RUN_CONFIG` (a run's
config.json), `PAIRS_MANIFEST` (pairs.json of a KD pairs directory), `GMM_SPEC` (gmm:PATH.json), `DATASET_JSON`
(the labels of an EDM zip or image folder), and the diffusers configs read by `teachers.diffusers`
(`DIFFUSERS_SCHEDULER`, `DIFFUSERS_UNET`). JSON is parsed strictly: at most `MAX_DEPTH` levels of nesting, no
NaN/Infinity literals, UTF-8 only, at most `guard.MAX_SMALL_FILE` bytes, a regular file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import DiffdistillError
from .guard import MAX_SMALL_FILE, read_bytes

MAX_DEPTH = 64                 # JSON nesting accepted (configs nest 5 levels; guidance wrappers a few more)
MAX_LABEL = (1 << 20) - 1      # class indices: at most 2^20 classes (ImageNet-21k has 21,841)
MAX_SIDE = 16384               # one side of an image or one dimension of a sample
MAX_ELEMENTS = 1 << 28         # values of one sample (C*H*W or D)


class SchemaError(DiffdistillError):
    """A JSON value that does not fit its schema (a DiffdistillError: one line, exit 1)."""


class _Bad(Exception):
    def __init__(self, path: str, expected: str, got):
        super().__init__(path)
        self.path, self.expected, self.got = path, expected, got


class _Said(str):
    """A description of what was found (printed as is, not as a JSON value)."""


def _short(value) -> str:
    if isinstance(value, _Said):
        return str(value)
    text = json.dumps(value, allow_nan=True, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, key) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


_MISSING = _Said("nothing (the field is required)")


class Spec:
    """A schema node: `check(value, path)` returns the value or raises _Bad."""

    what = "a value"

    def check(self, value, path: str):
        return value

    def __or__(self, other: Spec) -> Spec:
        return OneOf(self, other)


class Any(Spec):
    what = "any value"


class Null(Spec):
    what = "null"

    def check(self, value, path):
        if value is not None:
            raise _Bad(path, self.what, value)
        return value


class Bool(Spec):
    what = "true or false"

    def check(self, value, path):
        if not isinstance(value, bool):
            raise _Bad(path, self.what, value)
        return value


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(lo, hi, lo_open=False, hi_open=False) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {_num(lo)}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {_num(hi)}")
    return " and ".join(parts)


class Int(Spec):
    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        rng = _range_text(lo, hi)
        self.what = f"an integer {rng}" if rng else "an integer"

    def check(self, value, path):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or (self.lo is not None and value < self.lo) \
                or (self.hi is not None and value > self.hi):
            raise _Bad(path, self.what, value)
        return value


class Num(Spec):
    """A finite number (int or float, not bool) in a range; lo_open/hi_open make the bounds strict."""

    def __init__(self, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        rng = _range_text(lo, hi, lo_open, hi_open)
        self.what = f"a finite number {rng}" if rng else "a finite number"

    def check(self, value, path):
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise _Bad(path, self.what, value)
        return value


class Str(Spec):
    def __init__(self, choices=None, pattern: str | None = None, max_len: int = 4096):
        self.choices, self.max_len = (tuple(choices) if choices is not None else None), max_len
        self.pattern = re.compile(pattern) if pattern else None
        if self.choices is not None:
            self.what = "one of " + ", ".join(repr(c) for c in self.choices)
        elif pattern:
            self.what = f"a string matching {pattern}"
        else:
            self.what = "a string"

    def check(self, value, path):
        if not isinstance(value, str) or len(value) > self.max_len \
                or (self.choices is not None and value not in self.choices) \
                or (self.pattern is not None and not self.pattern.fullmatch(value)):
            raise _Bad(path, self.what, value)
        return value


class ListOf(Spec):
    def __init__(self, item: Spec, min_len: int = 0, max_len: int | None = None, what: str | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len
        n = f"{min_len}..{max_len}" if max_len is not None else f"at least {min_len}"
        self.what = what or f"a list of {n} items, each {item.what}"

    def check(self, value, path):
        if not isinstance(value, list) or len(value) < self.min_len \
                or (self.max_len is not None and len(value) > self.max_len):
            got = _Said(f"a list of {len(value)} items") if isinstance(value, list) else value
            raise _Bad(path, self.what, got)
        item = self.item
        if isinstance(item, Any):
            return value
        for i, v in enumerate(value):
            try:
                item.check(v, path)     # the item's path is made only for an error (fast on long lists)
            except _Bad as e:
                e.path = _join(path, i) + e.path[len(path):]
                raise
        return value


class NumArray(Spec):
    """Nested lists of finite numbers with a rectangular shape: `min_ndim`..`max_ndim` dimensions, at most
    `max_values` numbers, each dimension at least 1 long. Walked iteratively (no recursion on hostile input)."""

    def __init__(self, min_ndim: int = 1, max_ndim: int = 4, max_values: int = MAX_ELEMENTS, what: str = "",
                 lo: float = -math.inf, hi: float = math.inf):
        self.min_ndim, self.max_ndim, self.max_values, self.lo, self.hi = min_ndim, max_ndim, max_values, lo, hi
        self.what = what or f"an array of finite numbers ({min_ndim}..{max_ndim} nested lists)"

    def check(self, value, path):
        shape, v = [], value
        while isinstance(v, list) and len(shape) <= self.max_ndim:
            shape.append(len(v))
            if not v:
                break
            v = v[0]
        if not self.min_ndim <= len(shape) <= self.max_ndim or 0 in shape:
            raise _Bad(path, self.what, value)
        if math.prod(shape) > self.max_values:
            raise _Bad(path, f"at most {self.max_values:,} numbers", _Said(f"an array of shape {tuple(shape)}"))
        stack = [(value, 0, path)]
        while stack:
            v, d, p = stack.pop()
            if d == len(shape):
                if not isinstance(v, int | float) or isinstance(v, bool) or not self.lo <= v <= self.hi:
                    raise _Bad(p, f"a number in [{_num(self.lo)}, {_num(self.hi)}]", v)
            elif not isinstance(v, list) or len(v) != shape[d]:
                raise _Bad(p, f"a list of {shape[d]} items, as the first at this depth",
                           _Said(f"a list of {len(v)} items") if isinstance(v, list) else v)
            else:
                stack.extend((item, d + 1, _join(p, i)) for i, item in enumerate(v))
        return value


class Tuple(Spec):
    """A JSON list of fixed length, one spec per position."""

    def __init__(self, *items: Spec):
        self.items = items
        self.what = "[" + ", ".join(i.what for i in items) + "]"

    def check(self, value, path):
        if not isinstance(value, list) or len(value) != len(self.items):
            raise _Bad(path, self.what, value)
        for i, (spec, v) in enumerate(zip(self.items, value)):
            try:
                spec.check(v, path)
            except _Bad as e:
                e.path = _join(path, i) + e.path[len(path):]
                raise
        return value


class OneOf(Spec):
    """The first option that fits. When none does, the option of the value's own kind (object, list) that
    failed inside it reports where (e.g. a bad field of the one object allowed), else all options are named."""

    def __init__(self, *options: Spec):
        self.options = options
        self.what = " or ".join(o.what for o in options)

    def check(self, value, path):
        inner = []
        for option in self.options:
            try:
                return option.check(value, path)
            except _Bad as e:
                if e.path != path:
                    inner.append(e)
        if len(inner) == 1:
            raise inner[0]
        raise _Bad(path, self.what, value)


def Opt(spec: Spec) -> Spec:
    """`spec` or null."""
    return OneOf(spec, Null())


class Dict(Spec):
    """A JSON object: `fields` {key: spec}; `required` keys; `extra` the spec of other keys (None: refused);
    `post(value, path)` a cross-field check that raises _Bad."""

    def __init__(self, fields: dict[str, Spec] | None = None, required=(), extra: Spec | None = Any(),
                 post: Callable | None = None, what: str = "an object"):
        self.fields, self.required, self.extra, self.post = dict(fields or {}), tuple(required), extra, post
        self.what = what

    def check(self, value, path):
        if not isinstance(value, dict):
            raise _Bad(path, self.what, value)
        for key in self.required:
            if key not in value:
                raise _Bad(_join(path, key), self.fields[key].what if key in self.fields else "a value",
                           _MISSING)
        for key, v in value.items():
            spec = self.fields.get(key, self.extra)
            if spec is None:
                known = ", ".join(sorted(self.fields))
                raise _Bad(_join(path, key), f"no such field (known: {known})", v)
            spec.check(v, _join(path, key))
        if self.post is not None:
            self.post(value, path)
        return value


class Tagged(Spec):
    """A JSON object whose spec is chosen by the string at `key`; unknown tags get `default` (or an error)."""

    def __init__(self, key: str, specs: dict[str, Spec], default: Spec | None = None, what: str = "an object"):
        self.key, self.specs, self.default, self.what = key, specs, default, what

    def check(self, value, path):
        if not isinstance(value, dict):
            raise _Bad(path, self.what, value)
        tag = value.get(self.key)
        if not isinstance(tag, str):
            raise _Bad(_join(path, self.key), "a string naming the kind (one of " + ", ".join(self.specs) + ")", tag)
        spec = self.specs.get(tag, self.default)
        if spec is None:
            raise _Bad(_join(path, self.key), "one of " + ", ".join(self.specs), tag)
        return spec.check(value, path)


class Lazy(Spec):
    """A spec defined later (recursive schemas)."""

    def __init__(self, get: Callable[[], Spec], what: str):
        self.get, self.what = get, what

    def check(self, value, path):
        return self.get().check(value, path)


# --------------------------------------------------------------------------------------------------
# Reading and checking


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):   # 1e999: a number beyond float64's range
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _nesting(text: str) -> int:
    """The deepest bracket nesting of JSON text outside strings (a Python loop: used only when `_nesting_bound`
    is over the limit)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _nesting_bound(raw: bytes) -> int:
    """An upper bound of the bracket nesting of JSON bytes (brackets inside strings count too), vectorised: 0.1 s
    for a 40 MB dataset.json."""
    a = np.frombuffer(raw, np.uint8)
    steps = a[(a == 91) | (a == 93) | (a == 123) | (a == 125)]   # [ ] { }
    if not steps.size:
        return 0
    return int(np.cumsum(np.where((steps == 91) | (steps == 123), 1, -1), dtype=np.int64).max())


def parse_json(data: bytes | str, where, what: str = "JSON file"):
    """Strict JSON: UTF-8, no NaN/Infinity, at most MAX_DEPTH levels; a one-line error naming `where`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as e:
        raise DiffdistillError(f"{where}: malformed {what} (not UTF-8 text: {e})") from None
    raw = data if isinstance(data, bytes | bytearray) else text.encode("utf-8", "surrogatepass")
    if _nesting_bound(raw) > MAX_DEPTH and _nesting(text) > MAX_DEPTH:
        raise DiffdistillError(f"{where}: malformed {what} (nested deeper than {MAX_DEPTH} levels)")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise DiffdistillError(f"{where}: malformed {what} (nested deeper than {MAX_DEPTH} levels)") from None
    except ValueError as e:   # JSONDecodeError, NaN/Infinity, integers of too many digits
        raise DiffdistillError(f"{where}: malformed {what} ({str(e)[:200]})") from None


def check(value, spec: Spec, where, what: str = "JSON", path: str = ""):
    """`value` when it fits `spec`; else SchemaError '{where}: field F: expected ..., got ...'."""
    try:
        return spec.check(value, path)
    except _Bad as e:
        field = f"field {e.path}: " if e.path else ""
        got = _short(e.got)
        raise SchemaError(f"{where}: malformed {what}: {field}expected {e.expected}, got {got}") from None


def load_json(path: str | os.PathLike, spec: Spec | None = None, what: str = "JSON file",
              limit: int = MAX_SMALL_FILE):
    """Read `path` (a regular file of at most `limit` bytes), parse it strictly and check it against `spec`."""
    path = Path(path)
    obj = parse_json(read_bytes(path, what, limit), path, what)
    return obj if spec is None else check(obj, spec, path, what)


# --------------------------------------------------------------------------------------------------
# The kinds

FINITE = Num()
POSITIVE = Num(0, None, lo_open=True)
COUNT = Int(0, 1 << 48)
LABEL_DIM = Int(0, MAX_LABEL + 1)
SAMPLE_SHAPE = ListOf(Int(1, MAX_SIDE), 1, 4, what=f"a sample shape: 1..4 integers in 1..{MAX_SIDE}")


def _shape_post(key: str):
    def post(value, path):
        shape = value.get(key)
        if isinstance(shape, list) and math.prod(shape) > MAX_ELEMENTS:
            raise _Bad(_join(path, key), f"a sample of at most {MAX_ELEMENTS:,} values", shape)
    return post


def _sampling_post(value: dict, path: str) -> None:
    """The recipe's options are ones its sampler takes; a grid is strictly descending and ends in 0."""
    import inspect

    from .samplers import SAMPLERS

    sampler = value.get("sampler", "heun")
    params = inspect.signature(SAMPLERS[sampler]).parameters
    options = sorted(k for k, p in params.items() if p.kind == p.KEYWORD_ONLY
                     and k not in ("cond", "generator", "callback"))
    for key in value:
        if key not in ("sampler", "steps", "sigmas") and key not in options:
            raise _Bad(_join(path, key), f"an option of the {sampler} sampler ({', '.join(options) or 'none'})",
                       _Said(f"the option {key!r}"))
    sigmas = value.get("sigmas")
    if sigmas is not None and (sigmas[-1] != 0 or not all(b < a for a, b in zip(sigmas, sigmas[1:]))):
        raise _Bad(_join(path, "sigmas"), "a strictly descending grid ending in 0", sigmas)


# A sampling recipe (a snapshot's 'sampling'): the sampler, its steps or grid, and the sampler's options.
SAMPLING = Dict({
    "sampler": Str(("euler", "ddim", "heun", "ddpm", "dpmpp_2m", "onestep", "multistep")),
    "steps": Int(1, 100_000),
    "sigmas": ListOf(Num(0), 2, 100_001),
    "clip_denoised": Bool() | Num(0, None, lo_open=True),
    "clip_keeps_eps": Bool(),
    "dynamic_threshold": Opt(Num(0, 1, lo_open=True)),
    "threshold_max": Num(1),
    "s_churn": Num(0), "s_min": Num(0), "s_max": Num(0), "s_noise": Num(0),
    "variance": Opt(Str(("fixed_small", "fixed_large"))),
}, extra=Any(), post=_sampling_post, what="a sampling recipe object")


PRECOND = Dict({
    "kind": Str(("edm", "boundary", "vp", "ve", "cosine")),
    "prediction": Str(("eps", "v", "x", "both")),
    "sigma_data": POSITIVE,
    "sigma_min": POSITIVE,
    "sigma_max": POSITIVE,
    "logsnr_min": FINITE,
    "logsnr_max": FINITE,
    "extra": Dict(),
}, extra=None, post=lambda v, p: _ordered(v, p, "sigma_min", "sigma_max"), what="a preconditioning object")


def _ordered(value: dict, path: str, lo: str, hi: str) -> None:
    a, b = value.get(lo), value.get(hi)
    if isinstance(a, int | float) and isinstance(b, int | float) and not a < b:
        raise _Bad(_join(path, hi), f"a number > {lo} ({a})", b)


_NET_SCALAR = OneOf(Int(-(1 << 20), 1 << 20), Num(-1e6, 1e6), Str(max_len=200), Bool(), Null())
NETWORK = Dict({
    "name": Str(("mlp", "unet", "adm")),
    "dim": Int(1, MAX_ELEMENTS),
    "img_resolution": Int(1, MAX_SIDE),
    "in_channels": Int(1, 1024), "out_channels": Int(1, 1024),
    "label_dim": LABEL_DIM, "augment_dim": Int(0, 1024),
    "hidden": Int(1, 1 << 16), "num_layers": Int(0, 256), "emb_channels": Int(1, 1 << 16),
    "model_channels": Int(1, 1 << 14), "channel_mult": ListOf(Int(1, 64), 1, 12),
    "channel_mult_emb": Int(1, 64), "channel_mult_noise": Int(1, 64), "num_blocks": Int(0, 64),
    "attn_resolutions": ListOf(Int(1, MAX_SIDE), 0, 16), "resample_filter": ListOf(Int(-64, 64), 1, 16),
    "dropout": Num(0, 1), "label_dropout": Num(0, 1), "channels_per_head": Int(1, 1 << 14),
    "input_fourier": Int(0, 1 << 16), "fourier_scale": FINITE, "input_fourier_scale": FINITE,
}, required=("name",), extra=OneOf(_NET_SCALAR, ListOf(_NET_SCALAR, 0, 64)), what="a network object")

DENOISER: Spec = Lazy(lambda: _DENOISER, "a denoiser config object")

MAX_GMM_VALUES = 1 << 20      # K * D of a mixture: its denoiser holds [batch, K, D] float64 intermediates
GMM_BOUND = 1e8               # |means| and stds: squared distances stay far inside float64's range
GMM_FIELDS = {
    "means": NumArray(2, 4, MAX_GMM_VALUES, lo=-GMM_BOUND, hi=GMM_BOUND,
                      what=f"K >= 1 means, each a list of numbers in [-{GMM_BOUND:g}, {GMM_BOUND:g}] (or an "
                           "image-shaped array)"),
    "stds": ListOf(Num(0, GMM_BOUND, lo_open=True), 1, 1 << 20, what=f"K numbers in (0, {GMM_BOUND:g}]"),
    "weights": ListOf(Num(0, 1e100), 1, 1 << 20, what="K numbers in [0, 1e100]"),
    "sigma_min": POSITIVE, "sigma_max": POSITIVE,
    "name": Opt(Str(max_len=1000)),
}
def _gmm_post(value: dict, path: str) -> None:
    means = value.get("means")
    if not isinstance(means, list) or not means:
        return
    k, d, v = len(means), 1, means[0]    # NumArray has checked the shape is rectangular
    while isinstance(v, list) and v:
        d, v = d * len(v), v[0]
    if k * d > MAX_GMM_VALUES:

        raise _Bad(_join(path, "means"), f"at most {MAX_GMM_VALUES:,} values in all (K x D)", _Said(f"{k} x {d}"))
    for key in ("stds", "weights"):
        v = value.get(key)
        if isinstance(v, list) and len(v) != k:
            raise _Bad(_join(path, key), f"{k} numbers, one per mean", _Said(f"{len(v)} numbers"))
    weights = value.get("weights")
    if isinstance(weights, list) and not sum(weights) > 0:
        raise _Bad(_join(path, "weights"), "weights with a positive sum", weights)
    _ordered(value, path, "sigma_min", "sigma_max")


GMM_SPEC = Dict({k: GMM_FIELDS[k] for k in ("means", "stds", "weights")}, required=("means", "stds", "weights"),
                extra=None, post=_gmm_post, what='a gmm spec object {"means": K lists, "stds": K, "weights": K}')

DIFFUSERS_SCHEDULER = Dict({
    "_class_name": Str(("DDPMScheduler", "DDIMScheduler")),
    "num_train_timesteps": Int(2, 100_000),
    "beta_start": Num(0, 1, lo_open=True, hi_open=True),
    "beta_end": Num(0, 1, lo_open=True, hi_open=True),
    "beta_schedule": Str(max_len=100),            # the names: SchedulerConfig.validate's message
    "trained_betas": Opt(ListOf(Num(0, 1, lo_open=True, hi_open=True), 2, 100_000)),
    "prediction_type": Str(max_len=100),
    "timestep_spacing": Str(max_len=100),

    "steps_offset": Int(0, 100_000),
    "set_alpha_to_one": Bool(),
    "variance_type": Opt(Str(max_len=100)),
    "clip_sample": Bool(),
    "clip_sample_range": POSITIVE,
    "thresholding": Bool(),
    "dynamic_thresholding_ratio": Num(0, 1, lo_open=True),
    "sample_max_value": Num(1),
    "rescale_betas_zero_snr": Bool(),
}, required=("_class_name",), extra=Any(), what="a scheduler config object")

SHARD_INDEX = Dict({"weight_map": Dict(extra=Str(max_len=255), what="an object {tensor name: shard file}"),
                    "metadata": Opt(Dict())}, required=("weight_map",), what="a shard index object")

_SAMPLE_SIZE = Int(1, MAX_SIDE) | ListOf(Int(1, MAX_SIDE), 2, 2)

DIFFUSERS_UNET = Dict({
    "_class_name": Str(("UNet2DModel",)),
    "sample_size": _SAMPLE_SIZE,
    "in_channels": Int(1, 1024), "out_channels": Int(1, 1024),
    "block_out_channels": ListOf(Int(1, 1 << 14), 1, 12),
    "down_block_types": ListOf(Str(max_len=100), 1, 12), "up_block_types": ListOf(Str(max_len=100), 1, 12),
    "layers_per_block": Int(0, 64),
    "num_class_embeds": Opt(Int(1, MAX_LABEL + 1)),
    "attention_head_dim": Opt(Int(1, 1 << 14)),
    "norm_num_groups": Opt(Int(1, 1 << 14)),
}, required=("_class_name",), extra=Any(), what="a UNet2DModel config object")

def _precond_post(value: dict, path: str) -> None:
    """The sample size is bounded; the classes of the denoiser are its network's."""
    _shape_post("shape")(value, path)
    net_labels = value["network"].get("label_dim", 0)
    if value.get("label_dim", 0) != net_labels:
        raise _Bad(_join(path, "label_dim"), f"the network's label_dim ({net_labels})", value.get("label_dim", 0))


_SNAPSHOT_UNET = Dict({k: v for k, v in DIFFUSERS_UNET.fields.items() if k != "_class_name"},
                      what="a UNet2DModel config object")   # a snapshot keeps the config without its '_' keys

_DENOISER = Tagged("type", {

    "precond": Dict({"type": Str(), "precond": PRECOND, "network": NETWORK, "shape": SAMPLE_SHAPE,
                     "label_dim": LABEL_DIM}, required=("precond", "network", "shape"), extra=None,
                    post=_precond_post, what="a 'precond' denoiser object"),
    "gmm": Dict({"type": Str(), **GMM_FIELDS}, required=("means", "stds", "weights"), extra=None,
                post=_gmm_post, what="a 'gmm' denoiser object"),
    "boundary": Dict({"type": Str(), "sigma_min": Opt(POSITIVE), "denoiser": DENOISER}, required=("denoiser",),
                     extra=None, what="a 'boundary' denoiser object"),
    "cfg": Dict({"type": Str(), "scale": Num(-1e4, 1e4), "denoiser": DENOISER}, required=("denoiser", "scale"),
                extra=None, what="a 'cfg' denoiser object"),
    "kd-onestep": Dict({"type": Str(), "level": POSITIVE, "denoiser": DENOISER}, required=("denoiser", "level"),
                       extra=None, what="a 'kd-onestep' denoiser object"),
    "diffusers": Dict({"type": Str(), "path": Opt(Str()), "unet": _SNAPSHOT_UNET,
                       "scheduler": Dict({**{k: v for k, v in DIFFUSERS_SCHEDULER.fields.items()
                                             if k != "_class_name"}, "class_name": Str(("DDPMScheduler",
                                                                                        "DDIMScheduler"))},
                                         extra=None, what="a scheduler object"),
                       "timestep_rule": Str(max_len=100), "null_class": Opt(Int(0, MAX_LABEL))},
                      extra=None, what="a 'diffusers' denoiser object"),
}, default=Dict(), what="a denoiser config object")   # types registered by the user: their builder checks

SNAPSHOT = Dict({"denoiser": DENOISER, "sampling": Opt(SAMPLING), "meta": Opt(Dict())}, required=("denoiser",),
                what="a snapshot config object")

DATASET_JSON = Dict({"labels": Opt(ListOf(Tuple(Str(max_len=4096), Int(0, MAX_LABEL)),
                                          what=f"a list of [file name, class index 0..{MAX_LABEL}]")),
                     "class_names": Opt(ListOf(Str(max_len=4096), 0, MAX_LABEL + 1))},
                    required=("labels",), what='an object {"labels": [[fname, label], ...] or null}')


_OPT_KIMG = Opt(Num(0))
# A run's config.json (`train.loop.run_config`): {"method", "train": the TrainConfig fields, "meta"}.
RUN_CONFIG = Dict({
    "method": Str(max_len=100),
    "train": Dict({
        "out": Str(), "total_kimg": POSITIVE, "batch": Int(1, 1 << 24), "batch_gpu": Opt(Int(1, 1 << 24)),
        "ema_halflife_kimg": _OPT_KIMG, "ema_rampup": _OPT_KIMG, "seed": Int(0, (1 << 32) - 1),
        "tick_kimg": _OPT_KIMG, "snapshot_kimg": _OPT_KIMG, "checkpoint_kimg": _OPT_KIMG,
        "keep_checkpoints": Int(0, 1 << 20), "grid_kimg": _OPT_KIMG, "grid_n": Int(0, 1 << 20),
        "eval_kimg": _OPT_KIMG, "best_metric": Opt(Str(max_len=200)), "best_mode": Str(("min", "max")),
        "bf16": Bool(), "max_steps": Opt(Int(1, 1 << 62)),
    }, extra=Any(), what="an object of training settings"),
    "meta": Opt(Dict()),
}, required=("method", "train"), what="a run config object")


SHARD_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
PAIRS_MANIFEST = Dict({
    "format": Str(("diffdistill-pairs/1",)),
    "teacher": Str(max_len=200),
    "shape": SAMPLE_SHAPE,
    "label_dim": LABEL_DIM,
    "n_pairs": COUNT, "heldout": COUNT, "shard_size": Int(1, 1 << 40),
    "seed": Int(0, (1 << 63) - 1),
    "block": Int(1, 1 << 24), "batch": Int(1, 1 << 24),
    "target_dtype": Str(("uint8", "float16")),
    "recipe": Dict(),
    "shards": ListOf(Dict({"name": Str(pattern=SHARD_NAME), "count": COUNT, "stored": COUNT,
                           "index": Int(-(1 << 31), 1 << 31)}, required=("name", "count"), extra=Any(),
                          what="a shard object"), 0, 1 << 20),
}, required=("format", "teacher", "shape", "label_dim", "n_pairs", "heldout", "shard_size", "target_dtype",
             "shards"), post=_shape_post("shape"), what="a pairs manifest object")
