"""The `.npz` layouts of sample and reference batches that `diffdistill eval` reads besides its data specs.

- guided-diffusion / consistency-models (ADM's `evaluations/evaluator.py`) sample batches: `arr_0`
  [N, H, W, C] uint8 (C = 3; 1 is accepted), optionally `arr_1` [N] class labels.
- their reference batches (`VIRTUAL_imagenet64_labeled.npz`, ...): `arr_0` images as above, plus `mu`, `sigma`
  (Inception pool_3 statistics, 2048-d; for ImageNet over the whole training set, not over `arr_0`) and
  `mu_s`, `sigma_s` (spatial features, for sFID, which diffdistill does not compute). FID uses `mu`/`sigma`
  (made by `inception.adm_identity()`); KID and precision/recall use the features of `arr_0`.
- diffdistill's `sample npz` output: `x` [N, C, H, W] float32 raw samples (not clamped), `seeds` [N],
  `labels` [N] (-1: unconditional). Evaluated as `eval RUN` evaluates the same samples: clamped to [-1, 1],
  then quantised to uint8 by the feature network (`(x * 127.5 + 128).clip(0, 255)`, EDM's rule).

Uncompressed members are memory-mapped (as `data.formats` does), so 50k-image batches are not loaded whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import DiffdistillError
from ..guard import NpzFile

ADM_REFERENCE, ADM_SAMPLES, SAMPLE_NPZ = "adm-reference", "adm-samples", "sample-npz"
LAYOUT_NAMES = {ADM_REFERENCE: "guided-diffusion reference batch (arr_0 + mu/sigma)",
                ADM_SAMPLES: "guided-diffusion sample batch (arr_0)",
                SAMPLE_NPZ: "diffdistill `sample npz` output (x, seeds, labels)"}


def npz_keys(path: str | os.PathLike) -> set[str] | None:
    """The array names of a local `.npz` file, or None when `path` is not one (a data spec with options, a
    folder, a missing or unreadable file: `data.open_dataset` then says what is wrong)."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return None
    try:
        with NpzFile(path) as npz:
            return set(npz.keys)
    except DiffdistillError:
        return None


def npz_layout(path: str | os.PathLike) -> str | None:
    """ADM_REFERENCE, ADM_SAMPLES, SAMPLE_NPZ, or None (another layout: a data set for `data.open_dataset`)."""
    keys = npz_keys(path)
    if not keys:
        return None
    if "arr_0" in keys:
        return ADM_REFERENCE if {"mu", "sigma"} <= keys else ADM_SAMPLES
    if {"x", "seeds"} <= keys:
        return SAMPLE_NPZ
    return None


def _array(path: Path, key: str) -> np.ndarray:
    """Array `key`, its header checked first (`guard.NpzFile`); memory-mapped when stored uncompressed."""
    with NpzFile(path) as npz:
        return npz.array(key)


class NpzImages:
    """The images of an ADM batch or a `sample npz` file as a data set: `ds[i] -> (x float32 [C, H, W] in
    [-1, 1], label)`, with `shape` (C, H, W), `label_dim`, `layout`, `seeds` (sample npz) and `note` (how the
    values were converted, for the record)."""

    def __init__(self, path: str | os.PathLike, layout: str | None = None):
        path = Path(path)
        layout = layout or npz_layout(path)
        if layout not in LAYOUT_NAMES:
            raise DiffdistillError(f"{path}: not a guided-diffusion batch (arr_0) nor a `sample npz` file "
                                   "(x, seeds)")
        self.path, self.where, self.layout, self.name = path, str(path), layout, path.stem
        self.seeds = None
        keys = npz_keys(path) or set()
        if layout == SAMPLE_NPZ:
            x = _array(path, "x")
            if x.ndim != 4 or x.shape[1] not in (1, 3) or not np.issubdtype(x.dtype, np.floating):
                raise DiffdistillError(f"{path}: 'x' must hold float images [N, C, H, W] with C = 1 or 3, got "
                                       f"{x.dtype} {x.shape} (points get the exact toy metrics: evaluate the run)")
            seeds = _array(path, "seeds")
            if seeds.shape != (len(x),):
                raise DiffdistillError(f"{path}: 'seeds' must be [{len(x)}], got {seeds.shape}")
            self.seeds = seeds.astype(np.int64)
            labels = _array(path, "labels") if "labels" in keys else None
            bad, outside = 0, 0
            for lo in range(0, len(x), 1024):  # one pass: refuse NaN/inf, count what the clamp changes
                chunk = np.asarray(x[lo:lo + 1024])
                bad += int((~np.isfinite(chunk)).sum())
                outside += int((np.abs(chunk) > 1).sum())
            if bad:
                raise DiffdistillError(f"{path}: 'x' holds {bad} NaN or inf values")
            self.note = (f"raw samples clamped to [-1, 1] ({outside / x.size:.3%} of values were outside) and "
                         "quantised to uint8 as `eval RUN` does")
            self.shape = tuple(int(s) for s in x.shape[1:])
        else:
            x = _array(path, "arr_0")
            if x.ndim != 4 or x.shape[3] not in (1, 3) or x.dtype != np.uint8:
                raise DiffdistillError(f"{path}: 'arr_0' must hold uint8 images [N, H, W, C] with C = 1 or 3 "
                                       f"(the guided-diffusion layout), got {x.dtype} {x.shape}")
            labels = _array(path, "arr_1") if "arr_1" in keys else None
            self.note = "uint8 NHWC images (guided-diffusion layout)"
            self.shape = (int(x.shape[3]), int(x.shape[1]), int(x.shape[2]))
        if len(x) == 0:
            raise DiffdistillError(f"{path}: holds no images")
        self.x = x
        self.labels = None
        if labels is not None:
            if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer):
                raise DiffdistillError(f"{path}: labels must be {len(x)} integers, got {labels.dtype} "
                                       f"{labels.shape}")
            from ..schema import MAX_LABEL

            if int(labels.max()) > MAX_LABEL or int(labels.min()) < -1:
                raise DiffdistillError(f"{path}: labels must lie in -1..{MAX_LABEL} (-1: unconditional), found "
                                       f"{int(labels.min())}..{int(labels.max())}")

            if int(labels.max()) >= 0:
                self.labels = labels.astype(np.int64)
        self.label_dim = 0 if self.labels is None else int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from ..data.images import to_tensor

        a = np.asarray(self.x[int(i)])
        label = -1 if self.labels is None else int(self.labels[int(i)])
        if self.layout == SAMPLE_NPZ:
            return torch.from_numpy(np.clip(a, -1, 1).astype(np.float32)), label
        return to_tensor(a), label
