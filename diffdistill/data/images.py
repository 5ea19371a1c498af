"""`ImageDataset`: one map-style dataset over every format (see `formats.py`), with EDM's options.

Items are `(x, label)`: x float32 in [-1, 1] of `ds.shape` (C, H, W) for images, (D,) for points; label an
int, -1 when there are none. Options, in the order they apply:
  max_size    keep a random subset of this many items (seed 0, original order kept), as EDM's `max_size`
  xflip       double the index space, EDM style: item N + i is item i mirrored left-right (deterministic)
  resolution  centre-crop to a square, then resize to resolution x resolution with PIL Lanczos
              (EDM dataset_tool's `center-crop` transform); without it every image must have the same size
  use_labels  True (use them when present), False (always -1) or 'require' (error when there are none)
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import Dataset

from ..errors import DiffdistillError
from ..io import atomic_write
from .formats import Source, open_source


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """HWC image -> centre square crop -> resolution x resolution (Lanczos; float images per channel)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top:top + side, left:left + side]
    if side == resolution:
        return image
    size = (resolution, resolution)
    if image.dtype == np.uint8:
        pil = PIL.Image.fromarray(np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image))
        out = np.asarray(pil.resize(size, PIL.Image.Resampling.LANCZOS))
        return out[:, :, None] if out.ndim == 2 else out
    planes = [PIL.Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
              for c in range(image.shape[2])]
    channels = [np.asarray(p.resize(size, PIL.Image.Resampling.LANCZOS)) for p in planes]
    return np.clip(np.stack(channels, axis=2), -1.0, 1.0)  # Lanczos overshoots a little at edges


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

    def __init__(self, source: Source, resolution: int | None = None, xflip: bool = False,
                 use_labels: bool | str = True, max_size: int | None = None):
        if use_labels not in (True, False, "require"):
            raise DiffdistillError(f"use_labels must be True, False or 'require', got {use_labels!r}")
        if resolution is not None and (int(resolution) != resolution or resolution < 1):
            raise DiffdistillError(f"resolution must be a positive integer, got {resolution!r}")
        if max_size is not None and (int(max_size) != max_size or max_size < 1):
            raise DiffdistillError(f"max_size must be a positive integer, got {max_size!r}")
        if source.kind == "points" and (resolution is not None or xflip):
            raise DiffdistillError(f"{source.where}: resolution and xflip apply to images, not to points")
        if use_labels == "require" and source.labels is None:
            raise DiffdistillError(f"{source.where}: labels are required but this data set has none")
        self.source = source
        self.name = source.name
        self.xflip = bool(xflip)
        self._resolution = None if resolution is None else int(resolution)

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

        # Shape from the first item: (D,) for points, (C, H, W) for images.
        first = source.read(int(raw[0]))
        if source.kind == "points":
            self.shape = tuple(first.shape)
        else:
            self._ref_name, self._ref_hw = source.item_name(int(raw[0])), first.shape[:2]
            h, w = first.shape[:2] if self._resolution is None else (self._resolution,) * 2
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

    def image(self, index: int) -> np.ndarray:
        """Item `index` after crop/resize/flip: HWC uint8 or float32 in [-1, 1]; points as (D,)."""
        raw = self._raw_index(index)
        item = self.source.read(raw)
        if self.source.kind == "points":
            return item
        if self._resolution is not None:
            item = center_crop_resize(item, self._resolution)
        elif item.shape[:2] != self._ref_hw:
            self._size_error(self.source.item_name(raw), item.shape[1], item.shape[0])
        if self._flip[index]:
            item = item[:, ::-1]
        return item

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
                               "pass a resolution to centre-crop and resize them all")

    def check(self) -> None:
        """Open every image header (cheap: no pixel decoding) and check it is readable and, without a
        resolution, of the same size as the first; raises DiffdistillError naming the first bad file."""
        for name, (w, h) in self.source.headers():
            if self._resolution is None and (h, w) != tuple(self._ref_hw):
                self._size_error(name, w, h)

    def __repr__(self) -> str:
        flip = ", xflip" if self.xflip else ""
        return (f"ImageDataset({self.name!r}, {len(self)} items, shape {self.shape}, "
                f"label_dim {self.label_dim}{flip})")


def open_dataset(spec: str | os.PathLike, resolution: int | None = None, xflip: bool = False,
                 use_labels: bool | str = True, max_size: int | None = None, *, split: str | None = None,
                 check: bool = False) -> ImageDataset:
    """Open a data set lazily from a spec (see `formats.open_source`; split= for CIFAR/.npz); `check=True`
    verifies every image header on open instead of at read time."""
    ds = ImageDataset(open_source(spec, split=split), resolution, xflip, use_labels, max_size)
    if check:
        ds.check()
    return ds


def edm_zip_name(index: int) -> str:
    """EDM/StyleGAN zip layout: 1,000 images per folder, `00000/img00000000.png`."""
    digits = f"{index:08d}"
    return f"{digits[:5]}/img{digits}.png"


def write_edm_zip(ds: ImageDataset, dest: str | os.PathLike, progress: bool = False) -> Path:
    """Write `ds` as PNGs in the EDM zip layout with `dataset.json` (labels or null), atomically."""
    import json
    import zipfile

    from tqdm import tqdm

    dest = Path(dest)
    if ds.source.kind != "image":
        raise DiffdistillError(f"{ds.source.where}: only images can be written to a zip, not points")

    def write(tmp: Path) -> None:
        labels = []
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            for i in tqdm(range(len(ds)), desc=f"writing {dest.name}", unit="img", disable=not progress):
                image = np.ascontiguousarray(to_uint8(ds.image(i)))
                buf = io.BytesIO()
                PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buf, format="png",
                                                                                          compress_level=6)
                zf.writestr(edm_zip_name(i), buf.getvalue())
                labels.append([edm_zip_name(i), ds.label(i)])
            zf.writestr("dataset.json", json.dumps({"labels": labels if ds.label_dim else None}))

    atomic_write(dest, write)
    return dest
