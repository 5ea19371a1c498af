"""Storage of KD's (noise, teacher sample) pairs (Denoising Student, Luhman & Luhman 2021; official
create_dataset.py): the directory format, its manifest, the data set of training pairs that KD's training loop
streams (`PairsDataset`) and the held-out pairs (`read_heldout`).
Making the pairs (running the teacher's sampler) is KD's: `diffdistill.methods.kd_pairs`. This module imports no
sampler, teacher, training loop or method.

A pairs directory holds `pairs.json` (the manifest: teacher fingerprint, sampler recipe, shard list) and
shards `train-00000.safetensors`, ..., `heldout.safetensors`, each with `noise` (the unit Gaussian x_T,
float16), `target` (the teacher's deterministic sample from it: float16, or the paper's truncated uint8) and,
for class-conditional teachers, `cond` (int64 labels). Each shard is written atomically with its teacher
fingerprint and a checksum in its metadata (`write_shard`), so generation resumes at the first missing shard and
a damaged shard is found (`read_shard`) and regenerated. Generation holds one shard in memory; training reads
rows memory-mapped (`PairsDataset`).

Pair k of a shard depends on (seed, the shard's index, k) only: its noise comes from fixed blocks of `block`
rows, each drawn whole from a generator seeded by `noise_seed(seed, index, block number)`. Directories made
before blocks existed (manifest key `batch`, blocks drawn at their actual length) are read with their own rule
(`block_rule`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..errors import DiffdistillError
from ..io import atomic_save_tensors, atomic_write_json

if TYPE_CHECKING:
    from ..diffusion.denoiser import Denoiser

FORMAT = "diffdistill-pairs/1"
MANIFEST = "pairs.json"
HELDOUT = "heldout"
SHARD_OVERHEAD = 4096          # bytes per shard for the safetensors header and metadata (an upper bound)
BLOCK = 512                    # rows per noise block of new directories (each block has its own generator)
HELDOUT_INDEX = -1             # the seed index of the held-out shard of new directories (train shards: 0, 1, ...)


# --------------------------------------------------------------------------------------------------
# The teacher's identity (recorded in the manifest and in every shard)


def teacher_fingerprint(teacher: Denoiser) -> str:
    """sha256 of the teacher's JSON config and of every tensor in its state dict (names, dtypes, bytes)."""
    h = hashlib.sha256()
    try:
        cfg = teacher.config()
    except (NotImplementedError, TypeError):
        cfg = {"class": type(teacher).__name__, "info": teacher.info()}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(teacher.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# Encoding of targets (the official create_dataset.py's)


def encode_target(y: Tensor, kind: str) -> Tensor:
    """uint8: clip to [-1, 1], y*127.5 + 127.5, truncated (the paper's recipe, small downward bias)."""
    if kind == "uint8":
        return (y.float().clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8)
    return y.to(torch.float16)


def decode_target(t: Tensor) -> Tensor:
    if t.dtype == torch.uint8:
        return t.float() / 127.5 - 1
    return t.float()


# --------------------------------------------------------------------------------------------------
# Manifest and shards


def shard_path(root: Path, name: str) -> Path:
    return Path(root) / f"{name}.safetensors"


def block_rule(m: dict) -> tuple[int, bool]:
    """(rows per noise block, whether blocks are drawn whole) of a manifest. Directories made before blocks
    existed record their generation `batch`, and drew each block at its actual length."""
    return (int(m["block"]), True) if "block" in m else (int(m["batch"]), False)


def with_indices(m: dict) -> dict:
    """A manifest whose shards all name their seed index (older ones: their position)."""
    m = dict(m, shards=[dict(s) for s in m["shards"]])
    for i, s in enumerate(m["shards"]):
        s.setdefault("index", i)
    return m


def bytes_per_pair(m: dict) -> int:
    dim = math.prod(m["shape"])
    return dim * 2 + dim * (1 if m["target_dtype"] == "uint8" else 2) + (8 if m["label_dim"] else 0)


def shard_bytes(m: dict, count: int) -> int:
    return count * bytes_per_pair(m) + SHARD_OVERHEAD


def read_manifest(root: str | Path) -> dict:
    """The manifest of a pairs directory, checked against `schema.PAIRS_MANIFEST` (types and ranges of every
    field; shard names are plain file names)."""
    from ..guard import lexists
    from ..schema import PAIRS_MANIFEST, check, load_json

    path = Path(root) / MANIFEST
    if not lexists(path):
        raise DiffdistillError(f"{root}: not a pairs directory (no {MANIFEST}); "
                               "make one with `diffdistill kd-pairs`")
    m = load_json(path, what="JSON")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DiffdistillError(f"{path}: not a {FORMAT} manifest")
    return check(m, PAIRS_MANIFEST, path, "pairs manifest")


def write_manifest(root: str | Path, m: dict) -> None:
    """Write the manifest `m` of the pairs directory `root` (atomically)."""
    atomic_write_json(Path(root) / MANIFEST, m)


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy())  # the buffer itself: no copy of a shard
    return h.hexdigest()[:32]


