"""Making KD's (noise, teacher sample) pairs: stage 1 of knowledge distillation (Denoising Student,
Luhman & Luhman 2021; official `create_dataset.py`). The teacher's deterministic sampler maps unit noise x_T
to samples y; the pairs are written in the shard format of `diffdistill.data.pairs` (which stores and reads
them and knows nothing of teachers or samplers). Under torchrun rank r writes shards r, r+W, ...

Pair k of a shard depends on (seed, the shard's index, k) only, not on the generation batch: its noise comes
from fixed blocks of `block` rows, each drawn whole from its own generator. So a directory serves any smaller
request with its first pairs (`n_pairs`, `heldout`), and a larger request extends it: new shards are added and a
short last shard is completed, its finished rows kept. Only what changes the pairs is compared with an existing
directory: teacher, sampler recipe (sampler, steps, grid, prior scale), seed and target dtype. Directories made
before blocks existed (manifest key `batch`, blocks drawn at their actual length) are read and extended with
their own rule.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from .. import dist
from ..data import pairs as store
from ..diffusion.denoiser import Denoiser, Precond
from ..errors import DiffdistillError

# --------------------------------------------------------------------------------------------------
# The request


@dataclass
class PairsConfig:
    """What pairs to generate. None: as in an existing pairs directory, else the default in brackets."""

    n_pairs: int | None = 1_024_000  # training pairs [1,024,000, the paper's for CIFAR-10]; fewer than a
                                     # directory holds: its first n_pairs; more: it is extended
    heldout: int | None = 51_200     # held-out pairs for model selection, one extra shard (0 = none) [51,200]
    shard_size: int | None = 102_400  # pairs per shard of a new directory [102,400, the paper's]; an existing
                                      # directory keeps its own
    sampler: str | None = "auto"     # auto | ddim-quad | ddim-uniform | euler | heun (auto: ddim-quad for a
                                     # discrete DDPM teacher, heun for continuous ones)
    steps: int | None = 0            # sampler steps; 0 = default (ddim-quad 100, ddim-uniform 50, heun 18,
                                     # euler 50)
    target_dtype: str | None = "auto"  # float16 | uint8 (paper: clip, *127.5+127.5, truncate) | auto (uint8
                                       # for images, float16 otherwise)
    batch: int = 512                 # generation batch size (no effect on the pairs)
    seed: int | None = 0             # pair k of shard s depends on (seed, s, k) only


_DEFAULTS = PairsConfig()


def _filled(cfg: PairsConfig) -> PairsConfig:
    """`cfg` with every None replaced by its default (for a new directory)."""
    return replace(cfg, **{f.name: getattr(_DEFAULTS, f.name) for f in fields(cfg) if getattr(cfg, f.name) is None})


def resolve_target_dtype(cfg: PairsConfig, shape) -> str:
    if cfg.target_dtype in (None, "auto"):
        return "uint8" if len(shape) == 3 else "float16"
    if cfg.target_dtype not in ("uint8", "float16"):
        raise DiffdistillError(f"unknown target dtype {cfg.target_dtype!r} (auto, float16, uint8)")
    return cfg.target_dtype


# --------------------------------------------------------------------------------------------------
# The teacher: deterministic-sampler compatibility (also PD's check)


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
# The teacher's sampler (official Denoising Student `create_dataset.py`: deterministic DDIM)


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


def sampler_name(teacher: Denoiser, name: str | None) -> str:
    """'auto' (or None): ddim-quad for a discrete DDPM teacher, heun for continuous ones; else `name`."""
    if name in (None, "auto"):
        return "ddim-quad" if getattr(teacher, "discrete_sigmas", None) is not None else "heun"
    return name


def teacher_recipe(teacher: Denoiser, cfg: PairsConfig) -> dict:
    """The deterministic sampler that makes the targets: {'name', 'sampler', 'sigmas', 'prior_scale'}.

    For a discrete DDPM teacher x_T ~ N(0, I) is the VP state z at the first grid index (as in official
    `create_dataset.py`), i.e. x = z/alpha = z sqrt(1 + sigma^2) in EDM coordinates: `prior_scale` multiplies
    the unit noise that the sampler scales by sigmas[0]. Continuous teachers start from sigma_max * z (EDM),
    prior_scale = 1. The factor is `samplers.prior_scale`, the one `samplers.sample` uses (the manifest keeps
    the value used).
    """
    from ..diffusion.schedules import karras_sigmas
    from ..samplers import prior_scale

    discrete = getattr(teacher, "discrete_sigmas", None)
    name = sampler_name(teacher, cfg.sampler)
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
# The manifest of a new directory, and an existing one grown to serve a request


def make_manifest(teacher: Denoiser, cfg: PairsConfig) -> dict:
    """The description of a new pairs directory (pairs.json). Every shard records the `index` its noise is
    seeded by: training shards 0, 1, ..., the held-out shard `data.pairs.HELDOUT_INDEX`."""
    cfg = _filled(cfg)
    if cfg.n_pairs < 1 or cfg.shard_size < 1 or cfg.heldout < 0 or cfg.batch < 1:
        raise DiffdistillError(f"need n_pairs, shard_size, batch >= 1 and heldout >= 0, got {asdict(cfg)}")
    n_train = math.ceil(cfg.n_pairs / cfg.shard_size)
    shards = [dict(name=f"train-{i:05d}", count=min(cfg.shard_size, cfg.n_pairs - i * cfg.shard_size), index=i)
              for i in range(n_train)]
    if cfg.heldout:
        shards.append(dict(name=store.HELDOUT, count=cfg.heldout, index=store.HELDOUT_INDEX))
    return dict(format=store.FORMAT, teacher=store.teacher_fingerprint(teacher), shape=list(teacher.shape),
                label_dim=teacher.label_dim, n_pairs=cfg.n_pairs, heldout=cfg.heldout,
                shard_size=cfg.shard_size, seed=cfg.seed, block=store.BLOCK,
                target_dtype=resolve_target_dtype(cfg, teacher.shape),
                recipe=teacher_recipe(teacher, cfg), shards=shards)


def _same_but_prior_scale(old, new: dict) -> bool:
    """Whether an existing manifest's recipe differs from `new` in its prior_scale only."""
    if not isinstance(old, dict) or old.get("prior_scale") == new.get("prior_scale"):
        return False
    drop = lambda r: {k: v for k, v in r.items() if k != "prior_scale"}  # noqa: E731
    return drop(old) == drop(new)


