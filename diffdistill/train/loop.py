"""The one training loop: method-blind (the contract is diffdistill.methods.base.Method).

Per step: `begin_step` (a notice to the method; its return value is ignored) -> for every group due this step
(`step >= start` and `step % every == 0`), in order: accumulate the gradients of the group's loss (`Group.loss`) over
`batch / (batch_gpu * world)` micro-batches (averaged over ranks by DDP), pass them through nan_to_num (EDM), clip,
and step that group's optimiser -> EMA (EDM half-life rule) -> ticks (stats.jsonl, TensorBoard), sample grids,
snapshots, evaluation, checkpoints. Progress is counted in images.

What a run directory holds for sampling: RUN/model/ (the EMA export, written when the run finishes), RUN/latest/
(the same export, written when the run is interrupted, deleted when it finishes or starts over; so when it exists it
is newer than RUN/model) and grids RUN/samples-kimg<kimg>.png every `grid_kimg`, RUN/samples-final.png at the end.
`io.run_snapshot(RUN)` picks the snapshot a sampler should read.

A run can be several calls of `train`, one per `Stage` of a longer schedule (a method's own driver: progressive
distillation's rounds), each with fresh optimisers, LR schedules and EMA: the counters, training time, best
evaluation and unfinished tick continue from the previous stage, so per-step seeds, data order and stats.jsonl's
kimg are those of one run. A stage's start is the only place where the loop restarts optimisers, LR schedules and
EMA.

Randomness: before every micro-batch the global torch RNG is seeded from (seed, step, global micro-batch
index, group index), and the data order is a seeded permutation per epoch read at the position given by the
number of images seen. So a run resumed from a checkpoint is bit-identical to an uninterrupted one, and G
processes with micro-batch b equal one process accumulating G micro-batches of b (up to float summation order).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import dist, io
from ..errors import DiffdistillError
from ..methods.base import Batch, Group, Method, OptimConfig
from . import checkpoint as ckpt
from .ema import EMA
from .stats import StatsWriter, peak_memory_gb, save_image_grid, save_scatter


@dataclass
class TrainConfig:
    """Loop settings (all lengths in thousands of images, 'kimg'; 0 turns a periodic action off)."""

    out: str = "runs/run"                  # run directory RUN (checkpoints, stats, snapshots, RUN/model)
    total_kimg: float = 200.0              # training length
    batch: int = 512                       # global batch per optimiser step (over all ranks and accumulation)
    batch_gpu: int | None = None           # per-process micro-batch; None = batch / world (no accumulation)
    ema_halflife_kimg: float | None = None  # EMA half-life (EDM); 0 = the EMA is a copy of the weights;
    #                                         None = the method's own (`Method.ema_default`, ramp-up included)
    ema_rampup: float | None = 0.05        # with a given half-life: EDM's ramp-up ratio (half-life <= rampup * images
    #                                        seen); None = no ramp-up
    seed: int = 0                          # seeds data order, noise and dropout
    tick_kimg: float = 10.0                # a line in stats.jsonl every tick
    snapshot_kimg: float = 0.0             # sampler-ready snapshots RUN/snapshot-<kimg>/
    checkpoint_kimg: float = 50.0          # full training state for resumption
    keep_checkpoints: int = 2              # keep this many newest checkpoints
    grid_kimg: float = 0.0                 # sample grids RUN/samples-kimg<kimg>.png (and RUN/samples-final.png)
    grid_n: int = 64                       # samples per grid
    final_grid: bool = False               # RUN/samples-final.png at the end also when grid_kimg is 0
    eval_kimg: float = 0.0                 # call `evaluate(method, ema, nimg)` this often (and at the end)
    best_metric: str | None = None         # metric of `evaluate` that picks RUN/best/
    best_mode: str = "min"                 # min: lower is better | max
    bf16: bool = False                     # bfloat16 autocast of the losses
    device: str | None = None              # cpu | cuda | cuda:N; None = cuda if available (LOCAL_RANK under torchrun)
    workers: int = 0                       # DataLoader worker processes
    resume: bool = False                   # continue RUN even if its config differs
    force: bool = False                    # start RUN over, deleting its checkpoints and stats
    max_steps: int | None = None           # stop after this many optimiser steps (overrides total_kimg)
    command: str = ""                      # the command line, recorded in RUN/command.txt
    meta: dict = field(default_factory=dict)  # run description (method options, data spec) for config.json
    tensorboard: bool = True               # mirror stats to RUN/tensorboard if tensorboard is installed
    progress: bool = True                  # tqdm progress bar


# Settings that may change when a run is resumed without counting as "a different run".
_RUNTIME_KEYS = ("resume", "force", "command", "device", "workers", "progress", "tensorboard", "final_grid")
MODEL_DIR, LATEST_DIR = io.MODEL_DIR, io.LATEST_DIR  # RUN/model: a finished run's export; RUN/latest: an
#                                                     interrupted one's (io.run_snapshot picks the newer)


@dataclass
class Stage:
    """A call of `train` as one stage of a longer schedule in one run directory, the same TrainConfig each time.

    A stage starts with fresh optimisers, LR schedules (counted from its start) and EMA. A later stage (`after`: the
    previous one) continues where that one ended (steps and images, so per-step seeds, data order and stats.jsonl's
    kimg are global; training time, best evaluation, the unfinished tick) and does not prepare RUN again. It trains
    up to the global step `end` (None: the run's end), checkpoints, and saves its export as RUN/<export> when given;
    only the stage that reaches the run's end writes the final tick, evaluation and grid and RUN/model. Of RUN's
    newest checkpoint a stage restores only one written during it (after its start): an earlier stage's is not
    restored into a later one, and one written after its end means that an earlier session finished this stage:
    `train` then does nothing and sets `skipped`.
    """

    end: int | None = None
    export: str | None = None
    after: Stage | None = None
    skipped: bool = False                                  # set by `train`
    carry: dict | None = field(default=None, repr=False)   # set by `train`: where the next stage continues from


def run_steps(cfg: TrainConfig) -> int:
    """The run's length in optimiser steps: max_steps, else total_kimg in batches (rounded up)."""
    return cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.total_kimg * 1000 / cfg.batch)


