"""Readers of the on-disk formats the field uses. Each is a `Source`: indexed on open, items read lazily.

A source yields *raw* items: images as HWC arrays (uint8 0..255, or float32 already in [-1, 1]) and points as
float32 vectors. Cropping, resizing, flipping and scaling to [-1, 1] are done once, in `images.ImageDataset`.

Formats: a folder of images (recursive; class folders give labels), a `.zip` in the StyleGAN/EDM layout, the
CIFAR-10 python tarball (or its extracted `cifar-10-batches-py` folder), `.npz` arrays, an LMDB (LSUN's, or the
sized keys + `length` of progressive distillation's prepare_data.py), scikit-learn's `digits`, and the analytic specs
`toy:ring8` / `gmm:PATH.json`. `open_source(spec)` picks the reader.
"""

from __future__ import annotations

import _codecs
import importlib.util
import io
import json
import os
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import PIL.Image

from ..errors import DiffdistillError
from ..guard import (
    ARCHIVE_ERRORS,
    MAX_LABELS_FILE,
    NpzFile,
    lexists,
    lmdb_check,
    open_zip,
    read_bytes,
    read_member,
    regular_file,
    zip_member_check,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # decoded as one channel; all else as RGB
POINTS_LENGTH = 100_000  # default length of an analytic (toy:/gmm:) data set; item i is drawn from seed i
SPEC_FORMS = ("a folder of images, a .zip (EDM layout), a .npz, cifar-10-python.tar.gz, an LMDB folder, "
              "'digits', 'toy:ring8' or 'gmm:PATH.json'")


# --------------------------------------------------------------------------------------------------
# Decoding one image


def _open_image(data: bytes | Path) -> PIL.Image.Image:
    if isinstance(data, bytes):
        return PIL.Image.open(io.BytesIO(data))
    regular_file(data, "image")   # a FIFO or a device would block, a directory is no image
    return PIL.Image.open(data)


class _ImageCall:
    """Runs a PIL call on untrusted bytes: any failure (PIL raises many types on damaged data) and a
    decompression-bomb warning become one DiffdistillError naming `where`."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        return self

    def __exit__(self, kind, e, tb):
        self._warnings.__exit__(kind, e, tb)
        if e is None or isinstance(e, DiffdistillError) or not isinstance(e, Exception):
            return False
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DiffdistillError(f"{self.where}: unreadable image ({msg})") from None


def decode_image(data: bytes | Path, where: str, mode: str) -> np.ndarray:
    """Decode an image to HWC uint8 in `mode` ('L' or 'RGB'); a clear error naming `where` if it fails."""
    with _ImageCall(where), _open_image(data) as img:
        arr = np.asarray(img.convert(mode))
    return arr[:, :, None] if arr.ndim == 2 else arr


def image_mode(data: bytes | Path, where: str) -> str:
    """'L' for grey images, 'RGB' for all else (palette, RGBA, CMYK, ...), read from the header only."""
    with _ImageCall(where), _open_image(data) as img:
        return "L" if img.mode in GREY_MODES else "RGB"


def image_header(data: bytes | Path, where: str) -> tuple[int, int]:
    """(width, height) after an integrity check: `PIL verify` (chunk CRCs for PNG), then a full decode (a
    truncated or damaged JPEG/WebP passes verify)."""
    with _ImageCall(where):
        with _open_image(data) as img:
            size, kind = img.size, img.format
            img.verify()
        with _open_image(data) as img:
            img.load()
    if kind == "PNG" and not _png_ends(data):   # PIL stops at IEND without reading its checksum
        raise DiffdistillError(f"{where}: unreadable image (truncated PNG: no complete IEND chunk)")
    return size


def _png_ends(data: bytes | Path) -> bool:
    """Whether a PNG's last 64 KiB hold a complete IEND chunk (its type and checksum)."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16)))
            data = f.read()
    return b"IEND\xaeB`\x82" in data[-(1 << 16):]


def _is_image_name(name: str) -> bool:
    parts = name.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and name.lower().endswith(IMAGE_EXTENSIONS)


def parse_labels(text: bytes | str, fnames: list[str], where: str) -> np.ndarray | None:
    """Labels of `fnames` from EDM's `dataset.json`: {"labels": [[fname, label], ...]} or {"labels": null}
    (checked against `schema.DATASET_JSON`: class indices 0..schema.MAX_LABEL)."""
    from ..schema import DATASET_JSON, check, parse_json

    obj = check(parse_json(text, where, "dataset.json"), DATASET_JSON, where, "dataset.json")
    entries = obj["labels"]
    if entries is None:
        return None
    table = {entry[0].replace("\\", "/"): entry[1] for entry in entries}

    missing = [f for f in fnames if f not in table]
    if missing:
        raise DiffdistillError(f"{where}: dataset.json has no label for {missing[0]}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return np.array([table[f] for f in fnames], dtype=np.int64)


def parse_class_names(text: bytes | str, labels: np.ndarray | None, where: str) -> list[str] | None:
    """The optional "class_names" list of a `dataset.json` (this project writes it beside EDM's "labels"): one
    name per class index, so it must cover every label. None when absent or when there are no labels."""
    names = json.loads(text).get("class_names")  # parse_labels has checked the JSON already
    if names is None or labels is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DiffdistillError(f"{where}: malformed dataset.json ('class_names' must be a list of strings)")
    if len(labels) and int(labels.max()) >= len(names):
        raise DiffdistillError(f"{where}: dataset.json has class {int(labels.max())} but {len(names)} "
                               "class_names")
    return names


def class_folder_labels(fnames: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """Labels from class folders (the ImageNet layout `SRC/<class name>/...`), as EDM's dataset_tool takes them
    when there is no dataset.json: the class index of an image is the rank of its top-level folder among the
    sorted folder names. Only when every image lies in such a folder and there are at least two."""
    tops = [f.split("/", 1)[0] if "/" in f else None for f in fnames]
    if None in tops:
        return None, None
    names = sorted(set(tops))
    if len(names) < 2:
        return None, None
    index = {name: k for k, name in enumerate(names)}
    return np.array([index[t] for t in tops], dtype=np.int64), names


# --------------------------------------------------------------------------------------------------
# Sources


class Source:
    """Raw items of one data set. `kind` is 'image' (HWC arrays) or 'points' ((D,) vectors)."""

    kind = "image"
    name: str = ""               # short name, e.g. 'cifar10-train'
    where: str = ""              # the path (or spec) used in messages
    labels: np.ndarray | None = None   # int64 [N] class indices, or None when unlabelled
    label_dim: int | None = None       # number of classes when the format defines it; else max(labels) + 1
    class_names: list[str] | None = None  # a name per class index, when the format has them
    notes: tuple[str, ...] = ()        # how the data set was read, for `dataset info`

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

    def header(self, i: int) -> tuple[int, int] | None:
        """(width, height) of item i from its header after a cheap integrity check; None for array formats,
        whose items all have one shape."""
        return None


def _image_files(root: Path) -> list[str]:
    """The relative paths of the images under `root`, sorted. Symlinks are followed; an image name that is not a
    regular file (a directory, a FIFO, a device, a dangling symlink) is an error naming it, never skipped."""
    names = []
    try:
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            if _is_image_name(rel):
                regular_file(p, "image")
                names.append(rel)
    except (OSError, RecursionError) as e:
        raise DiffdistillError(f"{root}: cannot list the folder ({e})") from None
    return sorted(names)


class FolderSource(Source):
    """A folder of images, recursive, sorted by relative path; an optional EDM `dataset.json` at its root."""

    def __init__(self, root: Path):
        self.root, self.where, self.name = root, str(root), root.resolve().name
        self.fnames = _image_files(root)
        if not self.fnames:
            raise DiffdistillError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        meta = root / "dataset.json"
        if lexists(meta):   # a dataset.json that is not a readable file is an error, not "no labels"
            text = read_bytes(meta, "dataset.json", MAX_LABELS_FILE)
            self.labels = parse_labels(text, self.fnames, str(meta))
            self.class_names = parse_class_names(text, self.labels, str(meta))
        else:
            self.labels, self.class_names = class_folder_labels(self.fnames)
            if self.class_names:
                self.notes = (f"labels from {len(self.class_names)} class folders",)
        if self.class_names:
            self.label_dim = len(self.class_names)
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

    def header(self, i):
        return image_header(self.root / self.fnames[i], self.item_name(i))


class ZipSource(Source):
    """A zip in the StyleGAN/EDM layout: images (in any folders) + optional `dataset.json`."""

    def __init__(self, path: Path):
        self.path, self.where, self.name = path, str(path), path.stem
        self._zip, self._pid = None, None
        try:
            infos = {info.filename: info for info in self._file().infolist()}
            self.fnames = sorted(n for n in infos if _is_image_name(n) and not infos[n].is_dir())
            for n in self.fnames:   # encrypted, unknown compression, huge declared sizes: refused up front
                zip_member_check(infos[n], f"{path}:{n}")
            if not self.fnames:
                raise DiffdistillError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this zip")
            if "dataset.json" in infos:
                meta = read_member(self._file(), "dataset.json", f"{path}:dataset.json", MAX_LABELS_FILE)
                self.labels = parse_labels(meta, self.fnames, f"{path}:dataset.json")
                self.class_names = parse_class_names(meta, self.labels, f"{path}:dataset.json")
                if self.class_names:
                    self.label_dim = len(self.class_names)
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise DiffdistillError(f"{path}: not a readable zip file ({e})") from None
        self.mode = image_mode(self._member(0), self.item_name(0))

    def _file(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():  # a fresh handle in each DataLoader worker
            self._zip, self._pid = open_zip(self.path), os.getpid()
        return self._zip

    def __getstate__(self):
        return {**self.__dict__, "_zip": None, "_pid": None}

    def __len__(self):
        return len(self.fnames)

    def item_name(self, i):
        return f"{self.path}:{self.fnames[i]}"

    def _member(self, i) -> bytes:
        return read_member(self._file(), self.fnames[i], self.item_name(i))

    def read(self, i):
        return decode_image(self._member(i), self.item_name(i), self.mode)

    def headers(self):
        for i in range(len(self)):
            yield self.item_name(i), image_header(self._member(i), self.item_name(i))

    def header(self, i):
        return image_header(self._member(i), self.item_name(i))


# -- npz -------------------------------------------------------------------------------------------


def _memmap_npz_member(path: Path, key: str) -> np.ndarray:
    """An npz member, its header checked first (`guard.NpzFile`): memory-mapped when stored uncompressed, else
    read whole."""
    with NpzFile(path) as npz:
        return npz.array(key)


def _check_finite(x: np.ndarray, where: str, chunk: int = 1 << 22) -> None:
    """Refuse NaN or inf in a float array, reading a memmap a chunk of rows at a time."""
    if not np.issubdtype(x.dtype, np.floating):
        return
    rows = max(1, chunk // max(1, x[0].size if len(x) else 1))
    for lo in range(0, len(x), rows):
        part = np.asarray(x[lo:lo + rows])
        if not np.isfinite(part).all():
            raise DiffdistillError(f"{where} holds {int((~np.isfinite(part)).sum())} NaN or inf values "
                                   f"(first in rows {lo}..{lo + len(part) - 1})")


class NpzSource(Source):
    """`.npz` arrays: `x`/`y`, or `x_SPLIT`/`y_SPLIT` (split train by default). Images as (N,H,W) grey, NHWC
    or NCHW with 1 or 3 channels, uint8 (or integers 0..255) or float in [0, 1] or [-1, 1]; (N, D) arrays are
    points. Uncompressed members are memory-mapped, compressed ones loaded."""

    def __init__(self, path: Path, split: str | None):
        from ..schema import MAX_LABEL, MAX_SIDE

        self.path, self.where = path, str(path)
        with NpzFile(path) as npz:   # every member's header is checked before its data is read
            keys = set(npz.keys)
            xkey = ("x" if "x" in keys else "x_train") if split is None else f"x_{split}"
            if xkey not in keys:
                wanted = "'x' or 'x_train'" if split is None else repr(xkey)
                raise DiffdistillError(f"{path}: no array {wanted} (found {sorted(keys)}; expected x/y, "
                                       "or x_train/y_train and x_test/y_test chosen with split=)")
            ykey = "y" if xkey == "x" else "y" + xkey[1:]
            x = npz.array(xkey)
            y = npz.array(ykey) if ykey in keys else None
        self.name = path.stem + ("" if xkey in ("x", "x_train") else f"-{xkey[2:]}")
        if x.ndim < 2 or not 0 < min(x.shape[1:]) or max(x.shape[1:]) > MAX_SIDE:
            raise DiffdistillError(f"{path}: array {xkey!r} of shape {x.shape} is not (N,D) points nor "
                                   "(N,H,W), (N,H,W,C) or (N,C,H,W) images")
        n = len(x)
        if n == 0:
            raise DiffdistillError(f"{path}: array {xkey!r} is empty")
        if y is not None:
            if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
                raise DiffdistillError(f"{path}: {ykey!r} must hold {n} class indices (integers), got shape "

                                       f"{y.shape} of {y.dtype}")
            if int(y.min()) < 0 or int(y.max()) > MAX_LABEL:   # compared before any cast: uint64 cannot wrap
                raise DiffdistillError(f"{path}: {ykey!r} must hold class indices 0..{MAX_LABEL}, found "
                                       f"{int(y.min())}..{int(y.max())}")
            self.labels = y.astype(np.int64)
        if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise DiffdistillError(f"{path}: array {xkey!r} has unsupported dtype {x.dtype} (integers or floats)")

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
            _check_finite(x, f"{path}: array {xkey!r}")
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
        if self.kind == "points":
            _check_finite(x, f"{path}: array {xkey!r}")
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
    """Load a pickled dict of arrays/lists (e.g. a CIFAR batch) without executing anything; str keys. The bytes
    are read first (at most CIFAR_BATCH_BYTES), so a length the pickle declares beyond its end is "truncated",
    never a huge allocation."""
    chunks, size = [], 0
    try:
        while size <= CIFAR_BATCH_BYTES and (chunk := f.read(1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
    except (tarfile.TarError, *ARCHIVE_ERRORS) as e:
        raise DiffdistillError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    if size > CIFAR_BATCH_BYTES:
        raise DiffdistillError(f"{where}: larger than a CIFAR batch can be")
    try:
        obj = _ArrayUnpickler(io.BytesIO(b"".join(chunks)), encoding="latin1").load()  # latin1: Python 2 str
    except MemoryError:   # a length field larger than memory: the unpickler allocates before it reads
        raise DiffdistillError(f"{where}: not a readable CIFAR batch (it declares an object larger than this "
                               "machine's memory)") from None
    except Exception as e:  # noqa: BLE001  (damaged pickles raise many types; only allow-listed globals run)
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise DiffdistillError(f"{where}: not a readable CIFAR batch ({type(e).__name__}: {msg})") from None
    if not isinstance(obj, dict):
        raise DiffdistillError(f"{where}: not a CIFAR batch (a pickled {type(obj).__name__}, not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


CIFAR_BATCHES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
CIFAR_BATCH_BYTES = 256 << 20   # a CIFAR-10 batch pickle is 31 MB: a member declaring more is refused


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
                if lexists(path / b):   # a batch that is a FIFO, a directory or a dangling link: an error
                    if regular_file(path / b, "CIFAR batch").st_size > CIFAR_BATCH_BYTES:
                        raise DiffdistillError(f"{path / b}: larger than a CIFAR batch can be")
                    with open(path / b, "rb") as f:
                        found[b] = self._batch(safe_unpickle(f, str(path / b)), str(path / b))
        else:
            regular_file(path, "tarball")
            try:
                with tarfile.open(path, "r|*") as tar:  # one sequential pass over the (compressed) stream
                    for member in tar:
                        base = member.name.rsplit("/", 1)[-1]
                        if member.isfile() and base in wanted and base not in found:
                            where = f"{path}:{member.name}"
                            if member.size > CIFAR_BATCH_BYTES:
                                raise DiffdistillError(f"{where}: declares {member.size:,} bytes, more than a "
                                                       "CIFAR batch can be")
                            found[base] = self._batch(safe_unpickle(tar.extractfile(member), where), where)
            except (tarfile.TarError, *ARCHIVE_ERRORS) as e:
                raise DiffdistillError(f"{path}: not a readable tarball ({type(e).__name__}: {e})") from None
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


_LMDB_ENVS: dict = {}  # (resolved path, pid, file identity) -> open read-only lmdb.Environment


_SIZED_KEY = re.compile(rb"(\d+(?:x\d+)?)-(\d+)")


class LmdbSource(Source):
    """An LMDB of encoded images (webp/jpeg/png) in one of two layouts:

    - as LSUN ships it: every value an image, read in key order; unlabelled;
    - with sized keys (progressive distillation's `prepare_data.py`, rosinality's before it): the image i at
      size S under the key `S-0000i` (5 digits at least; several sizes may be stored), and a key `length` whose
      value is the count as decimal text. `size` (the spec option `?size=S`) picks the size, by default the
      largest. An optional `dataset.json` key (written by `dataset convert`) holds EDM's labels of the keys.
    """

    def __init__(self, path: Path, size: str | None = None):
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
        if b"length" in keys:
            keys = self._sized_keys(keys, size)
        elif size is not None:
            raise DiffdistillError(f"{path}: size={size} applies to an LMDB with sized keys (SIZE-00000 ... and "
                                   "'length'); this one has none")
        # Fixed-width bytes keep millions of keys compact; NUL-terminated keys need Python objects.
        self.keys = np.array(keys, dtype=object if any(k.endswith(b"\0") for k in keys) else bytes)
        self.mode = image_mode(self._value(0), self.item_name(0))

    def _sized_keys(self, keys: list[bytes], size: str | None) -> list[bytes]:
        """The keys of the images 0..length-1 at the chosen size; labels from a `dataset.json` key."""
        path = self.path
        with self._open().begin() as txn:
            raw, meta = txn.get(b"length"), txn.get(b"dataset.json")
        try:
            length = int(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise DiffdistillError(f"{path}: the 'length' entry is {raw[:20]!r}, not a count of images") from None
        by_size: dict[str, dict[int, bytes]] = {}
        for key in keys:
            if key in (b"length", b"dataset.json"):
                continue
            m = _SIZED_KEY.fullmatch(key)
            if m is None:
                raise DiffdistillError(f"{path}: key {key[:40]!r} is not SIZE-INDEX (e.g. b'256-00000'), as an "
                                       "LMDB with a 'length' key must have")
            by_size.setdefault(m.group(1).decode(), {})[int(m.group(2))] = key
        if length < 1 or not by_size:
            raise DiffdistillError(f"{path}: the LMDB has no images (length {length})")

        def order(tag: str):
            return tuple(int(v) for v in tag.split("x"))

        sizes = sorted(by_size, key=order)
        if size is None:
            size = sizes[-1]
        else:
            w, _, h = size.lower().partition("x")
            size = w if h in ("", w) else f"{w}x{h}"
            if size not in by_size:
                raise DiffdistillError(f"{path}: no images of size {size} (sizes here: {', '.join(sizes)})")
        table = by_size[size]
        missing = next((i for i in range(length) if i not in table), None)
        if missing is not None:
            raise DiffdistillError(f"{path}: 'length' says {length} images but there is no key "
                                   f"{size}-{missing:05d}")
        others = [t for t in sizes if t != size]
        self.notes = (f"sized keys {size}-00000 ... of {length} images"
                      + (f" (also sizes {', '.join(others)}: pick one with ?size=S)" if others else ""),)
        ordered = [table[i] for i in range(length)]
        if meta is not None:
            where = f"{path}:dataset.json"
            names = [k.decode() for k in ordered]
            self.labels = parse_labels(meta, names, where)
            self.class_names = parse_class_names(meta, self.labels, where)
            if self.class_names:
                self.label_dim = len(self.class_names)
        return ordered

    def _open(self):
        if self._env is None or self._pid != os.getpid():  # LMDB handles must not cross fork()
            # LMDB allows one handle per file and process: share it between sources of the same path.
            data = self.path / "data.mdb" if self.path.is_dir() else self.path
            try:  # the file's identity too: an LMDB replaced since (dataset convert --force) is opened anew
                stat = data.stat()
                ident = (stat.st_dev, stat.st_ino)
            except OSError:
                ident = None
            key = (str(self.path.resolve()), os.getpid(), ident)
            if key not in _LMDB_ENVS:
                lmdb_check(data)   # a truncated data.mdb would kill the process with SIGBUS once mapped
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

    def header(self, i):
        return image_header(self._value(i), self.item_name(i))


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

_OPTIONS = {"npz": {"split"}, "cifar": {"split"}, "points": {"size", "seed"}, "lmdb": {"size"}}


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
        if lexists(path):   # a dangling symlink or a symlink loop: say which
            regular_file(path, "data set")
        if os.sep not in base and "/" not in base and not path.suffix:
            raise DiffdistillError(f"unknown data set spec {text!r} (expected {SPEC_FORMS})")
        raise DiffdistillError(f"{path}: no such file or directory")
    lower = path.name.lower()
    if path.is_dir():
        if lexists(path / "data.mdb"):

            return build("lmdb", lambda: LmdbSource(path, options.get("size")))
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
        return build("lmdb", lambda: LmdbSource(path, options.get("size")))
    raise DiffdistillError(f"{path}: unknown data set format (expected {SPEC_FORMS})")