def _describe_recipe(r: dict) -> str:
    return f"{r.get('name')} with {len(r.get('sigmas', [])) - 1} steps"


def _merge(teacher: Denoiser, root: Path, cfg: PairsConfig, old: dict) -> tuple[dict, dict[str, int]]:
    """The manifest of an existing directory grown to serve `cfg`, and {shard name: rows it had} for the shards
    that grow. Refuses what would change the pairs (teacher, recipe, seed, target dtype)."""
    fingerprint = store.teacher_fingerprint(teacher)
    if old.get("teacher") != fingerprint:
        raise DiffdistillError(f"{root}: these pairs were made by a different teacher (fingerprint "
                               f"{old.get('teacher')}, this teacher is {fingerprint}); "
                               "use a new --pairs directory")
    old = store.with_indices(old)
    name = sampler_name(teacher, cfg.sampler if cfg.sampler is not None else old["recipe"].get("name"))
    if cfg.steps is None and name == old["recipe"].get("name"):
        recipe = old["recipe"]
    else:
        recipe = teacher_recipe(teacher, replace(cfg, sampler=name, steps=cfg.steps or 0))
        if _same_but_prior_scale(old["recipe"], recipe):
            # Made before the Karras-grid samplers started a discrete teacher from its VP prior: finish the
            # directory with the start it was made with, so that all its pairs agree.
            recipe = old["recipe"]
    seed = old["seed"] if cfg.seed is None else cfg.seed
    dtype = old["target_dtype"] if cfg.target_dtype is None else resolve_target_dtype(cfg, teacher.shape)
    diff = []
    if recipe != old["recipe"]:
        same = _describe_recipe(recipe) == _describe_recipe(old["recipe"])
        diff.append(f"sampler {_describe_recipe(old['recipe'])}"
                    + (" (another grid or prior scale)" if same else f", asked {_describe_recipe(recipe)}"))
    if seed != old["seed"]:
        diff.append(f"seed {old['seed']}, asked {seed}")
    if dtype != old["target_dtype"]:
        diff.append(f"target dtype {old['target_dtype']}, asked {dtype}")
    if list(teacher.shape) != old["shape"] or teacher.label_dim != old["label_dim"]:
        diff.append(f"shape {old['shape']} with {old['label_dim']} classes")
    if diff:
        raise DiffdistillError(f"{root}: these pairs were made with other settings ({'; '.join(diff)}); leave "
                               "those options out (or repeat the directory's) to use these pairs, or choose a "
                               "new --pairs directory")
    n = old["n_pairs"] if cfg.n_pairs is None else cfg.n_pairs
    held = old["heldout"] if cfg.heldout is None else cfg.heldout
    if n < 1 or held < 0:
        raise DiffdistillError(f"need n_pairs >= 1 and heldout >= 0, got {n} and {held}")
    m = dict(old, shards=[])
    train = [s for s in old["shards"] if s["name"] != store.HELDOUT]
    held_spec = next((s for s in old["shards"] if s["name"] == store.HELDOUT), None)
    grown: dict[str, int] = {}
    used = [s["index"] for s in old["shards"]]
    size = old["shard_size"]
    if n > old["n_pairs"]:
        m["n_pairs"] = n
        for i in range(math.ceil(n / size)):
            count = min(size, n - i * size)
            if i < len(train):
                if count != train[i]["count"]:
                    grown[train[i]["name"]] = train[i]["count"]
                    train[i] = dict(train[i], count=count)
            else:
                used.append(max(used, default=-1) + 1)   # a new seed index (an old held-out shard keeps its own)
                train.append(dict(name=f"train-{i:05d}", count=count, index=used[-1]))
    if held > old["heldout"]:
        m["heldout"] = held
        if held_spec is None:
            held_spec = dict(name=store.HELDOUT, count=held,
                             index=store.HELDOUT_INDEX if store.block_rule(old)[1] else max(used, default=-1) + 1)
        else:
            grown[store.HELDOUT] = held_spec["count"]
            held_spec = dict(held_spec, count=held)
    m["shards"] = train + ([held_spec] if held_spec else [])
    return m, grown


