"""`ImageDataset`: one map-style dataset over every format (see `formats.py`), with EDM's options.

Items are `(x, label)`: x float32 in [-1, 1] of `ds.shape` (C, H, W) for images, (D,) for points; label an
int, -1 when there are none. Options, in the order they apply:
  max_size    keep a random subset of this many items (seed 0, original order kept), as EDM's `max_size`
  xflip       double the index space, EDM style: item N + i is item i mirrored left-right (deterministic)
  resolution  an int R (R x R) or (width, height): the size of every image after `transform`, resized with
              PIL Lanczos; without it every image must have the same size
  transform   how an image of another size becomes resolution-sized, as EDM dataset_tool's --transform:
              'center-crop' (the default: the largest centred square, resized; needs width == height),
              'center-crop-wide' (the centred band of the output's aspect, resized to width x height, then
              padded with black rows to width x width; images narrower than width or whose band would be lower
              than height cannot be used: `dataset convert` skips them, reading one raises), or 'resize'
              (resized only when the aspect is the output's, else an error naming the image)
  use_labels  True (use them when present), False (always -1) or 'require' (error when there are none)
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ..errors import DiffdistillError
from ..io import atomic_write, umask
from .formats import Source, open_source

TRANSFORMS = ("center-crop", "center-crop-wide", "resize")


def parse_resolution(value) -> tuple[int, int]:
    """(width, height) from an int R (R x R), a (width, height) pair or text 'WxH', 'W,H' or 'R'."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?", value.lower())
        if not m:
            raise DiffdistillError(f"resolution {value!r}: expected WxH (e.g. 64x64) or one size R")
        w = int(m.group(1))
        size = (w, int(m.group(2)) if m.group(2) else w)
    elif isinstance(value, tuple | list) and len(value) == 2:
        size = tuple(value)
    else:
        size = (value, value)
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in size):
        raise DiffdistillError(f"resolution must be a positive integer or WxH, got {value!r}")
    return int(size[0]), int(size[1])


def check_transform(size: tuple[int, int] | None, transform: str) -> None:
    """Refuse a transform that cannot make `size` (width, height)."""
    if transform not in TRANSFORMS:
        raise DiffdistillError(f"unknown transform {transform!r} ({', '.join(TRANSFORMS)})")
    if size is None and transform != "center-crop":
        raise DiffdistillError(f"the {transform} transform needs a resolution (WxH)")
    if size is not None and transform == "center-crop" and size[0] != size[1]:
        raise DiffdistillError(f"center-crop makes square images, not {size[0]}x{size[1]}; center-crop-wide "
                               "makes a wide band (width > height) padded to a square")
    if size is not None and transform == "center-crop-wide" and size[1] > size[0]:
        raise DiffdistillError(f"center-crop-wide needs width >= height, not {size[0]}x{size[1]}")