def run_config(method: Method, cfg: TrainConfig) -> dict:
    """What config.json records and a rerun compares."""
    train = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_KEYS and k != "meta"}
    return {"method": method.name, "train": train, "meta": cfg.meta}


# --------------------------------------------------------------------------------------------------
# Pieces


def kimg_label(nimg: int, interval_kimg: float) -> str:
    """The kimg in names of periodic outputs (samples-kimg000200.png, snapshot-kimg000200): 'kimg' and six
    digits (EDM's style), with the images too (kimg000000.064) when the interval is under 1 kimg, so that short
    runs do not give two outputs one name. Zero-padded: the names sort in training order."""
    return f"kimg{nimg // 1000:06d}" if interval_kimg >= 1 else f"kimg{nimg / 1000:010.3f}"


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffdistillError(f"device {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank())
    return dev


def split_batch(batch: int, batch_gpu: int | None, world: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation rounds) with batch = batch_gpu * rounds * world."""
    if batch < 1:
        raise DiffdistillError(f"batch must be positive, got {batch}")
    if batch % world:
        raise DiffdistillError(f"batch {batch} is not divisible by the {world} processes")
    per_rank = batch // world
    batch_gpu = min(batch_gpu or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise DiffdistillError(f"batch {batch} / {world} processes = {per_rank} is not a multiple of "
                               f"batch_gpu {batch_gpu}")
    return batch_gpu, per_rank // batch_gpu


def make_optimizer(params: list[nn.Parameter], oc: OptimConfig) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}
    if oc.kind not in kinds:
        raise DiffdistillError(f"unknown optimiser {oc.kind!r} (adam, adamw, radam)")
    return kinds[oc.kind](params, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)


def lr_at(oc: OptimConfig, nimg_after: int, origin: int, end: int) -> float:
    """Learning rate of a step that brings the image count to `nimg_after`: linear warm-up over warmup_kimg from
    the schedule origin (the start of the run or stage, or the group's `start`), then constant or linear decay to 0
    at `end` images (`decay_kimg` after the origin when set)."""
    lr = oc.lr
    done = nimg_after - origin
    if oc.decay_kimg is not None:
        end = origin + int(round(oc.decay_kimg * 1000))
    if oc.warmup_kimg > 0:
        lr *= min(done / (oc.warmup_kimg * 1000), 1.0)
    if oc.decay == "linear":
        lr *= max(0.0, 1.0 - done / max(end - origin, 1))
    elif oc.decay != "constant":
        raise DiffdistillError(f"unknown LR decay {oc.decay!r} (constant, linear)")
    return lr


def step_seed(seed: int, step: int, micro: int, group: int) -> int:
    """Seed of one micro-batch of one group's loss, a function of (seed, step, global micro-batch index, group)."""
    return int(np.random.SeedSequence([seed, step, micro, group]).generate_state(2, np.uint32)
               .astype(np.uint64) @ np.array([1, 2**32], dtype=np.uint64)) & (2**63 - 1)


class StreamSampler:
    """Index lists of this rank's micro-batches, step after step, from the stream position `nimg`.

    The stream is the concatenation of per-epoch permutations seeded by (seed, epoch). At each step the global
    batch is the next `batch` stream positions; micro-batch a of rank r holds the positions
    [(a * world + r) * batch_gpu, +batch_gpu) of it.
    """

    def __init__(self, n: int, seed: int, nimg: int, batch: int, batch_gpu: int, accum: int, world: int,
                 rank: int):
        self.n, self.seed, self.nimg = n, seed, nimg
        self.batch, self.batch_gpu, self.accum, self.world, self.rank = batch, batch_gpu, accum, world, rank
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return int(self._perms[epoch][i])

    def __iter__(self):
        nimg = self.nimg
        while True:
            for a in range(self.accum):
                start = nimg + (a * self.world + self.rank) * self.batch_gpu
                yield [self._index(p) for p in range(start, start + self.batch_gpu)]
            nimg += self.batch


# Buffers are not synchronised before each forward (every rank holds the same ones): torch >= 2.13 spells it
# forward_sync_buffers=False and deprecates broadcast_buffers=False with a FutureWarning on every rank.
_NO_BUFFER_SYNC = (dict(forward_sync_buffers=False)
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else dict(broadcast_buffers=False))


class _LossCall(nn.Module):
    """Routes every group's loss (`Group.loss`) through one module's forward, so that DDP sees every network a
    loss touches (the method is its submodule)."""

    def __init__(self, method: Method, groups: dict[str, Group]):
        super().__init__()
        self.method = method
        self.losses = {name: g.loss for name, g in groups.items()}

    def forward(self, group: str, batch: Batch):
        return self.losses[group](batch)


class _StopFlag:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, saves a checkpoint and RUN/latest, and returns."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.set = True
        dist.print0(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint and a sampler-ready "
                    "snapshot RUN/latest, then stopping (Ctrl-C again stops at once)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _crossed(prev: int, now: int, kimg: float) -> bool:
    if not kimg or kimg <= 0:
        return False
    every = max(1, int(round(kimg * 1000)))
    return now // every > prev // every


def _check_groups(method: Method, groups: dict[str, Group]) -> None:
    if not groups:
        raise DiffdistillError(f"method {method.name!r} declares no parameter groups")
    seen: dict[int, str] = {}
    for name, g in groups.items():
        if not g.params:
            raise DiffdistillError(f"group {name!r} of method {method.name!r} has no parameters")
        if g.every < 1:
            raise DiffdistillError(f"group {name!r}: every must be >= 1, got {g.every}")
        if g.start < 0:
            raise DiffdistillError(f"group {name!r}: start must be >= 0, got {g.start}")
        if g.extra_every < 0:
            raise DiffdistillError(f"group {name!r}: extra_every must be >= 0, got {g.extra_every}")
        if not callable(g.loss):
            raise DiffdistillError(f"group {name!r} of method {method.name!r} names no loss function "
                                   f"(Group(loss=...)), got {g.loss!r}")
        for p in g.params:
            if id(p) in seen:
                raise DiffdistillError(f"a parameter is in both groups {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name


# --------------------------------------------------------------------------------------------------
# The loop


class _Run:
    """State of one call of `train` (kept in an object so that the pieces stay short)."""

    def __init__(self, method: Method, cfg: TrainConfig, data, evaluate, stage: Stage | None = None):
        self.method, self.cfg, self.data, self.evaluate = method, cfg, data, evaluate
        self.device = resolve_device(cfg.device)
        dist.init_from_env(str(self.device))
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.batch_gpu, self.accum = split_batch(cfg.batch, cfg.batch_gpu, self.world)
        self.run_dir = Path(cfg.out)
        self.groups = method.groups()
        _check_groups(method, self.groups)
        self.needs_data = any(g.needs_data for g in self.groups.values())
        if self.needs_data and data is None:
            raise DiffdistillError(f"method {method.name!r} trains on real data: give a data set (--data)")
        if cfg.best_mode not in ("min", "max"):
            raise DiffdistillError(f"best_mode must be 'min' or 'max', got {cfg.best_mode!r}")
        self.total_steps = run_steps(cfg)
        self.stage = stage or Stage()
        self.start = 0 if self.stage.after is None else self.stage_end(self.stage.after)
        self.end = self.stage_end(self.stage)
        self.step, self.nimg = 0, 0
        self.tick = None                # an unfinished tick of the previous stage: (sums, time, step, nimg)
        # Training seconds: those of earlier sessions of this run (from its checkpoint) plus this session's.
        self.seconds_before, self.session_start = 0.0, time.time()
        self.origins = {name: 0 for name in self.groups}
        self.best: dict | None = None
        self.lock: ckpt.RunLock | None = None

    def stage_end(self, stage: Stage) -> int:
        return self.total_steps if stage.end is None else min(stage.end, self.total_steps)

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, method = self.cfg, self.method
        first = self.stage.after is None
        resume = not first             # a later stage: RUN is this run's already
        if self.main:   # RUN is locked while this run holds it (only rank 0 locks); no links inside are followed
            self.lock = ckpt.RunLock(self.run_dir)
            if first:
                resume = ckpt.prepare_run_dir(self.run_dir, run_config(method, cfg), cfg.command, cfg.resume,
                                              cfg.force)
        resume = bool(dist.broadcast_int(int(resume), self.device))
        if self.main and not resume:   # a new run (or one started over): an older run's RUN/latest is stale
            _remove_snapshot(self.run_dir / LATEST_DIR)
        dist.barrier()
        # A student that cannot be saved fails now, not at its first snapshot (before any resume, the method's
        # export is that of its fresh state).
        io.check_saveable(method.export(None)[0])
        method.to(self.device)
        self.optims = {name: make_optimizer(g.params, g.optim) for name, g in self.groups.items()}
        targets = method.ema_targets()
        halflife, rampup = ema_settings(method, cfg)
        self.ema = EMA(targets, halflife, rampup) if targets else None
        loaded = ckpt.load_latest(self.run_dir, say=_say) if resume else None
        if loaded is None and first and resume:
            dist.print0(f"{self.run_dir}: no checkpoint to resume from; starting at step 0")
        step = -1 if loaded is None else loaded[1]["step"]
        if self.end < self.total_steps and step > self.end:     # an earlier session finished this stage
            self.stage.skipped = True
            return
        if loaded is not None and (first or step > self.start):
            self.restore(*loaded)
        elif not first:                 # continue the previous stage
            c = self.stage.after.carry
            if c is None:
                raise DiffdistillError(f"{self.run_dir}: stage ending at step {self.end} follows a stage that did "
                                       "not finish in this session and has no checkpoint after it")
            self.step, self.nimg, self.seconds_before, self.best, self.tick = \
                c["step"], c["nimg"], c["seconds"], c["best"], c["tick"]
            self.origins = {name: self.nimg for name in self.groups}
        self.stats = StatsWriter(self.run_dir, cfg.tensorboard) if self.main else None
        self.loss_call: nn.Module = _LossCall(method, self.groups)
        if self.world > 1:
            self.loss_call = self._wrap_ddp(self.loss_call)
        self.batches = self._data_iter() if self.needs_data else None

    def _wrap_ddp(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel over the trainable parameters (NCCL on GPUs, gloo on CPUs)."""
        trainable = {id(p) for g in self.groups.values() for p in g.params}
        ignore = [n for n, p in module.named_parameters() if id(p) not in trainable]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, ignore)
        # torch's reducer warns on every rank at the first backward when a gradient's strides differ from its
        # bucket's; the 1x1 convolutions' weight gradients [C, C, 1, 1] differ only in the strides of their size-1
        # dimensions (the same memory layout), so the warning says nothing: only that message is ignored
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=None, find_unused_parameters=True, **_NO_BUFFER_SYNC)

    def _data_iter(self):
        data = self.data
        sampler = StreamSampler(len(data), self.cfg.seed, self.nimg, self.cfg.batch, self.batch_gpu, self.accum,
                                self.world, self.rank)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=self.cfg.workers,
                                             pin_memory=self.device.type == "cuda")
        return iter(loader)

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        tensors = {f"method.{k}": v for k, v in self.method.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        optim_json = {}
        for name, opt in self.optims.items():
            t, info = ckpt.optimizer_to_flat(opt, f"optim.{name}")
            tensors.update(t)
            optim_json[name] = info
        state = dict(nimg=self.nimg, seconds=self.seconds(), origins=self.origins, best=self.best, optim=optim_json,
                     rng=ckpt.rng_state(), config=run_config(self.method, self.cfg), world=self.world)
        return tensors, state

    def restore(self, tensors: dict, state: dict) -> None:
        method_sd = {k[7:]: v for k, v in tensors.items() if k.startswith("method.")}
        try:
            self.method.load_state_dict(method_sd)
            if self.ema is not None:
                self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
            for name, opt in self.optims.items():
                ckpt.optimizer_from_flat(opt, tensors, state["optim"][name], f"optim.{name}")
        except (RuntimeError, KeyError, ValueError) as e:
            raise DiffdistillError(f"{self.run_dir}: the newest checkpoint does not fit this method "
                                   f"({str(e).splitlines()[0]}); pass --force to start over") from None
        self.step, self.nimg = int(state["step"]), int(state["nimg"])
        if self.step > self.total_steps:
            raise DiffdistillError(f"{ckpt.checkpoint_files(self.run_dir, self.step)[1]}: at step {self.step}, "
                                   f"beyond this run's {self.total_steps} steps (--kimg/--max-steps); continue it "
                                   "with --resume and a longer run, or pass --force to start over")
        self.seconds_before = float(state.get("seconds", 0.0))
        self.origins.update({k: int(v) for k, v in state.get("origins", {}).items() if k in self.origins})
        self.best = state.get("best")
        ckpt.set_rng_state(state.get("rng", {}))       # (an older checkpoint's `extra_state` is ignored)
        dist.print0(f"resuming {self.run_dir} at step {self.step} ({self.nimg / 1000:g} kimg)")

    def buffer_names(self) -> set[str]:
        """Names of the checkpoint's tensors that are buffers (they may hold inf; weights may not)."""
        names = ckpt.buffer_names(self.method, "method.")
        for name, module in (self.ema.modules.items() if self.ema is not None else []):
            names |= ckpt.buffer_names(module, f"ema.{name}.")
        return names

    def kept(self, finite: bool = False) -> str:
        """What remains of the run on disk, for the message of a stop (every checkpoint written is finite)."""
        last = ckpt.list_checkpoints(self.run_dir)
        if not last:
            return "no checkpoint was written yet"
        return f"the last good checkpoint {last[0][1]} is kept (all are finite)" if finite else \
            f"the previous checkpoint {last[0][1]} is intact"

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current state; only a finite one (every rank checks its own, identical
        state, so that all stop together), and a full disk stops the run with the previous checkpoint intact."""
        tensors, state = self.state()
        buffers = self.buffer_names()
        bad = ckpt.nonfinite(tensors, buffers)
        if bad:
            raise DiffdistillError(f"non-finite state at step {self.step} ({self.nimg / 1000:g} kimg) of "
                                   f"{self.method.name!r}: {ckpt.NonFiniteState(bad)}; training stopped without "
                                   f"writing it, {self.kept(finite=True)}")
        error = None
        if self.main:
            try:
                ckpt.check_no_links(self.run_dir)
                ckpt.save_checkpoint(self.run_dir, self.step, tensors, state, self.cfg.keep_checkpoints, buffers,
                                     checked=True)
            except (OSError, io.CannotWrite) as e:
                reason = e.reason if isinstance(e, io.CannotWrite) else (e.strerror or str(e))
                error = DiffdistillError(f"cannot write the checkpoint of step {self.step} in "
                                         f"{self.run_dir / ckpt.CHECKPOINT_DIR} ({reason}); {self.kept()}")
            except DiffdistillError as e:
                error = e
        if dist.any_true(error is not None, self.device) if self.world > 1 else error is not None:
            raise error if error is not None else DiffdistillError("rank 0 could not write the checkpoint")
        dist.barrier()

    def seconds(self) -> float:
        """Training time of the run so far, over all its sessions (stats.jsonl's `time`)."""
        return self.seconds_before + time.time() - self.session_start

    # -- exports ----------------------------------------------------------------------------------
    def export(self):
        return self.method.export(self.ema.modules if self.ema is not None else None)

    def save_snapshot(self, name: str, meta: dict | None = None) -> Path:
        denoiser, recipe = self.export()
        meta = {**self.cfg.meta, "method": self.method.name, "step": self.step, "nimg": self.nimg,
                "kimg": self.nimg / 1000, **(meta or {})}
        bad = ckpt.nonfinite(denoiser.state_dict(), ckpt.buffer_names(denoiser))
        if bad:
            raise DiffdistillError(f"non-finite export at step {self.step} ({self.nimg / 1000:g} kimg) of "
                                   f"{self.method.name!r}: the weights {bad[0][0]} hold {bad[0][1]}; "
                                   f"{self.run_dir / name} not written, training stopped, {self.kept(finite=True)}")
        ckpt.check_no_links(self.run_dir)
        try:
            return io.save_snapshot(self.run_dir / name, denoiser, recipe, meta)
        except io.CannotWrite as e:
            raise DiffdistillError(f"cannot write {e.path} ({e.reason}); {self.kept()}") from None

    @torch.no_grad()
    def save_grid(self, path: Path) -> None:
        from .. import samplers

        denoiser, recipe = self.export()
        recipe = dict(recipe)
        kind = recipe.pop("sampler", "heun")
        steps, sigmas = recipe.pop("steps", None), recipe.pop("sigmas", None)
        cond = None
        if denoiser.label_dim > 0:
            cond = torch.arange(self.cfg.grid_n) % denoiser.label_dim
        training = denoiser.training
        denoiser.eval()
        try:
            x = samplers.sample(denoiser, self.cfg.grid_n, steps=steps, sampler=kind, sigmas=sigmas, cond=cond,
                                device=self.device, batch=max(64, self.batch_gpu), **recipe)
        finally:
            denoiser.train(training)
        ckpt.check_no_links(self.run_dir)
        try:
            if len(denoiser.shape) == 3 and denoiser.shape[0] in (1, 3):
                save_image_grid(x, path)
            elif len(denoiser.shape) == 1 and denoiser.shape[0] >= 2:
                save_scatter(x, path)
        except io.CannotWrite as e:
            raise DiffdistillError(f"cannot write {e.path} ({e.reason}); {self.kept()}") from None

    def write_stats(self, record: dict) -> None:
        """A line of stats.jsonl (rank 0); a full disk stops the run in one line, its checkpoints intact."""
        if self.stats is None:
            return
        try:
            self.stats.write(record)
        except OSError as e:
            raise DiffdistillError(f"cannot write {self.stats.path} ({e.strerror or e}); {self.kept()}") from None

    def _group_pass(self, name: str, group: Group, seed_index: int, lr: float, micro: list, sums: dict,
                    extra: bool) -> None:
        """One optimiser step of a group: accumulate its loss over the micro-batches, nan_to_num, clip, step."""
        cfg, opt = self.cfg, self.optims[name]
        for pg in opt.param_groups:
            pg["lr"] = lr
        opt.zero_grad(set_to_none=True)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        prefix = f"{name}.extra" if extra else name
        for a in range(self.accum):
            torch.manual_seed(step_seed(cfg.seed, self.step, a * self.world + self.rank, seed_index))
            batch = Batch(size=self.batch_gpu, device=self.device, step=self.step, nimg=self.nimg, extra=extra)
            if isinstance(micro[a], dict) and group.needs_data:   # items of named fields (KD's pairs)
                batch.fields = {k: v.to(self.device, non_blocking=True) for k, v in micro[a].items()}
            elif micro[a] is not None and group.needs_data:      # (x, label) items: images, points
                x, labels = micro[a]
                batch.x = x.to(self.device, torch.float32, non_blocking=True)
                labels = torch.as_tensor(labels)
                if getattr(self.data, "label_dim", 0) > 0 and bool((labels >= 0).all()):
                    batch.cond = labels.to(self.device, torch.long)
            sync = contextlib.nullcontext()
            if a < self.accum - 1 and isinstance(self.loss_call, nn.parallel.DistributedDataParallel):
                sync = self.loss_call.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    out = self.loss_call(name, batch)
                loss = out["loss"]
                finite &= torch.isfinite(loss.detach())
                (loss / self.accum).backward()
            for key, value in out.items():
                if torch.is_tensor(value) and value.numel() == 1:
                    s, n = sums.get(f"{prefix}/{key}", (0.0, 0))
                    sums[f"{prefix}/{key}"] = (s + value.detach().double().reshape(()), n + 1)
        if dist.any_true(not bool(finite), self.device):
            raise _NonFinite(name, self._nan_source(micro, group))
        params = [p for p in group.params if p.grad is not None]
        for p in params:  # EDM: nan_to_num of gradients before every step
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        if group.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, group.optim.grad_clip)
        opt.step()

    def _nan_source(self, micro: list, group: Group) -> str:
        """Where a non-finite loss came from, in words: items of the step's real data, a tensor of the method
        (weights of the teacher, the student, ...), or neither (the loss itself overflowed)."""
        if group.needs_data:
            for a, mb in enumerate(micro):
                if mb is None:
                    continue
                bad = None
                for x in (mb.values() if isinstance(mb, dict) else [mb[0]]):   # named fields, else x of (x, label)
                    x = torch.as_tensor(x)
                    row_bad = (~torch.isfinite(x.reshape(len(x), -1))).any(1)
                    bad = row_bad if bad is None else bad | row_bad
                rows = bad.nonzero().flatten().tolist()
                if rows:
                    sampler = StreamSampler(len(self.data), self.cfg.seed, self.nimg, self.cfg.batch,
                                            self.batch_gpu, self.accum, self.world, self.rank)
                    indices = next(ids for i, ids in enumerate(sampler) if i == a)
                    data = self.cfg.meta.get("data") or "the data set"
                    return f"items {[indices[r] for r in rows[:5]]} of the training data {data} hold NaN or inf"
        bad = ckpt.nonfinite(self.method.state_dict(), ckpt.buffer_names(self.method))
        if bad:
            return f"{ckpt.describe_tensor('method.' + bad[0][0])} holds {bad[0][1]}"
        return "its weights and data are finite: the loss itself overflowed (a learning rate too high?)"

    # -- one step ---------------------------------------------------------------------------------
    def train_step(self, sums: dict) -> None:
        method, cfg = self.method, self.cfg
        method.begin_step(self.step, self.nimg)     # a notice; any return value is ignored
        for name, group in self.groups.items():
            if group.start and self.step == group.start:
                self.origins[name] = self.nimg  # a group that starts late: its LR schedule counts from here
        micro = [next(self.batches) for _ in range(self.accum)] if self.needs_data else [None] * self.accum
        nimg_after = self.nimg + cfg.batch
        for gi, (name, group) in enumerate(self.groups.items()):
            if self.step < group.start or self.step % group.every:
                continue
            lr = lr_at(group.optim, nimg_after, self.origins[name], self.total_steps * cfg.batch)
            sums[f"lr/{name}"] = (torch.tensor(lr, dtype=torch.float64), 1)
            self._group_pass(name, group, gi, lr, micro, sums, extra=False)
            if group.extra_every and self.step > group.start and self.step % group.extra_every == 0:
                self._group_pass(name, group, gi + len(self.groups), lr, micro, sums, extra=True)
        self.step += 1
        self.nimg = nimg_after
        if self.ema is not None:
            self.ema.update(self.nimg, cfg.batch)

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self) -> dict:
        cfg = self.cfg
        self.setup()
        if self.stage.skipped:
            return dict(run_dir=str(self.run_dir), step=self.step, nimg=self.nimg, interrupted=False, best=self.best,
                        model=None, latest=None, rank=self.rank)
        self.session_start = time.time()
        sums, tick_time, tick_step, tick_nimg = self.tick or ({}, self.session_start, self.step, self.nimg)
        interrupted, last_ckpt_step = False, self.step
        bar = None
        if self.main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"{self.method.name} {self.run_dir.name}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        with _StopFlag() as stop:
            try:
                while self.step < self.end:
                    if dist.any_true(stop.set, self.device) if self.world > 1 else stop.set:
                        interrupted = True
                        break
                    prev = self.nimg
                    try:
                        self.train_step(sums)
                    except _NonFinite as e:
                        raise DiffdistillError(
                            f"non-finite loss in group {e.group!r} of {self.method.name!r} at step {self.step} "
                            f"({self.nimg / 1000:g} kimg; {e.source}): training stopped, "
                            f"{self.kept(finite=True)}") from None
                    if bar is not None:
                        bar.update(1)
                    done = self.step >= self.total_steps
                    if _crossed(prev, self.nimg, cfg.tick_kimg) or done:
                        now = time.time()
                        rec = self.tick_record(sums, self.seconds(), now - tick_time, self.step - tick_step,
                                               self.nimg - tick_nimg)
                        sums, tick_time, tick_step, tick_nimg = {}, now, self.step, self.nimg
                        if bar is not None:
                            bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k.endswith("/loss")})
                    if self.main and _crossed(prev, self.nimg, cfg.grid_kimg):
                        self.save_grid(self.run_dir / f"samples-{kimg_label(self.nimg, cfg.grid_kimg)}.png")
                    if self.main and _crossed(prev, self.nimg, cfg.snapshot_kimg):
                        self.save_snapshot(f"snapshot-{kimg_label(self.nimg, cfg.snapshot_kimg)}")
                    if _crossed(prev, self.nimg, cfg.eval_kimg) or (done and cfg.eval_kimg > 0):
                        self.run_eval()
                    if _crossed(prev, self.nimg, cfg.checkpoint_kimg):
                        self.save_checkpoint()
                        last_ckpt_step = self.step
            finally:
                if bar is not None:
                    bar.close()
            if self.step != last_ckpt_step or interrupted:
                self.save_checkpoint()
        result = dict(run_dir=str(self.run_dir), step=self.step, nimg=self.nimg, interrupted=interrupted,
                      best=self.best, model=None, latest=None, rank=self.rank)
        if interrupted:
            if self.main:   # what `diffdistill sample RUN` reads until the run is continued and finishes
                result["latest"] = str(self.save_snapshot(LATEST_DIR, meta=dict(interrupted=True)))
            dist.barrier()
        else:
            final = self.end >= self.total_steps
            if self.main:
                if self.stage.export:
                    self.save_snapshot(self.stage.export)
                if final and (cfg.grid_kimg or cfg.final_grid):
                    self.save_grid(self.run_dir / "samples-final.png")
                if final:
                    result["model"] = str(self.save_snapshot(MODEL_DIR))
                    _remove_snapshot(self.run_dir / LATEST_DIR)   # RUN/model supersedes it
            dist.barrier()
            self.stage.carry = dict(step=self.step, nimg=self.nimg, seconds=self.seconds(), best=self.best,
                                    tick=(sums, tick_time, tick_step, tick_nimg))
        if self.stats is not None:
            self.stats.close()
        return result

    def tick_record(self, sums: dict, elapsed: float, tick_s: float, steps: int, images: int) -> dict:
        keys = sorted(sums)
        values = [torch.as_tensor(sums[k][0], dtype=torch.float64).cpu() / max(sums[k][1], 1) for k in keys]
        values = dist.all_reduce_mean(torch.stack(values).to(self.device)).cpu().tolist() if keys else []
        rec = dict(kimg=self.nimg / 1000, step=self.step, time=round(elapsed, 3))
        rec.update({k: v for k, v in zip(keys, values)})
        rec.update({"it_per_s": steps / max(tick_s, 1e-9), "img_per_s": images / max(tick_s, 1e-9),
                    "peak_mem_gb": peak_memory_gb(self.device)})
        self.write_stats(rec)
        return rec

    def run_eval(self) -> None:
        if self.evaluate is None:
            return
        metrics = self.evaluate(self.method, self.ema.modules if self.ema is not None else None, self.nimg) or {}
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.stats is not None:
            self.write_stats(dict(kimg=self.nimg / 1000, step=self.step, **{f"eval/{k}": v
                                                                             for k, v in metrics.items()}))
        name = self.cfg.best_metric
        if name is None:
            return
        if name not in metrics:
            warnings.warn(f"evaluate() returned no {name!r} (got {sorted(metrics)}); RUN/best not updated",
                          stacklevel=2)
            return
        value = metrics[name]
        better = self.best is None or (value < self.best["value"] if self.cfg.best_mode == "min"
                                       else value > self.best["value"])
        if better and math.isfinite(value):
            self.best = dict(metric=name, value=value, step=self.step, nimg=self.nimg)
            if self.main:
                self.save_snapshot("best", meta=dict(metrics=metrics))
        dist.barrier()


def ema_settings(method: Method, cfg: TrainConfig) -> tuple[float, float | None]:
    """(half-life kimg, ramp-up) of the run's EMA: the config's when it gives a half-life, else the method's."""
    if cfg.ema_halflife_kimg is None:
        return method.ema_default(cfg.batch)
    return cfg.ema_halflife_kimg, cfg.ema_rampup


def _remove_snapshot(path: Path) -> None:
    """Delete a snapshot directory the loop wrote (its JSON first, so that it never reads as whole)."""
    if path.is_dir():
        (path / io.SNAPSHOT_JSON).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


class _NonFinite(Exception):
    def __init__(self, group: str, source: str):
        super().__init__(group)
        self.group, self.source = group, source


def _say(text: str) -> None:
    """A note of rank 0 on stderr (a damaged checkpoint skipped)."""
    if dist.is_main():
        print(text, file=sys.stderr, flush=True)


def train(method: Method, cfg: TrainConfig, data=None, evaluate=None, stage: Stage | None = None) -> dict:
    """Train `method` with the loop settings `cfg`; returns {run_dir, step, nimg, interrupted, best, model, latest,
    rank}: `model` (RUN/model) on rank 0 of a finished run, `latest` (RUN/latest) on rank 0 of an interrupted one,
    else None; `rank` is this process's (only rank 0 writes files).

    data: a map-style data set when a group needs data: `ds[i] -> (x, label)` with `ds.label_dim` (images, points:
    `Batch.x`, `Batch.cond`), or `ds[i] -> {field: tensor}` (KD's pairs: `Batch.fields`).
    evaluate: optional `evaluate(method, ema_modules, nimg) -> {metric: value}`, called every `eval_kimg`.
    RUN/model/ receives the sampler-ready export of the EMA at the end, RUN/latest/ when the run is interrupted.
    stage: this call as one `Stage` of a longer schedule (None: the whole run).
    """
    return _Run(method, cfg, data, evaluate, stage).run()