# --------------------------------------------------------------------------------------------------
# Generation (resumable, rank-disjoint, disk checked up front)


def _noise_block(m: dict, index: int, b: int, count: int) -> tuple[Tensor, Tensor | None]:
    """Rows b*block ... of shard `index` (at most `count` - b*block of them): unit noise (float16) and labels."""
    block, whole = store.block_rule(m)
    n = min(block, count - b * block)
    g = torch.Generator().manual_seed(store.noise_seed(m["seed"], index, b))
    draw = block if whole else n
    z = torch.randn(draw, *m["shape"], generator=g).half()          # x_T is stored as float16 (official)
    c = torch.randint(m["label_dim"], (draw,), generator=g) if m["label_dim"] else None
    return z[:n], None if c is None else c[:n]


@torch.no_grad()
def generate_shard(teacher: Denoiser, m: dict, index: int, count: int, device="cpu", batch: int | None = None,
                   keep: dict[str, Tensor] | None = None, step=None) -> dict[str, Tensor]:
    """Pairs of shard `index`: row k's noise (and label) is row k % block of block k // block, drawn from a
    generator seeded by (seed, index, k // block). The teacher runs on `batch` rows at a time (default: one
    block), calling `step(rows)` after each; `keep`: the shard's first rows, already made (not recomputed)."""
    from ..samplers import get_sampler

    recipe = m["recipe"]
    fn = get_sampler(recipe["sampler"])
    sigmas = torch.tensor(recipe["sigmas"], dtype=torch.float64)
    shape = tuple(m["shape"])
    block = store.block_rule(m)[0]
    batch = batch or block
    noise = torch.empty(count, *shape, dtype=torch.float16)
    target = torch.empty(count, *shape, dtype=torch.uint8 if m["target_dtype"] == "uint8" else torch.float16)
    cond = torch.empty(count, dtype=torch.int64) if m["label_dim"] else None
    first = 0
    if keep is not None:
        first = len(keep["noise"])
        noise[:first], target[:first] = keep["noise"], keep["target"]
        if cond is not None:
            cond[:first] = keep["cond"]
    for b in range(first // block, math.ceil(count / block)):
        z, c = _noise_block(m, index, b, count)
        lo = max(b * block, first)
        noise[lo:b * block + len(z)] = z[lo - b * block:]
        if cond is not None:
            cond[lo:b * block + len(z)] = c[lo - b * block:]
    for start in range(first, count, batch):
        n = min(batch, count - start)
        c = None if cond is None else cond[start:start + n].to(device)
        # The teacher starts from exactly the stored value, so every pair is self-consistent.
        y = fn(teacher, noise[start:start + n].float().to(device) * recipe["prior_scale"], sigmas.to(device),
               cond=c)
        if not bool(torch.isfinite(y).all()):
            raise DiffdistillError(f"the teacher produced non-finite samples in shard {index}")
        target[start:start + n] = store.encode_target(y.cpu(), m["target_dtype"])
        if step is not None:
            step(n)
    out = {"noise": noise, "target": target}
    if cond is not None:
        out["cond"] = cond
    return out


def generate_pairs(teacher: Denoiser, root: str | Path, cfg: PairsConfig, device="cpu",
                   rank: int | None = None, world: int | None = None, progress: bool = True,
                   log=print) -> dict:
    """Make, complete or extend the pairs directory `root`; returns the manifest of the pairs asked for.

    Fields of `cfg` that are None take an existing directory's values (else the defaults). An existing
    directory made by another teacher or with another recipe, seed or target dtype is refused before anything
    is generated; it keeps its shard size. A request for fewer pairs than it holds gets its first pairs (the
    returned manifest lists only those); a request for more extends it (rerunnable: the manifest is written
    first, then shard by shard). Complete shards are kept; missing and damaged ones are (re)made; the disk is
    checked for what is missing first.
    """
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    root = Path(root)
    check_deterministic_teacher(teacher)
    if cfg.batch < 1:
        raise DiffdistillError(f"need a generation batch >= 1, got {cfg.batch}")
    grown: dict[str, int] = {}
    if os.path.lexists(root / store.MANIFEST):   # a manifest that is no regular file is read (and refused)
        old = store.read_manifest(root)
        m, grown = _merge(teacher, root, cfg, old)
        write = m != store.with_indices(old)
        n = old["n_pairs"] if cfg.n_pairs is None else cfg.n_pairs
        held = old["heldout"] if cfg.heldout is None else cfg.heldout
        if cfg.shard_size is not None and cfg.shard_size != m["shard_size"] and rank == 0:
            log(f"{root}: keeps its shard size {m['shard_size']} (asked {cfg.shard_size})")
    else:
        m = make_manifest(teacher, cfg)
        write, n, held = True, m["n_pairs"], m["heldout"]
    view = store.manifest_view(m, n, held)
    wanted = {s["name"] for s in view["shards"]}
    # Which shards this rank must (re)make, and the finished rows of a short shard that grows.
    todo = []
    for i, s in enumerate(m["shards"]):
        if i % world != rank or s["name"] not in wanted:
            continue
        problem = store.read_shard(root, m, s["name"], s["count"])[1]
        if problem is None:
            continue
        keep = None
        if s["name"] in grown:
            if store.block_rule(m)[1]:   # whole blocks: the short shard's rows are the first rows of the longer one
                keep = store.read_shard(root, m, s["name"], grown[s["name"]])[0]
        elif problem != "missing":
            log(f"{store.shard_path(root, s['name'])}: {problem}; regenerating it")
        todo.append((s, keep))
    # Disk, before anything is written: every rank's missing shards plus this rank's damaged ones.
    todo_names = {s["name"] for s, _ in todo}
    needed = sum(store.shard_bytes(m, s["count"]) for s in m["shards"] if s["name"] in wanted
                 and (s["name"] in todo_names or not store.shard_path(root, s["name"]).is_file()))
    store.check_free_space(root, needed)
    root.mkdir(parents=True, exist_ok=True)
    if rank == 0 and write:
        store.write_manifest(root, m)
    from tqdm import tqdm

    total = sum(s["count"] - (0 if keep is None else len(keep["noise"])) for s, keep in todo)
    bar = tqdm(total=total, unit="pair", disable=not progress or not todo, dynamic_ncols=True,
               desc=f"pairs (rank {rank})" if world > 1 else "pairs")
    made = 0
    try:
        for s, keep in todo:
            tensors = generate_shard(teacher, m, s["index"], s["count"], device, batch=cfg.batch, keep=keep,
                                     step=bar.update)
            store.write_shard(root, m, s, tensors)
            del tensors, keep  # else the finished shard stays alive while the next one is generated
            made += 1
    except KeyboardInterrupt:
        bar.close()
        if rank == 0:
            print(f"{root}: stopped; {made} of the {len(todo)} shards to make are written and kept (a shard is "
                  "written whole); rerun to continue", file=sys.stderr)
        raise
    bar.close()
    dist.barrier()
    return view