def resize_lanczos(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HWC image -> `size` (width, height) with PIL Lanczos; uint8 as an L/RGB image, float32 per channel."""
    if image.shape[1] == size[0] and image.shape[0] == size[1]:
        return image
    if image.dtype == np.uint8:
        pil = PIL.Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
        out = np.asarray(pil.resize(size, PIL.Image.Resampling.LANCZOS))
        return out[:, :, None] if out.ndim == 2 else out
    planes = [PIL.Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
              for c in range(image.shape[2])]
    channels = [np.asarray(p.resize(size, PIL.Image.Resampling.LANCZOS)) for p in planes]
    return np.clip(np.stack(channels, axis=2), -1.0, 1.0)  # Lanczos overshoots a little at edges


def center_crop_resize(image: np.ndarray, resolution) -> np.ndarray:
    """HWC image -> the largest centred square -> resolution (R or (width, height)) with Lanczos."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_lanczos(image[top:top + side, left:left + side], parse_resolution(resolution))


def center_crop_wide(image: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """EDM's `center-crop-wide` to (width, height): keep the centred band of rows whose aspect is the output's,
    resize it to width x height, and centre it on a black width x width canvas. None when the image is
    narrower than width or the band would be lower than height (EDM skips such images)."""
    width, height = size
    h, w = image.shape[:2]
    band = round(width * h / w)  # rows of the band at the output's aspect (round half to even, as numpy)
    if w < width or band < height:
        return None
    top = (h - band) // 2
    resized = resize_lanczos(image[top:top + band], (width, height))
    canvas = np.full((width, width, image.shape[2]), 0 if image.dtype == np.uint8 else -1.0, dtype=image.dtype)
    pad = (width - height) // 2
    canvas[pad:pad + height] = resized
    return canvas


def aspect_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """Resize to (width, height) when the image has that aspect exactly; None when it has another."""
    h, w = image.shape[:2]
    if w * size[1] != h * size[0]:
        return None
    return resize_lanczos(image, size)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 (0..255) or float32 ([-1, 1]) -> CHW float32 in [-1, 1]."""
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    chw = torch.from_numpy(chw if chw.flags.writeable else chw.copy())
    return chw.float().div_(127.5).sub_(1.0) if image.dtype == np.uint8 else chw.float()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HWC uint8 unchanged, float32 in [-1, 1] rounded to 0..255."""
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint((image + 1.0) * 127.5), 0, 255).astype(np.uint8)


def subset_indices(total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """The indices of a seeded random subset of `n` of `total` items, in increasing order; all of them when
    `n` is None or >= total. EDM's rule (`ImageFolderDataset(max_size=n, random_seed=seed)`, which its fid.py
    uses): shuffle 0..total-1 with `np.random.RandomState(seed % 2**31)`, keep the first n, sort."""
    idx = np.arange(total, dtype=np.int64)
    if n is not None and total > n:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:n])
    return idx