def read_shard(root: Path, m: dict, name: str, count: int) -> tuple[dict[str, Tensor] | None, str | None]:
    """(tensors, None) when shard `name` is complete with `count` rows and matches the manifest, else
    (None, why it is not)."""
    from safetensors import SafetensorError, safe_open

    path = shard_path(root, name)
    if not path.is_file():
        return None, "missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return None, f"unreadable ({e})"
    if meta.get("teacher") != m["teacher"]:
        return None, f"made by another teacher ({meta.get('teacher')})"
    index = next((s.get("index", i) for i, s in enumerate(m["shards"]) if s["name"] == name), None)
    if index is not None and meta.get("index") != str(index):
        return None, f"made for another shard (index {meta.get('index')}, expected {index})"
    dim = tuple(m["shape"])
    want = {"noise": (torch.float16, (count, *dim)),
            "target": (torch.uint8 if m["target_dtype"] == "uint8" else torch.float16, (count, *dim))}
    if m["label_dim"]:
        want["cond"] = (torch.int64, (count,))
    if set(tensors) != set(want):
        return None, f"has tensors {sorted(tensors)}, expected {sorted(want)}"
    for k, (dtype, shape) in want.items():
        if tensors[k].dtype != dtype or tuple(tensors[k].shape) != shape:
            got = f"{tensors[k].dtype} {tuple(tensors[k].shape)}"
            return None, f"tensor {k!r} is {got}, expected {dtype} {shape}"
    if meta.get("sha256") != _digest(tensors):
        return None, "checksum mismatch (damaged)"
    return tensors, None


def write_shard(root: str | Path, m: dict, spec: dict, tensors: dict[str, Tensor]) -> None:
    """Write shard `spec` (an entry of m['shards']) of the manifest `m` atomically, with its teacher, seed index,
    row count, seed, target dtype and checksum in its metadata (what `read_shard` checks)."""
    meta = dict(format=FORMAT, teacher=m["teacher"], shard=spec["name"], index=str(spec["index"]),
                count=str(spec["count"]), seed=str(m["seed"]), target_dtype=m["target_dtype"],
                sha256=_digest(tensors))
    atomic_save_tensors(shard_path(root, spec["name"]), tensors, metadata=meta)


def load_shard(root: str | Path, m: dict, name: str) -> dict[str, Tensor]:
    """A verified shard as {'noise', 'target', 'cond'?}; a damaged one is named in the error. A manifest that
    uses only the first rows of a shard (`count` below its `stored` rows) gets those."""
    spec = next(s for s in m["shards"] if s["name"] == name)
    tensors, problem = read_shard(Path(root), m, name, spec.get("stored", spec["count"]))
    if problem:
        raise DiffdistillError(f"{shard_path(root, name)}: {problem}; rerun `diffdistill kd-pairs` "
                               "(or `distill kd`) with the same options to regenerate it")
    if "stored" in spec:
        tensors = {k: v[:spec["count"]] for k, v in tensors.items()}
    return tensors


