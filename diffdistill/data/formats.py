"""Readers of the on-disk formats the field uses. Each is a `Source`: indexed on open, items read lazily.

A source yields *raw* items: images as HWC arrays (uint8 0..255, or float32 already in [-1, 1]) and points as
float32 vectors. Cropping, resizing, flipping and scaling to [-1, 1] are done once, in `images.ImageDataset`.

Formats: a folder of images (recursive), a `.zip` in the StyleGAN/EDM layout, the CIFAR-10 python tarball
(or its extracted `cifar-10-batches-py` folder), `.npz` arrays, an LSUN-style LMDB, scikit-learn's `digits`,
and the analytic specs `toy:ring8` / `gmm:PATH.json`. `open_source(spec)` picks the reader.
"""

from __future__ import annotations

import _codecs
import importlib.util
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import PIL.Image

from ..errors import DiffdistillError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # decoded as one channel; all else as RGB
POINTS_LENGTH = 100_000  # default length of an analytic (toy:/gmm:) data set; item i is drawn from seed i
SPEC_FORMS = ("a folder of images, a .zip (EDM layout), a .npz, cifar-10-python.tar.gz, an LMDB folder, "
              "'digits', 'toy:ring8' or 'gmm:PATH.json'")


# --------------------------------------------------------------------------------------------------
# Decoding one image


def _open_image(data: bytes | Path) -> PIL.Image.Image:
    return PIL.Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)


_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, PIL.Image.DecompressionBombError)