class ImageDataset(Dataset):
    """Map-style dataset over a `formats.Source`: `ds[i] -> (x float32 in [-1, 1] of ds.shape, label int)`."""

    def __init__(self, source: Source, resolution: int | tuple[int, int] | None = None, xflip: bool = False,
                 use_labels: bool | str = True, max_size: int | None = None, transform: str = "center-crop"):
        if use_labels not in (True, False, "require"):
            raise DiffdistillError(f"use_labels must be True, False or 'require', got {use_labels!r}")
        size = None if resolution is None else parse_resolution(resolution)
        check_transform(size, transform)
        if max_size is not None and (int(max_size) != max_size or max_size < 1):
            raise DiffdistillError(f"max_size must be a positive integer, got {max_size!r}")
        if source.kind == "points" and (resolution is not None or xflip):
            raise DiffdistillError(f"{source.where}: resolution and xflip apply to images, not to points")
        if use_labels == "require" and source.labels is None:
            raise DiffdistillError(f"{source.where}: labels are required but this data set has none")
        self.source = source
        self.name = source.name
        self.xflip = bool(xflip)
        self._size, self.transform = size, transform

        # Index space (EDM): a seeded random subset for max_size, then tiled twice for xflip.
        raw = subset_indices(len(source), max_size, seed=0)
        self._flip = np.zeros(len(raw), dtype=bool)
        if self.xflip:
            raw, self._flip = np.tile(raw, 2), np.concatenate([self._flip, ~self._flip])
        self._raw = raw

        self._labels = source.labels[raw] if (use_labels and source.labels is not None) else None
        if self._labels is None:
            self.label_dim = 0
        else:
            self.label_dim = int(source.label_dim or int(source.labels.max()) + 1)
        names = getattr(source, "class_names", None)
        self.class_names = list(names) if (self._labels is not None and names) else None

        # Shape from the first item: (D,) for points, (C, H, W) for images.
        first = source.read(int(raw[0]))
        if source.kind == "points":
            self.shape = tuple(first.shape)
        else:
            self._ref_name, self._ref_hw = source.item_name(int(raw[0])), first.shape[:2]
            if size is None:
                h, w = first.shape[:2]
            elif transform == "center-crop-wide":
                h = w = size[0]            # the band is padded to a square
            else:
                w, h = size
            self.shape = (first.shape[2], h, w)

    @property
    def resolution(self) -> int | None:
        """Side of the square images (None for points and non-square images)."""
        if len(self.shape) == 3 and self.shape[1] == self.shape[2]:
            return self.shape[1]
        return None

    @property
    def labels(self) -> np.ndarray | None:
        """int64 labels of the whole index space, or None."""
        return self._labels

    def __len__(self) -> int:
        return len(self._raw)

    def _raw_index(self, index) -> int:
        index = int(index)
        if not 0 <= index < len(self._raw):
            raise IndexError(f"index {index} out of range for a data set of {len(self._raw)} items")
        return int(self._raw[index])

    def item_name(self, index: int) -> str:
        """Where item `index` is read from (a file, a zip member, an array row)."""
        return self.source.item_name(self._raw_index(index))

    def image(self, index: int, skip_unfit: bool = False) -> np.ndarray | None:
        """Item `index` after crop/resize/flip: HWC uint8 or float32 in [-1, 1]; points as (D,). An image the
        transform cannot use (center-crop-wide: too small) raises, or gives None with `skip_unfit`."""
        raw = self._raw_index(index)
        item = self.source.read(raw)
        if self.source.kind == "points":
            return item
        if self._size is not None:
            item = self._transformed(item, raw, skip_unfit)
            if item is None:
                return None
        elif item.shape[:2] != self._ref_hw:
            self._size_error(self.source.item_name(raw), item.shape[1], item.shape[0])
        if self._flip[index]:
            item = item[:, ::-1]
        return item

    def _transformed(self, item: np.ndarray, raw: int, skip_unfit: bool) -> np.ndarray | None:
        (h, w), (ow, oh) = item.shape[:2], self._size
        if self.transform == "center-crop":
            return center_crop_resize(item, self._size)
        if self.transform == "resize":
            out = aspect_resize(item, self._size)
            if out is None:
                raise DiffdistillError(f"{self.source.item_name(raw)}: image is {w}x{h}, not of the aspect of "
                                       f"{ow}x{oh}: pass a transform (--transform center-crop or "
                                       "center-crop-wide) to crop it")
            return out
        out = center_crop_wide(item, self._size)
        if out is None and not skip_unfit:
            raise DiffdistillError(f"{self.source.item_name(raw)}: image is {w}x{h}, too small for "
                                   f"center-crop-wide to {ow}x{oh} (dataset convert skips such images)")
        return out

    def label(self, index: int) -> int:
        return -1 if self._labels is None else int(self._labels[int(index)])

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        item = self.image(index)
        if self.source.kind == "points":
            return torch.from_numpy(np.array(item, dtype=np.float32)), self.label(index)
        return to_tensor(item), self.label(index)

    def _size_error(self, name: str, w: int, h: int):
        ref_w, ref_h = self._ref_hw[1], self._ref_hw[0]
        raise DiffdistillError(f"{name}: image is {w}x{h} but {self._ref_name} is {ref_w}x{ref_h}; "
                               "pass a resolution (and a transform) to crop and resize them all")

    def check(self) -> None:
        """Open every image header (cheap: no pixel decoding) and check it is readable and, without a
        resolution, of the same size as the first; raises DiffdistillError naming the first bad file."""
        for name, (w, h) in self.source.headers():
            if self._size is None and (h, w) != tuple(self._ref_hw):
                self._size_error(name, w, h)

    def __repr__(self) -> str:
        flip = ", xflip" if self.xflip else ""
        return (f"ImageDataset({self.name!r}, {len(self)} items, shape {self.shape}, "
                f"label_dim {self.label_dim}{flip})")


def open_dataset(spec: str | os.PathLike, resolution: int | tuple[int, int] | None = None, xflip: bool = False,
                 use_labels: bool | str = True, max_size: int | None = None, *, split: str | None = None,
                 check: bool = False, transform: str = "center-crop") -> ImageDataset:
    """Open a data set lazily from a spec (see `formats.open_source`; split= for CIFAR/.npz); `check=True`
    verifies every image header on open instead of at read time."""
    ds = ImageDataset(open_source(spec, split=split), resolution, xflip, use_labels, max_size, transform)
    if check:
        ds.check()
    return ds


