"""(noise, teacher sample) pairs for regression-style distillation (Denoising Student, algorithms.md §2.2).

A pairs directory holds `pairs.json` (the manifest: teacher fingerprint, sampler recipe, shard list) and
shards `train-00000.safetensors`, ..., `heldout.safetensors`, each with `noise` (the unit Gaussian x_T,
float16), `target` (the teacher's deterministic sample from it: float16, or the paper's truncated uint8) and,
for class-conditional teachers, `cond` (int64 labels). Each shard is written atomically with its teacher
fingerprint and a checksum in its metadata, so generation resumes at the first missing shard and a damaged
shard is found (and regenerated). Under torchrun rank r writes shards r, r+W, ... Memory is bounded by one
shard (two while reading across a shard boundary).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..diffusion.denoiser import Denoiser, Precond
from ..errors import DiffdistillError
from ..io import atomic_save_tensors, atomic_write_json

FORMAT = "diffdistill-pairs/1"
MANIFEST = "pairs.json"
HELDOUT = "heldout"
SHARD_OVERHEAD = 4096          # bytes per shard for the safetensors header and metadata (an upper bound)


@dataclass
class PairsConfig:
    """What pairs to generate; recorded in pairs.json, and a resumed run must ask for the same."""

    n_pairs: int = 1_024_000     # training pairs (paper: 1.024M for CIFAR-10)
    heldout: int = 51_200        # held-out pairs for model selection, one extra shard (0 = none)
    shard_size: int = 102_400    # pairs per shard (paper: 102,400)
    sampler: str = "auto"        # auto | ddim-quad | ddim-uniform | euler | heun (auto: ddim-quad for a
                                 # discrete DDPM teacher, heun for continuous ones)
    steps: int = 0               # sampler steps; 0 = default (ddim-quad 100, ddim-uniform 50, heun 18,
                                 # euler 50)
    target_dtype: str = "auto"   # float16 | uint8 (paper: clip, *127.5+127.5, truncate) | auto (uint8 for
                                 # images, float16 otherwise)
    batch: int = 512             # generation batch size (no effect on the pairs)
    seed: int = 0                # pair k of shard s depends on (seed, s, k // batch) only


# --------------------------------------------------------------------------------------------------
# The teacher: identity and deterministic-sampler compatibility


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


@torch.no_grad()
def check_deterministic_teacher(teacher, what: str = "teacher") -> None:
    """Refuse teachers that have no probability-flow ODE to follow: not a denoiser, a consistency-style
    (boundary) network, or a denoiser whose output is random (dropout left on, a stochastic wrapper)."""
    if not isinstance(teacher, Denoiser):
        raise DiffdistillError(f"the {what} ({type(teacher).__name__}) is not a denoiser D(x, sigma)")
    if isinstance(teacher, Precond) and teacher.precond.kind == "boundary":
        raise DiffdistillError(f"the {what} is a consistency-style (boundary) network: it maps to x0 "
                               "directly and has no probability-flow ODE for a deterministic sampler")
    if not 0 < teacher.sigma_min < teacher.sigma_max < math.inf:
        raise DiffdistillError(f"the {what} has an unusable noise range "
                               f"[{teacher.sigma_min}, {teacher.sigma_max}]")
    p = next(iter(teacher.parameters()), None)
    device = p.device if p is not None else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *teacher.shape, generator=g).to(device)
    cond = torch.zeros(2, dtype=torch.long, device=device) if teacher.label_dim else None
    for sigma in (teacher.sigma_max, math.sqrt(teacher.sigma_min * teacher.sigma_max)):
        a = teacher(x * sigma, sigma, cond)
        b = teacher(x * sigma, sigma, cond)
        if not bool(torch.isfinite(a).all()):
            raise DiffdistillError(f"the {what} returns non-finite values at sigma={sigma:g}")
        if not torch.equal(a, b):
            raise DiffdistillError(f"the {what} is not deterministic (two calls on the same input differ: "
                                   "dropout in training mode or a stochastic wrapper), so it has no "
                                   "deterministic sampler")


# --------------------------------------------------------------------------------------------------
# The teacher's sampler (§2.1)


def ddpm_quadratic_sigmas(discrete_sigmas: Tensor, steps: int = 100, start: float = 0.8) -> Tensor:
    """Denoising Student's CIFAR/CelebA DDIM grid: indices int(linspace(0, sqrt(start*T), steps)^2)
    (duplicates from the truncation dropped: a step between equal indices is the identity), descending, then 0
    (abar = 1)."""
    table = torch.as_tensor(discrete_sigmas, dtype=torch.float64)
    top = int(round(start * len(table)))
    idx = (torch.linspace(0, math.sqrt(top), steps, dtype=torch.float64) ** 2).long()
    idx = idx.clamp(max=len(table) - 1)
    return torch.cat([table[idx.unique().flip(0)], table.new_zeros(1)])


def ddpm_uniform_sigmas(discrete_sigmas: Tensor, steps: int = 50) -> Tensor:
    """Denoising Student's LSUN DDIM grid: indices range(0, T, T // steps), descending, then 0."""
    table = torch.as_tensor(discrete_sigmas, dtype=torch.float64)
    idx = torch.arange(0, len(table), max(len(table) // steps, 1))
    return torch.cat([table[idx.flip(0)], table.new_zeros(1)])


def teacher_recipe(teacher: Denoiser, cfg: PairsConfig) -> dict:
    """The deterministic sampler that makes the targets: {'name', 'sampler', 'sigmas', 'prior_scale'}.

    For a discrete DDPM teacher x_T ~ N(0, I) is the VP state z at the first grid index (§2.1), i.e.
    x = z/alpha = z sqrt(1 + sigma^2) in EDM coordinates: `prior_scale` multiplies the unit noise that the
    sampler scales by sigmas[0]. Continuous teachers start from sigma_max * z (EDM), prior_scale = 1. The
    factor is `samplers.prior_scale`, the one `samplers.sample` uses (the manifest keeps the value used).
    """
    from ..diffusion.schedules import karras_sigmas
    from ..samplers import prior_scale

    discrete = getattr(teacher, "discrete_sigmas", None)
    name = cfg.sampler
    if name == "auto":
        name = "ddim-quad" if discrete is not None else "heun"
    if name in ("ddim-quad", "ddim-uniform"):
        if discrete is None:
            raise DiffdistillError(f"pair sampler {name!r} needs a discrete-time (DDPM) teacher; "
                                   "use heun or euler")
        sigmas = (ddpm_quadratic_sigmas(discrete, cfg.steps or 100) if name == "ddim-quad"
                  else ddpm_uniform_sigmas(discrete, cfg.steps or 50))
        return dict(name=name, sampler="euler", sigmas=sigmas.tolist(),
                    prior_scale=prior_scale(teacher, float(sigmas[0])))
    if name in ("heun", "euler"):
        steps = cfg.steps or (18 if name == "heun" else 50)
        sigmas = karras_sigmas(steps, teacher.sigma_min, teacher.sigma_max)
        return dict(name=name, sampler=name, sigmas=sigmas.tolist(),
                    prior_scale=prior_scale(teacher, float(sigmas[0])))
    raise DiffdistillError(f"unknown pair sampler {cfg.sampler!r} "
                           "(auto, ddim-quad, ddim-uniform, heun, euler)")


# --------------------------------------------------------------------------------------------------
# Encoding of targets (§2.2)


def resolve_target_dtype(cfg: PairsConfig, shape) -> str:
    if cfg.target_dtype == "auto":
        return "uint8" if len(shape) == 3 else "float16"
    if cfg.target_dtype not in ("uint8", "float16"):
        raise DiffdistillError(f"unknown target dtype {cfg.target_dtype!r} (auto, float16, uint8)")
    return cfg.target_dtype


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


def _shard_names(m: dict) -> list[str]:
    return [s["name"] for s in m["shards"]]


def shard_path(root: Path, name: str) -> Path:
    return Path(root) / f"{name}.safetensors"


def make_manifest(teacher: Denoiser, cfg: PairsConfig) -> dict:
    """The description of a pairs directory (pairs.json): everything a resumed run must agree on."""
    if cfg.n_pairs < 1 or cfg.shard_size < 1 or cfg.heldout < 0 or cfg.batch < 1:
        raise DiffdistillError(f"need n_pairs, shard_size, batch >= 1 and heldout >= 0, got {asdict(cfg)}")
    n_train = math.ceil(cfg.n_pairs / cfg.shard_size)
    shards = [dict(name=f"train-{i:05d}", count=min(cfg.shard_size, cfg.n_pairs - i * cfg.shard_size))
              for i in range(n_train)]
    if cfg.heldout:
        shards.append(dict(name=HELDOUT, count=cfg.heldout))
    return dict(format=FORMAT, teacher=teacher_fingerprint(teacher), shape=list(teacher.shape),
                label_dim=teacher.label_dim, n_pairs=cfg.n_pairs, heldout=cfg.heldout,
                shard_size=cfg.shard_size,
                seed=cfg.seed, batch=cfg.batch, target_dtype=resolve_target_dtype(cfg, teacher.shape),
                recipe=teacher_recipe(teacher, cfg), shards=shards)


def bytes_per_pair(m: dict) -> int:
    dim = math.prod(m["shape"])
    return dim * 2 + dim * (1 if m["target_dtype"] == "uint8" else 2) + (8 if m["label_dim"] else 0)


def shard_bytes(m: dict, count: int) -> int:
    return count * bytes_per_pair(m) + SHARD_OVERHEAD


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DiffdistillError(f"{root}: not a pairs directory (no {MANIFEST}); "
                               "make one with `diffdistill kd-pairs`")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffdistillError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DiffdistillError(f"{path}: not a {FORMAT} manifest")
    return m


def _digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().view(torch.uint8).numpy())  # the buffer itself: no copy of a shard
    return h.hexdigest()[:32]


def read_shard(root: Path, m: dict, name: str, count: int) -> tuple[dict[str, Tensor] | None, str | None]:
    """(tensors, None) when shard `name` is complete and matches the manifest, else (None, why it is not)."""
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


def load_shard(root: str | Path, m: dict, name: str) -> dict[str, Tensor]:
    """A verified shard as {'noise', 'target', 'cond'?}; a damaged one is named in the error."""
    count = next(s["count"] for s in m["shards"] if s["name"] == name)
    tensors, problem = read_shard(Path(root), m, name, count)
    if problem:
        raise DiffdistillError(f"{shard_path(root, name)}: {problem}; rerun `diffdistill kd-pairs` "
                               "(or `distill kd`) with the same options to regenerate it")
    return tensors


# --------------------------------------------------------------------------------------------------
# Generation (resumable, rank-disjoint, disk checked up front)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:7], "little")


def _same_but_prior_scale(old, new: dict) -> bool:
    """Whether an existing manifest's recipe differs from `new` in its prior_scale only."""
    if not isinstance(old, dict) or old.get("prior_scale") == new.get("prior_scale"):
        return False
    drop = lambda r: {k: v for k, v in r.items() if k != "prior_scale"}  # noqa: E731
    return drop(old) == drop(new)


@torch.no_grad()
def generate_shard(teacher: Denoiser, m: dict, index: int, count: int, device="cpu") -> dict[str, Tensor]:
    """Pairs of shard `index`: batch b draws noise (and labels) from a generator seeded by (seed, index, b)"""
    from ..samplers import get_sampler

    recipe = m["recipe"]
    fn = get_sampler(recipe["sampler"])
    sigmas = torch.tensor(recipe["sigmas"], dtype=torch.float64)
    shape = tuple(m["shape"])
    noise = torch.empty(count, *shape, dtype=torch.float16)
    target = torch.empty(count, *shape, dtype=torch.uint8 if m["target_dtype"] == "uint8" else torch.float16)
    cond = torch.empty(count, dtype=torch.int64) if m["label_dim"] else None
    for b, start in enumerate(range(0, count, m["batch"])):
        n = min(m["batch"], count - start)
        g = torch.Generator().manual_seed(_seed(m["seed"], index, b))
        z = torch.randn(n, *shape, generator=g).half()           # x_T is stored as float16 (§2.2) ...
        c = torch.randint(m["label_dim"], (n,), generator=g) if cond is not None else None
        # ... and the teacher starts from exactly the stored value, so every pair is self-consistent.
        y = fn(teacher, z.float().to(device) * recipe["prior_scale"], sigmas.to(device),
               cond=None if c is None else c.to(device))
        if not bool(torch.isfinite(y).all()):
            raise DiffdistillError(f"the teacher produced non-finite samples in shard {index}")
        noise[start:start + n] = z
        target[start:start + n] = encode_target(y.cpu(), m["target_dtype"])
        if cond is not None:
            cond[start:start + n] = c
    out = {"noise": noise, "target": target}
    if cond is not None:
        out["cond"] = cond
    return out


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


def generate_pairs(teacher: Denoiser, root: str | Path, cfg: PairsConfig, device="cpu",
                   rank: int | None = None, world: int | None = None, progress: bool = True,
                   log=print) -> dict:
    """Make (or complete) the pairs directory `root`; returns its manifest.

    Refuses a directory made by another teacher or with other settings, and a disk too small for what is
    missing, before generating anything. Complete shards are kept; missing and damaged ones are (re)made.
    """
    from ..train import dist

    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    root = Path(root)
    check_deterministic_teacher(teacher)
    m = make_manifest(teacher, cfg)
    if (root / MANIFEST).is_file():
        old = read_manifest(root)
        if old.get("teacher") != m["teacher"]:
            raise DiffdistillError(f"{root}: these pairs were made by a different teacher (fingerprint "
                                   f"{old.get('teacher')}, this teacher is {m['teacher']}); "
                                   "use a new --pairs directory")
        if _same_but_prior_scale(old.get("recipe"), m["recipe"]):
            # Made before the Karras-grid samplers started a discrete teacher from its VP prior: finish the
            # directory with the start it was made with, so that all its pairs agree.
            m["recipe"] = old["recipe"]
        keys = ("n_pairs", "heldout", "shard_size", "seed", "batch", "target_dtype", "recipe", "shape")
        diff = [k for k in keys if old.get(k) != m[k]]
        if diff:
            was = ", ".join(f"{k}={old.get(k)!r}" for k in diff if k != "recipe")
            raise DiffdistillError(f"{root}: these pairs were made with other settings ({', '.join(diff)} "
                                   f"differ{': ' + was if was else ''}); use the same options or a new "
                                   "--pairs directory")
    # Which shards this rank must (re)make.
    todo = []
    for i, s in enumerate(m["shards"]):
        if i % world != rank:
            continue
        problem = read_shard(root, m, s["name"], s["count"])[1]
        if problem is not None:
            if problem != "missing":
                log(f"{shard_path(root, s['name'])}: {problem}; regenerating it")
            todo.append((i, s))
    # Disk, before anything is written: every rank's missing shards plus this rank's damaged ones.
    todo_names = {s["name"] for _, s in todo}
    needed = sum(shard_bytes(m, s["count"]) for s in m["shards"]
                 if s["name"] in todo_names or not shard_path(root, s["name"]).is_file())
    check_free_space(root, needed)
    root.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (root / MANIFEST).is_file():
        atomic_write_json(root / MANIFEST, m)
    from tqdm import tqdm

    bar = tqdm(total=sum(s["count"] for _, s in todo), unit="pair", disable=not progress or not todo,
               desc=f"pairs (rank {rank})" if world > 1 else "pairs")
    for i, s in todo:
        tensors = generate_shard(teacher, m, i, s["count"], device)
        meta = dict(format=FORMAT, teacher=m["teacher"], shard=s["name"], index=str(i), count=str(s["count"]),
                    seed=str(m["seed"]), target_dtype=m["target_dtype"], sha256=_digest(tensors))
        atomic_save_tensors(shard_path(root, s["name"]), tensors, metadata=meta)
        del tensors  # else the finished shard stays alive while the next one is generated
        bar.update(s["count"])
    bar.close()
    dist.barrier()
    return m


def verify_pairs(root: str | Path, teacher: Denoiser | None = None) -> dict:
    """The manifest of a complete pairs directory (made by `teacher` when given); names a missing shard."""
    m = read_manifest(root)
    if teacher is not None and m["teacher"] != teacher_fingerprint(teacher):
        raise DiffdistillError(f"{root}: these pairs were made by a different teacher (fingerprint "
                               f"{m['teacher']}, this teacher is {teacher_fingerprint(teacher)})")
    for s in m["shards"]:
        if not shard_path(root, s["name"]).is_file():
            raise DiffdistillError(f"{shard_path(root, s['name'])}: missing; rerun `diffdistill kd-pairs` "
                                   "to finish the pairs")
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
            g = torch.Generator().manual_seed(_seed(self.seed, e))
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
                _seed(self.seed, e, order[j])))[local:local + take]
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
