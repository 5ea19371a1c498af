"""Training statistics (`RUN/stats.jsonl`, TensorBoard) and pictures of samples (image grids, 2-D scatters).

`save_image_grid` and `save_scatter` are plain helpers that any command may import.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from ..io import atomic_write


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPUs, else the resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StatsWriter:
    """Appends one JSON object per line to RUN/stats.jsonl and mirrors numbers to TensorBoard if available."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "stats.jsonl"
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            nimg = int(round(record.get("kimg", 0) * 1000))
            for key, value in record.items():
                if key not in ("kimg", "step") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, nimg)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] float images [N, C, H, W] -> uint8 [N, H, W, C]."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(images: Tensor, path: str | Path, ncol: int | None = None, scale: int | None = None) -> Path:
    """Save images in [-1, 1], [N, C, H, W] with C in (1, 3), as one PNG grid (atomically).

    ncol: images per row (default: the smallest square). scale: integer upscaling (default: to ~64 px tiles).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    scale = scale or max(1, 64 // max(h, w))
    tiles = _to_uint8(images)
    grid = np.zeros((nrow * h, ncol * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = tiles[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path


def save_scatter(points: Tensor, path: str | Path, size: int = 512, extent: float | None = None,
                 reference: Tensor | None = None) -> Path:
    """Save 2-D points [N, 2] as a scatter PNG (white background; `reference` points drawn in grey first)."""
    pts = points.detach().double().cpu().reshape(len(points), -1)[:, :2].numpy()
    ref = None if reference is None else reference.detach().double().cpu().reshape(len(reference), -1)[:, :2].numpy()
    if extent is None:
        allp = pts if ref is None else np.concatenate([pts, ref])
        finite = allp[np.isfinite(allp).all(1)]
        extent = float(np.abs(finite).max()) * 1.1 if len(finite) else 1.0
        extent = max(extent, 1e-6)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    half = size / 2
    draw.line([(0, half), (size, half)], fill=(225, 225, 225))
    draw.line([(half, 0), (half, size)], fill=(225, 225, 225))
    for arr, colour in ((ref, (170, 170, 170)), (pts, (31, 90, 180))):
        if arr is None:
            continue
        for x, y in arr:
            if not (np.isfinite(x) and np.isfinite(y)):
                continue
            u, v = half + x / extent * half, half - y / extent * half
            draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=colour)
    path = Path(path)
    atomic_write(path, lambda p: img.save(p, format="PNG"))
    return path