def image_sizes(ds: ImageDataset, limit: int | None = None) -> tuple[dict[tuple[int, int], int], int, int]:
    """How many images of `ds` are stored at each size (width, height), before any transform, from their headers
    (each checked cheaply, see `formats.image_header`): all of them, or `limit` spread evenly over the data set.
    Returns (counts, number looked at, number of distinct images). Array formats (npz, CIFAR, digits) have one
    shape: no header is read."""
    raw = np.unique(ds._raw)
    total = len(raw)
    h, w = ds._ref_hw
    if ds.source.header(int(raw[0])) is None:
        return {(int(w), int(h)): total}, total, total
    if limit is not None and len(raw) > limit:
        raw = raw[np.linspace(0, len(raw) - 1, limit).round().astype(np.int64)]
    counts: dict[tuple[int, int], int] = {}
    for i in raw:
        size = ds.source.header(int(i))
        counts[size] = counts.get(size, 0) + 1
    return counts, len(raw), total


def edm_zip_name(index: int) -> str:
    """EDM/StyleGAN zip layout: 1,000 images per folder, `00000/img00000000.png`."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


WRITE_FORMATS = ("zip", "folder", "lmdb")


def lmdb_key(width: int, height: int, index: int) -> str:
    """The key of image `index` in the sized-key LMDB layout (`SIZE-00042`, as progressive distillation's
    `prepare_data.py` names them; `WxH-00042` for non-square images) next to a `length` key."""
    return f"{width if width == height else f'{width}x{height}'}-{index:05d}"


def dest_format(dest: str | os.PathLike, fmt: str | None = None) -> str:
    """The format to write at `dest`: `fmt` when given, else by name: *.zip, *.lmdb or *_lmdb (LSUN's naming),
    and a name without a suffix is a folder."""
    if fmt is not None:
        if fmt not in WRITE_FORMATS:
            raise DiffdistillError(f"unknown output format {fmt!r} ({', '.join(WRITE_FORMATS)})")
        return fmt
    name = Path(dest).name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".lmdb", "_lmdb")):
        return "lmdb"
    if not Path(name).suffix:
        return "folder"
    raise DiffdistillError(f"{dest}: cannot tell the format from the name (.zip, .lmdb or _lmdb, or a folder "
                           "name without a suffix); pass --format zip|folder|lmdb")


def _png(image: np.ndarray) -> bytes:
    image = np.ascontiguousarray(to_uint8(image))
    buf = io.BytesIO()
    PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="png", compress_level=6)
    return buf.getvalue()


def _replaceable(path: Path) -> bool:
    """Whether an existing `path` may be replaced by --force: a file, or a folder holding only a data set of the
    kind convert writes (an LMDB's data.mdb/lock.mdb, or images with a dataset.json), never any other folder."""
    if not path.is_dir() or path.is_symlink():
        return True
    entries = {p.name for p in path.iterdir()}
    if not entries or ("data.mdb" in entries and entries <= {"data.mdb", "lock.mdb"}):
        return True
    return "dataset.json" in entries and all(
        p.is_dir() or p.name == "dataset.json" or p.name.lower().endswith(".png") for p in path.rglob("*"))


def _install(tmp: Path, dest: Path) -> None:
    """Move the finished `tmp` to `dest`, replacing what is there (a folder is moved aside, then removed)."""
    import shutil

    if dest.is_dir() and not dest.is_symlink():
        aside = dest.parent / f".{dest.name}.old.{os.getpid()}"
        os.rename(dest, aside)
        os.rename(tmp, dest)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, dest)


class WriteResult:
    """What `write_dataset` wrote: `count` images, the item names of the `skipped` ones (center-crop-wide)."""

    def __init__(self, dest: Path, fmt: str, count: int, skipped: list[str]):
        self.dest, self.format, self.count, self.skipped = dest, fmt, count, skipped


def write_dataset(ds: ImageDataset, dest: str | os.PathLike, fmt: str | None = None, *, progress: bool = False,
                  force: bool = False) -> WriteResult:
    """Write the images of `ds` as PNGs, atomically (a temporary beside `dest`, renamed at the end):

      zip     the EDM/StyleGAN layout: `00000/img00000000.png` ... and `dataset.json`
      folder  the same layout as files under the folder `dest`
      lmdb    an LMDB folder: one PNG per key `SIZE-00000` ... and `length` (the decimal count), the layout of
              progressive distillation's `prepare_data.py`, plus a `dataset.json` key

    `dataset.json` is EDM's {"labels": [[name, class], ...] or null}, plus "class_names" when `ds` knows them.
    Images the transform cannot use (center-crop-wide: too small) are skipped, as EDM does. An existing `dest` is
    refused unless `force`; even then only a file or a data set folder is replaced.
    """
    import json
    import shutil
    import tempfile

    from tqdm import tqdm

    dest = Path(dest)
    fmt = dest_format(dest, fmt)
    if ds.source.kind != "image":
        raise DiffdistillError(f"{ds.source.where}: only images can be written, not points")
    if dest.exists() or dest.is_symlink():
        if not force:
            raise DiffdistillError(f"{dest}: already exists; pass --force to replace it")
        if not _replaceable(dest):
            raise DiffdistillError(f"{dest}: is a folder that does not hold a data set; not replacing it even "
                                   "with --force (remove it yourself or choose another destination)")
    _, height, width = ds.shape
    labelled = bool(ds.label_dim)
    names, labels, skipped = [], [], []

    def images():
        for i in tqdm(range(len(ds)), desc=f"writing {dest.name}", unit="img", disable=not progress):
            image = ds.image(i, skip_unfit=True)
            if image is None:
                skipped.append(ds.item_name(i))
                continue
            n = len(names)
            name = edm_zip_name(n) if fmt != "lmdb" else lmdb_key(width, height, n)
            names.append(name)
            labels.append([name, ds.label(i)])
            yield name, _png(image)

    def meta() -> bytes:  # called after the last image
        if not names:
            raise DiffdistillError(f"{ds.source.where}: no image is large enough for center-crop-wide to "
                                   f"{width}x{ds._size[1]}; nothing written")
        obj = {"labels": labels if labelled else None}
        if labelled and ds.class_names:
            obj["class_names"] = ds.class_names
        return json.dumps(obj).encode()

    if fmt == "zip":
        import zipfile

        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
                for name, data in images():
                    zf.writestr(name, data)
                zf.writestr("dataset.json", meta())

        if dest.is_dir() and not dest.is_symlink():  # --force over a folder: write beside, then swap
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)) / "out.zip"
            try:
                atomic_write(tmp, write)
                _install(tmp, dest)
            finally:
                shutil.rmtree(tmp.parent, ignore_errors=True)
        else:
            atomic_write(dest, write)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            if fmt == "folder":
                for name, data in images():
                    (tmp / name).parent.mkdir(exist_ok=True)
                    (tmp / name).write_bytes(data)
                (tmp / "dataset.json").write_bytes(meta())
            else:
                _write_lmdb(tmp, images, meta)
            os.chmod(tmp, 0o777 & ~umask())
            _install(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return WriteResult(dest, fmt, len(names), skipped)


def _write_lmdb(folder: Path, images, meta) -> None:
    """Fill a new LMDB in `folder` from `images()` ((key, bytes) pairs), then `length` and `dataset.json`; the
    map grows as needed (an LMDB's size is fixed when opened)."""
    try:
        import lmdb
    except ImportError:
        raise DiffdistillError("writing an LMDB needs the optional package lmdb (pip install lmdb)") from None
    env = lmdb.open(str(folder), map_size=1 << 28, subdir=True, readahead=False, meminit=False)

    def put(pairs: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                with env.begin(write=True) as txn:
                    for key, value in pairs:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)

    try:
        batch, count, nbytes = [], 0, 0
        for name, data in images():
            batch.append((name.encode(), data))
            count, nbytes = count + 1, nbytes + len(data)
            if len(batch) >= 1024 or nbytes >= 1 << 26:
                put(batch)
                batch, nbytes = [], 0
        put(batch + [(b"length", str(count).encode()), (b"dataset.json", meta())])
        env.sync(True)
    finally:
        env.close()


def write_edm_zip(ds: ImageDataset, dest: str | os.PathLike, progress: bool = False, force: bool = True) -> Path:
    """Write `ds` as PNGs in the EDM zip layout with `dataset.json` (labels or null), atomically."""
    return write_dataset(ds, dest, "zip", progress=progress, force=force).dest