def decode_image(data: bytes | Path, where: str, mode: str) -> np.ndarray:
    """Decode an image to HWC uint8 in `mode` ('L' or 'RGB'); a clear error naming `where` if it fails."""
    try:
        with _open_image(data) as img:
            arr = np.asarray(img.convert(mode))
    except _IMAGE_ERRORS as e:
        raise DiffdistillError(f"{where}: unreadable image ({e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def image_mode(data: bytes | Path, where: str) -> str:
    """'L' for grey images, 'RGB' for all else (palette, RGBA, CMYK, ...), read from the header only."""
    try:
        with _open_image(data) as img:
            return "L" if img.mode in GREY_MODES else "RGB"
    except _IMAGE_ERRORS as e:
        raise DiffdistillError(f"{where}: unreadable image ({e})") from None


def image_header(data: bytes | Path, where: str) -> tuple[int, int]:
    """(width, height) after a cheap integrity check (`PIL verify`: chunk CRCs for PNG, no pixel decoding)."""
    try:
        with _open_image(data) as img:
            size = img.size
            img.verify()
    except _IMAGE_ERRORS as e:
        raise DiffdistillError(f"{where}: unreadable image ({e})") from None
    return size


def _is_image_name(name: str) -> bool:
    parts = name.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and name.lower().endswith(IMAGE_EXTENSIONS)


def parse_labels(text: bytes | str, fnames: list[str], where: str) -> np.ndarray | None:
    """Labels of `fnames` from EDM's `dataset.json`: {"labels": [[fname, label], ...]} or {"labels": null}."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffdistillError(f"{where}: malformed dataset.json ({e})") from None
    if not isinstance(obj, dict) or "labels" not in obj:
        raise DiffdistillError(f"{where}: malformed dataset.json "
                               '(expected {"labels": [[fname, label], ...]})')
    entries = obj["labels"]
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise DiffdistillError(f"{where}: malformed dataset.json ('labels' must be a list of [fname, label])")
    table = {}
    for entry in entries:
        ok = isinstance(entry, list | tuple) and len(entry) == 2 and isinstance(entry[0], str)
        if not ok or not isinstance(entry[1], int) or isinstance(entry[1], bool) or entry[1] < 0:
            raise DiffdistillError(f"{where}: malformed dataset.json entry {str(entry)[:80]} "
                                   "(expected [fname, class index >= 0])")
        table[entry[0].replace("\\", "/")] = entry[1]
    missing = [f for f in fnames if f not in table]
    if missing:
        raise DiffdistillError(f"{where}: dataset.json has no label for {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return np.array([table[f] for f in fnames], dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Sources


class Source:
    """Raw items of one data set. `kind` is 'image' (HWC arrays) or 'points' ((D,) vectors)."""

    kind = "image"
    name: str = ""               # short name, e.g. 'cifar10-train'
    where: str = ""              # the path (or spec) used in messages
    labels: np.ndarray | None = None   # int64 [N] class indices, or None when unlabelled
    label_dim: int | None = None       # number of classes when the format defines it; else max(labels) + 1

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        """Item i: HWC uint8 / float32 in [-1, 1] (images) or float32 (D,) (points)."""
        raise NotImplementedError

    def item_name(self, i: int) -> str:
        """Where item i lives, for messages."""
        return f"{self.where}[{i}]"

    def headers(self) -> Iterator[tuple[str, tuple[int, int]]]:
        """(item name, (width, height)) of every item after a cheap integrity check; encoded formats only."""
        return iter(())


class FolderSource(Source):
    """A folder of images, recursive, sorted by relative path; an optional EDM `dataset.json` at its root."""

    def __init__(self, root: Path):
        self.root, self.where, self.name = root, str(root), root.resolve().name
        self.fnames = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                             if p.is_file() and _is_image_name(p.relative_to(root).as_posix()))
        if not self.fnames:
            raise DiffdistillError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        meta = root / "dataset.json"
        self.labels = parse_labels(meta.read_bytes(), self.fnames, str(meta)) if meta.is_file() else None
        self.mode = image_mode(root / self.fnames[0], self.item_name(0))

    def __len__(self):
        return len(self.fnames)

    def item_name(self, i):
        return str(self.root / self.fnames[i])

    def read(self, i):
        return decode_image(self.root / self.fnames[i], self.item_name(i), self.mode)

    def headers(self):
        for i, f in enumerate(self.fnames):
            yield self.item_name(i), image_header(self.root / f, self.item_name(i))


class ZipSource(Source):
    """A zip in the StyleGAN/EDM layout: images (in any folders) + optional `dataset.json`."""

    def __init__(self, path: Path):
        self.path, self.where, self.name = path, str(path), path.stem
        self._zip, self._pid = None, None
        try:
            names = self._file().namelist()
            self.fnames = sorted(n for n in names if _is_image_name(n))
            if not self.fnames:
                raise DiffdistillError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this zip")
            if "dataset.json" in names:
                meta = self._file().read("dataset.json")
                self.labels = parse_labels(meta, self.fnames, f"{path}:dataset.json")
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DiffdistillError(f"{path}: not a readable zip file ({e})") from None
        self.mode = image_mode(self._member(0), self.item_name(0))

    def _file(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # a fresh handle in each DataLoader worker
            try:
                self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
            except (zipfile.BadZipFile, OSError) as e:
                raise DiffdistillError(f"{self.path}: not a readable zip file ({e})") from None
        return self._zip

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}

    def __len__(self):
        return len(self.fnames)

    def item_name(self, i):
        return f"{self.path}:{self.fnames[i]}"

    def _member(self, i) -> bytes:
        try:
            return self._file().read(self.fnames[i])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise DiffdistillError(f"{self.item_name(i)}: unreadable zip member ({e})") from None

    def read(self, i):
        return decode_image(self._member(i), self.item_name(i), self.mode)

    def headers(self):
        for i in range(len(self)):
            yield self.item_name(i), image_header(self._member(i), self.item_name(i))


# -- npz -------------------------------------------------------------------------------------------


def _memmap_npz_member(path: Path, key: str) -> np.ndarray | None:
    """Memory-map an *uncompressed* npz member (None when it is compressed or not a plain array)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the zip local file header: signature ... name length, extra length
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class NpzSource(Source):
    """`.npz` arrays: `x`/`y`, or `x_SPLIT`/`y_SPLIT` (split train by default). Images as (N,H,W) grey, NHWC
    or NCHW with 1 or 3 channels, uint8 (or integers 0..255) or float in [0, 1] or [-1, 1]; (N, D) arrays are
    points. Uncompressed members are memory-mapped, compressed ones loaded."""

    def __init__(self, path: Path, split: str | None):
        self.path, self.where = path, str(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                keys = set(npz.files)
                xkey = ("x" if "x" in keys else "x_train") if split is None else f"x_{split}"
                if xkey not in keys:
                    wanted = "'x' or 'x_train'" if split is None else repr(xkey)
                    raise DiffdistillError(f"{path}: no array {wanted} (found {sorted(keys)}; expected x/y, "
                                           "or x_train/y_train and x_test/y_test chosen with split=)")
                ykey = "y" if xkey == "x" else "y" + xkey[1:]
                x = _memmap_npz_member(path, xkey)
                if x is None:
                    x = npz[xkey]
                y = npz[ykey] if ykey in keys else None
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
            raise DiffdistillError(f"{path}: not a readable .npz file ({e})") from None
        self.name = path.stem + ("" if xkey in ("x", "x_train") else f"-{xkey[2:]}")
        n = len(x)
        if n == 0:
            raise DiffdistillError(f"{path}: array {xkey!r} is empty")
        if y is not None:
            if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or int(y.min()) < 0:
                raise DiffdistillError(f"{path}: {ykey!r} must hold {n} class indices >= 0, got shape "
                                       f"{y.shape} of {y.dtype}")
            self.labels = y.astype(np.int64)
        # Layout: (N, D) points, (N, H, W) grey, NHWC or NCHW with 1 or 3 channels.
        self.chw = False
        if x.ndim == 2:
            self.kind = "points"
        elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
            self.chw = True
        elif not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))):
            raise DiffdistillError(f"{path}: array {xkey!r} of shape {x.shape} is not (N,D) points nor "
                                   "(N,H,W), (N,H,W,C) or (N,C,H,W) images with C = 1 or 3")
        # Values: uint8 as is; integers must lie in 0..255; floats in [0, 1] (rescaled) or [-1, 1].
        self.scale = None
        if self.kind == "image" and x.dtype != np.uint8:
            if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
                raise DiffdistillError(f"{path}: array {xkey!r} has unsupported dtype {x.dtype}")
            lo, hi = float(x.min()), float(x.max())
            if np.issubdtype(x.dtype, np.integer):
                if lo < 0 or hi > 255:
                    raise DiffdistillError(f"{path}: integer images must lie in 0..255, found {lo:g}..{hi:g}")
            elif lo >= 0 and hi <= 1:
                self.scale = "01"
            elif lo >= -1 and hi <= 1:
                self.scale = "pm1"
            else:
                raise DiffdistillError(f"{path}: float images must lie in [0, 1] or [-1, 1], "
                                       f"found [{lo:g}, {hi:g}]")
        self.x, self.key = x, xkey

    def __getstate__(self):  # a memmap is re-opened in each worker rather than copied into the pickle
        state = dict(self.__dict__)
        if isinstance(self.x, np.memmap):
            state["x"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.x is None:
            self.x = _memmap_npz_member(self.path, self.key)

    def __len__(self):
        return len(self.x)

    def item_name(self, i):
        return f"{self.path}:{self.key}[{i}]"

    def read(self, i):
        a = np.asarray(self.x[i])
        if self.kind == "points":
            return a.astype(np.float32)
        a = a.transpose(1, 2, 0) if self.chw else (a[:, :, None] if a.ndim == 2 else a)
        if self.scale is None:
            return a.astype(np.uint8, copy=False)
        a = a.astype(np.float32)
        return a * 2 - 1 if self.scale == "01" else a


# -- CIFAR-10 python tarball -----------------------------------------------------------------------


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 pickles of bytes at protocol 2 rebuild them as _codecs.encode(str, 'latin1'); allow only that.
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return _codecs.encode(obj, encoding, errors)


_RECONSTRUCT = np.arange(1).__reduce__()[0]   # numpy's array reconstructor, found without naming its module
_FROMBUFFER = np.arange(1).__reduce_ex__(5)[0]  # protocol-5 array reconstructor
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, strings, bytes, numbers and numpy arrays: nothing can execute."""

    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed") from None


def safe_unpickle(f, where: str):
    """Load a pickled dict of arrays/lists (e.g. a CIFAR batch) without executing anything; str keys."""
    try:
        obj = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: Python 2 str of pixel bytes stay bytes
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError, zlib.error, MemoryError) as e:
        raise DiffdistillError(f"{where}: not a readable CIFAR batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DiffdistillError(f"{where}: not a CIFAR batch (a pickled {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


CIFAR_BATCHES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}


class CifarSource(Source):
    """The CIFAR-10 python version (`cifar-10-python.tar.gz` or its extracted folder), split train or test.

    Each batch is one pickle of 10,000 images, so it cannot be read per image: the tarball is streamed once on
    open and the decoded uint8 pixels (30 MB per batch) are kept. Convert it to a zip (`diffdistill dataset
    convert`) for per-image lazy reading.
    """

    label_dim = 10

    def __init__(self, path: Path, split: str | None):
        split = split or "train"
        self.path, self.where, self.name = path, str(path), f"cifar10-{split}"
        wanted = CIFAR_BATCHES[split]
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if path.is_dir():
            for b in wanted:
                if (path / b).is_file():
                    with open(path / b, "rb") as f:
                        found[b] = self._batch(safe_unpickle(f, str(path / b)), str(path / b))
        else:
            try:
                with tarfile.open(path, "r|*") as tar:  # one sequential pass over the (compressed) stream
                    for member in tar:
                        base = member.name.rsplit("/", 1)[-1]
                        if member.isfile() and base in wanted and base not in found:
                            where = f"{path}:{member.name}"
                            found[base] = self._batch(safe_unpickle(tar.extractfile(member), where), where)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                raise DiffdistillError(f"{path}: not a readable tarball ({e})") from None
        missing = [b for b in wanted if b not in found]
        if missing:
            what = "tarball" if path.is_file() else "folder"
            raise DiffdistillError(f"{path}: not a CIFAR-10 python {what} (no {', '.join(missing)})")
        # Row layout of the CIFAR-10 python version: 1024 red, 1024 green, 1024 blue values of a 32x32 image.
        self.pixels = np.concatenate([found[b][0] for b in wanted]).reshape(-1, 3, 32, 32)
        self.labels = np.concatenate([found[b][1] for b in wanted])

    @staticmethod
    def _batch(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        data, labels = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
            raise DiffdistillError(f"{where}: 'data' must be a uint8 array of shape (N, 3072)")
        labels = np.asarray(labels) if isinstance(labels, list | np.ndarray) else np.zeros(0)
        if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer) \
                or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise DiffdistillError(f"{where}: 'labels' must be {len(data)} class indices 0..9")
        return data, labels.astype(np.int64)

    def __len__(self):
        return len(self.pixels)

    def read(self, i):
        return self.pixels[i].transpose(1, 2, 0)


# -- LMDB (LSUN) -----------------------------------------------------------------------------------


_LMDB_ENVS: dict = {}  # (resolved path, pid) -> open read-only lmdb.Environment


class LmdbSource(Source):
    """An LMDB as LSUN ships it: each value an encoded image (webp/jpeg/png), in key order. Unlabelled."""

    def __init__(self, path: Path):
        try:
            import lmdb
        except ImportError:
            raise DiffdistillError(f"{path}: reading LMDB needs the optional package lmdb "
                                   "(pip install lmdb)") from None
        self._lmdb, self.path, self.where = lmdb, path, str(path)
        self.name = (path if path.is_dir() else path.parent).resolve().name
        self._env, self._pid = None, None
        try:
            with self._open().begin() as txn:
                keys = list(txn.cursor().iternext(keys=True, values=False))
        except lmdb.Error as e:
            raise DiffdistillError(f"{path}: not a readable LMDB ({e})") from None
        if not keys:
            raise DiffdistillError(f"{path}: the LMDB has no entries")
        # Fixed-width bytes keep millions of keys compact; NUL-terminated keys need Python objects.
        self.keys = np.array(keys, dtype=object if any(k.endswith(b"\0") for k in keys) else bytes)
        self.mode = image_mode(self._value(0), self.item_name(0))

    def _open(self):
        if self._env is None or self._pid != os.getpid():  # LMDB handles must not cross fork()
            # LMDB allows one handle per file and process: share it between sources of the same path.
            key = (str(self.path.resolve()), os.getpid())
            if key not in _LMDB_ENVS:
                _LMDB_ENVS[key] = self._lmdb.open(str(self.path), subdir=self.path.is_dir(), readonly=True,
                                                  lock=False, readahead=False, meminit=False, max_readers=64)
            self._env, self._pid = _LMDB_ENVS[key], os.getpid()
        return self._env

    def __getstate__(self):
        return {**self.__dict__, "_env": None, "_pid": None, "_lmdb": None}

    def __setstate__(self, state):
        import lmdb

        self.__dict__.update(state, _lmdb=lmdb)

    def __len__(self):
        return len(self.keys)

    def item_name(self, i):
        return f"{self.path}[{bytes(self.keys[i])!r}]"

    def _value(self, i) -> bytes:
        try:
            with self._open().begin() as txn:
                value = txn.get(bytes(self.keys[i]))
        except self._lmdb.Error as e:
            raise DiffdistillError(f"{self.item_name(i)}: unreadable LMDB entry ({e})") from None
        if value is None:
            raise DiffdistillError(f"{self.item_name(i)}: key vanished from the LMDB")
        return value

    def read(self, i):
        return decode_image(self._value(i), self.item_name(i), self.mode)

    def headers(self):
        for i in range(len(self)):
            yield self.item_name(i), image_header(self._value(i), self.item_name(i))


# -- embedded and analytic -------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8], labels) of scikit-learn's digits. Read from the file the package ships, which
    spares the import of sklearn (seconds); `sklearn.datasets.load_digits` when that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")  # 64 pixel values, then the label, per row
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DiffdistillError("digits: needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    return digits.images, digits.target


class DigitsSource(Source):
    """scikit-learn's bundled 8x8 digits (1,797 images, grey levels 0..16 -> [-1, 1], labels 0..9)."""

    name = where = "digits"
    label_dim = 10

    def __init__(self):
        images, target = _digits_arrays()
        self.pixels = (images.astype(np.float32) / 8 - 1)[..., None]  # grey levels 0..16 -> [-1, 1], HWC
        self.labels = target.astype(np.int64)

    def __len__(self):
        return len(self.pixels)

    def read(self, i):
        return self.pixels[i]


class PointsSource(Source):
    """Points of an analytic mixture (`toy:ring8`, `gmm:PATH.json`): the `size` points are drawn at once from a
    generator seeded with `seed` on first use (100k 2-D points: 0.8 MB, milliseconds), so item i depends on
    (seed, size, i) only. Unlabelled, not clamped to [-1, 1]."""

    kind = "points"

    def __init__(self, spec: str, size: int = POINTS_LENGTH, seed: int = 0):
        from ..teachers.analytic import load_analytic

        self.mixture = load_analytic(spec)
        self.name = self.where = spec
        self.size, self.seed = size, seed
        self._points = None

    def __len__(self):
        return self.size

    def read(self, i):
        if self._points is None:
            import torch

            self._points = self.mixture.sample(self.size, torch.Generator().manual_seed(self.seed)).numpy()
        return self._points[i]


# --------------------------------------------------------------------------------------------------
# Spec -> source

_OPTIONS = {"npz": {"split"}, "cifar": {"split"}, "points": {"size", "seed"}}


def _int_option(options: dict, key: str, default: int, spec: str, minimum: int) -> int:
    try:
        value = int(options.get(key, default))
    except ValueError:
        raise DiffdistillError(f"{spec}: option {key}= must be an integer") from None
    if value < minimum:
        raise DiffdistillError(f"{spec}: option {key}= must be >= {minimum}")
    return value


def open_source(spec: str | os.PathLike, split: str | None = None) -> Source:
    """The reader for `spec`; options may follow '?': `mnist.npz?split=test`, `toy:ring8?size=1000&seed=1`."""
    text = os.fspath(spec)
    base, options = text, {}
    if "?" in text and not Path(text).exists():
        base, query = text.split("?", 1)
        try:
            options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            raise DiffdistillError(f"{text}: malformed options after '?' (expected key=value&...)") from None
    if split is not None and options.get("split", split) != split:
        raise DiffdistillError(f"{text}: split={options['split']} in the spec contradicts split={split}")
    split = options.get("split", split)
    if split is not None and split not in CIFAR_BATCHES:
        raise DiffdistillError(f"{text}: unknown split {split!r} (train or test)")

    def build(fmt: str, make):
        unknown = set(options) - _OPTIONS.get(fmt, set())
        if split is not None and "split" not in _OPTIONS.get(fmt, set()):
            unknown.add("split")
        if unknown:
            allowed = ", ".join(sorted(_OPTIONS.get(fmt, ()))) or "none"
            raise DiffdistillError(f"{text}: unknown option {sorted(unknown)[0]!r} for this format "
                                   f"(allowed: {allowed})")
        return make()

    if base == "digits":
        return build("digits", DigitsSource)
    if base.startswith(("toy:", "gmm:")):
        size = _int_option(options, "size", POINTS_LENGTH, text, 1)
        seed = _int_option(options, "seed", 0, text, 0)
        return build("points", lambda: PointsSource(base, size, seed))
    path = Path(base).expanduser()
    if not path.exists():
        if os.sep not in base and "/" not in base and not path.suffix:
            raise DiffdistillError(f"unknown data set spec {text!r} (expected {SPEC_FORMS})")
        raise DiffdistillError(f"{path}: no such file or directory")
    lower = path.name.lower()
    if path.is_dir():
        if (path / "data.mdb").is_file():
            return build("lmdb", lambda: LmdbSource(path))
        if any((path / b).is_file() for b in ("data_batch_1", "test_batch")):
            return build("cifar", lambda: CifarSource(path, split))
        return build("folder", lambda: FolderSource(path))
    if lower.endswith(".zip"):
        return build("zip", lambda: ZipSource(path))
    if lower.endswith(".npz"):
        return build("npz", lambda: NpzSource(path, split))
    if lower.endswith((".tar.gz", ".tgz", ".tar")):
        return build("cifar", lambda: CifarSource(path, split))
    if lower.endswith((".mdb", ".lmdb")):
        return build("lmdb", lambda: LmdbSource(path))
    raise DiffdistillError(f"{path}: unknown data set format (expected {SPEC_FORMS})")
