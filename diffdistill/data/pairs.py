"""Storage of KD's (noise, teacher sample) pairs (Denoising Student, Luhman & Luhman 2021; official
create_dataset.py): the directory format, its manifest, and the stream of training pairs that KD reads.
Making the pairs (running the teacher's sampler) is KD's: `diffdistill.methods.kd_pairs`. This module imports no
sampler, teacher, training loop or method.

A pairs directory holds `pairs.json` (the manifest: teacher fingerprint, sampler recipe, shard list) and
shards `train-00000.safetensors`, ..., `heldout.safetensors`, each with `noise` (the unit Gaussian x_T,
float16), `target` (the teacher's deterministic sample from it: float16, or the paper's truncated uint8) and,
for class-conditional teachers, `cond` (int64 labels). Each shard is written atomically with its teacher
fingerprint and a checksum in its metadata (`write_shard`), so generation resumes at the first missing shard and
a damaged shard is found (`read_shard`) and regenerated. Memory is bounded by one shard (two while reading across
a shard boundary).

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
    """A 56-bit generator seed from integers (the noise blocks' and the stream's permutations')."""
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
# Reading: a deterministic, resumable stream of training batches


class PairStream:
    """Training pairs in a reproducible order, at most two shards in memory.

    Epoch e visits the training shards in a permutation drawn from (seed, e) and each shard's rows in a
    permutation from (seed, e, shard); `rows(p, n)` returns stream positions p..p+n-1, so a trainer only needs
    to remember an integer cursor to resume exactly.
    """

    def __init__(self, root: str | Path, manifest: dict | None = None, seed: int = 0):
        self.root = Path(root)
        self.m = manifest or read_manifest(root)
        self.train = [s for s in self.m["shards"] if s["name"] != HELDOUT]
        self.n = sum(s["count"] for s in self.train)
        self.seed = seed
        self._cache: dict[str, dict[str, Tensor]] = {}
        self._order: tuple[int, list[int], list[int]] | None = None

    def shard(self, name: str) -> dict[str, Tensor]:
        if name not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = load_shard(self.root, self.m, name)
        return self._cache[name]

    def _epoch(self, e: int) -> tuple[list[int], list[int]]:
        if self._order is None or self._order[0] != e:
            g = torch.Generator().manual_seed(noise_seed(self.seed, e))
            order = torch.randperm(len(self.train), generator=g)
            starts, acc = [], 0
            for k in order.tolist():
                starts.append(acc)
                acc += self.train[k]["count"]
            self._order = (e, order.tolist(), starts)
        return self._order[1], self._order[2]

    def rows(self, position: int, n: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(noise float32, target float32 in data units, cond int64 or None) at stream positions."""
        parts: list[dict[str, Tensor]] = []
        while n > 0:
            e, off = divmod(position, self.n)
            order, starts = self._epoch(e)
            j = max(i for i, s in enumerate(starts) if s <= off)
            spec = self.train[order[j]]
            local = off - starts[j]
            take = min(n, spec["count"] - local)
            perm = torch.randperm(spec["count"], generator=torch.Generator().manual_seed(
                noise_seed(self.seed, e, order[j])))[local:local + take]
            data = self.shard(spec["name"])
            parts.append({k: v[perm] for k, v in data.items()})
            position += take
            n -= take
        noise = torch.cat([p["noise"] for p in parts]).float()
        target = decode_target(torch.cat([p["target"] for p in parts]))
        cond = torch.cat([p["cond"] for p in parts]) if "cond" in parts[0] else None
        return noise, target, cond

    def heldout(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The held-out shard (noise, target, cond), or None when there is none."""
        if not any(s["name"] == HELDOUT for s in self.m["shards"]):
            return None
        data = load_shard(self.root, self.m, HELDOUT)
        return data["noise"].float(), decode_target(data["target"]), data.get("cond")