def noise_seed(*parts: int) -> int:
    """A 56-bit generator seed from integers (the noise blocks')."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def check_free_space(root: Path, needed: int) -> None:
    """Refuse when the file system of `root` (or its nearest existing parent) has < `needed` bytes free."""
    probe = Path(root).absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise DiffdistillError(f"{root}: the pairs need about {needed / 2**30:.2f} GiB more, only "
                               f"{free / 2**30:.2f} GiB are free; lower --n-pairs or choose another "
                               "--pairs directory")


def manifest_view(m: dict, n: int, held: int) -> dict:
    """The manifest of the first `n` training and `held` held-out pairs of `m` (shards trimmed to the rows used
    name their `stored` rows)."""
    shards = []
    for s in m["shards"]:
        want = held if s["name"] == HELDOUT else min(s["count"], n - sum(
            t["count"] for t in shards if t["name"] != HELDOUT))
        if want > 0:
            shards.append(dict(s, count=want, stored=s["count"]) if want < s["count"] else dict(s))
    return dict(m, n_pairs=n, heldout=held, shards=shards)


def verify_pairs(root: str | Path, teacher: Denoiser | None = None) -> dict:
    """The manifest of a complete pairs directory (made by `teacher` when given); names a missing shard."""
    m = read_manifest(root)
    if teacher is not None and m["teacher"] != teacher_fingerprint(teacher):
        raise DiffdistillError(f"{root}: these pairs were made by a different teacher (fingerprint "
                               f"{m['teacher']}, this teacher is {teacher_fingerprint(teacher)})")
    from ..guard import lexists, regular_file

    for s in m["shards"]:
        path = shard_path(root, s["name"])
        if not lexists(path):
            raise DiffdistillError(f"{path}: missing; rerun `diffdistill kd-pairs` to finish the pairs")
        rows = s.get("stored", s["count"])
        if regular_file(path, "pairs shard").st_size < rows * bytes_per_pair(m):   # before any row is drawn
            raise DiffdistillError(f"{path}: too small for the {rows} pairs {MANIFEST} lists (damaged); rerun "
                                   "`diffdistill kd-pairs` with the same options to regenerate it")
    return m


# --------------------------------------------------------------------------------------------------
# Reading: the training pairs as a data set the training loop streams, and the held-out pairs


_NUMPY = {"F16": np.float16, "U8": np.uint8, "I64": np.int64}


def map_shard(root: str | Path, m: dict, name: str) -> dict[str, np.memmap]:
    """The tensors of shard `name` memory-mapped read-only ({'noise', 'target', 'cond'?}, each [stored rows, ...]),
    from the safetensors header (8-byte little-endian length, JSON header, data), which must name the tensors,
    dtypes and shapes the manifest `m` implies. Nothing is read until a row is used; the checksum is not checked
    here (`read_shard` does, when `generate_pairs` runs at the start of `distill kd`). Written here because
    safetensors' reader gives whole tensors or contiguous slices, and a shuffled batch needs scattered rows: a
    memory map of the format's documented layout reads just those."""
    spec = next(s for s in m["shards"] if s["name"] == name)
    path = shard_path(root, name)
    rows, dim = spec.get("stored", spec["count"]), list(m["shape"])
    want = {"noise": ("F16", [rows, *dim]), "target": ("U8" if m["target_dtype"] == "uint8" else "F16", [rows, *dim])}
    if m["label_dim"]:
        want["cond"] = ("I64", [rows])
    rerun = "rerun `diffdistill kd-pairs` (or `distill kd`) with the same options to regenerate it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        maps = {}
        for k, (dtype, shape) in want.items():
            info = header.get(k) if isinstance(header, dict) else None
            if not isinstance(info, dict) or info.get("dtype") != dtype or info.get("shape") != shape:
                got = (info.get("dtype"), info.get("shape")) if isinstance(info, dict) else None
                raise ValueError(f"tensor {k!r} is {got}, expected {dtype} {shape}")
            begin, end = info["data_offsets"]
            nbytes = math.prod(shape) * np.dtype(_NUMPY[dtype]).itemsize
            if end - begin != nbytes or begin < 0 or 8 + n + end > size:
                raise ValueError(f"tensor {k!r} lies at bytes {begin}..{end} of the data, outside the file")
            maps[k] = np.memmap(path, dtype=_NUMPY[dtype], mode="r", offset=8 + n + begin, shape=tuple(shape))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DiffdistillError(f"{path}: unreadable ({e}); {rerun}") from None
    return maps


class PairsDataset(torch.utils.data.Dataset):
    """The training pairs of a pairs directory (not the held-out ones: `read_heldout`) as a map-style data set,
    which the training loop streams like any other (its seeded permutation per epoch, each rank and micro-batch
    its own slice, resumed at the images seen).

    Item i is the i-th training pair in the order of the manifest's shards: a dict {'noise': the unit noise
    float32 [*shape], 'target': the teacher's sample float32 [*shape] in data units (`decode_target`), 'cond':
    its int64 label [] (class-conditional pairs only)}; the loop hands such fields to the method as
    `Batch.fields`. Rows are read from the shards memory-mapped (`map_shard`, each shard on its first use in
    each process, so DataLoader workers map their own): memory holds no shard, only the rows being read (the
    page cache keeps what it can).
    """

    def __init__(self, root: str | Path, manifest: dict | None = None):
        self.root = Path(root)
        self.m = manifest or read_manifest(root)
        self.train = [s for s in self.m["shards"] if s["name"] != HELDOUT]
        self.starts = [0]
        for s in self.train:
            self.starts.append(self.starts[-1] + s["count"])
        self.shape, self.label_dim = tuple(self.m["shape"]), int(self.m["label_dim"])
        self._maps: dict[int, dict[str, np.memmap]] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Tensor]]:
        """Items `indices` (the DataLoader's batched read): the rows of each shard are read in one go."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and not (0 <= idx.min() and idx.max() < len(self)):
            raise IndexError(f"a pair index outside 0..{len(self) - 1}")
        out: list = [None] * len(idx)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for j in np.unique(shard).tolist():
            if j not in self._maps:
                self._maps[j] = map_shard(self.root, self.m, self.train[j]["name"])
            at = np.nonzero(shard == j)[0]
            rows = {k: torch.from_numpy(v.view(np.ndarray)[idx[at] - self.starts[j]])   # a copy of those rows
                    for k, v in self._maps[j].items()}
            rows["noise"], rows["target"] = rows["noise"].float(), decode_target(rows["target"])
            for a, row in zip(at.tolist(), zip(*(v.unbind(0) for v in rows.values()))):
                out[a] = dict(zip(rows, row))
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}     # a worker process maps the shards itself


def read_heldout(root: str | Path, m: dict) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """The held-out shard of the manifest `m` as (noise float32, target float32 in data units, cond int64 or None),
    checked against its checksum; None when there is none."""
    if not any(s["name"] == HELDOUT for s in m["shards"]):
        return None
    data = load_shard(root, m, HELDOUT)
    return data["noise"].float(), decode_target(data["target"]), data.get("cond")
