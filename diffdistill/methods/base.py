"""The contract between a method and the one training loop (diffdistill.train.loop).

A method is an nn.Module holding its networks (teacher frozen, students trainable). It declares parameter
groups, each with its own optimiser settings and update schedule, and returns losses. The loop owns
optimisers, LR schedules, gradient accumulation/clipping, EMA, checkpoints, logging and distribution, and
knows nothing about any specific method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..diffusion.denoiser import Denoiser


@dataclass
class OptimConfig:
    """Optimiser and LR schedule of one parameter group."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    kind: str = "adam"            # adam | adamw | radam
    warmup_kimg: float = 0.0      # linear warm-up over this many thousand images
    decay: str = "constant"       # constant | linear (to 0 at the end of the run, or `decay_kimg` after its
    #                               origin: the start of the run or of its `train.loop.Stage`, or the group's
    #                               `start`)
    decay_kimg: float | None = None
    grad_clip: float | None = None  # global-norm clipping; None = off


@dataclass
class Group:
    """A trainable parameter group: its parameters, optimiser, loss, and which steps update it."""

    params: list[nn.Parameter]
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: Callable[[Batch], dict[str, Tensor]] | None = None  # the group's loss on one (micro)batch, usually
    #                               a bound method of the method (e.g. `self.generator_loss`): 'loss' is the
    #                               scalar to minimise (already reduced over the batch); other scalar entries are
    #                               logged as `group/key`. Required (the loop refuses a group without one)
    every: int = 1                # update on steps where step % every == 0 (DMD2's two-time-scale rule)
    needs_data: bool = False      # whether this group's loss uses the data set's items (`Batch`)
    start: int = 0                # first step of the group's updates: before it the loop neither computes its
    #                               loss nor steps its optimiser (a warm-up of the other groups), and its LR
    #                               schedule (warm-up, decay) counts from there
    extra_every: int = 0          # an extra pass on steps where step > start and step % extra_every == 0: after
    #                               the group's step the loop computes its loss again on the same micro-batches
    #                               with `batch.extra = True` and steps the same optimiser (same LR) once more
    #                               (lazy regularisation on its own step: StyleGAN2's and GDD's R1); 0 = none


@dataclass(frozen=True)
class Recipe:
    """A named set of settings (e.g. a paper's published CIFAR-10 recipe), applied beneath the user's own: on the
    command line its options are placed before the user's, in the Python API its values are overridden by the
    caller's keyword arguments."""

    source: str                   # where the values come from (paper section, official script)
    options: dict | Callable      # config field -> value, plus the loop's total_kimg, batch and ema_halflife_kimg
    #                               and the data's xflip (e.g. dict(gen_lr=1e-5, batch=128)); or a function
    #                               teacher -> such a dict, for a recipe that depends on the teacher


@dataclass
class Batch:
    """What the loop hands to a method: this micro-batch's items of the data set when the group needs data
    (`Group.needs_data`), else only size and device. A data set of (x, label) items (images, points: every
    method but KD) fills `x` and `cond`; one whose items are dicts of tensors (KD's pairs,
    `data.pairs.PairsDataset`) fills `fields` instead."""

    size: int
    device: torch.device
    x: Tensor | None = None       # real images/points in [-1, 1] (float32), [B, *shape]
    cond: Tensor | None = None    # int class labels [B], or None
    fields: dict[str, Tensor] = field(default_factory=dict)  # the items' fields, each stacked [B, ...] and on
    #                               the device, dtypes unchanged (KD: 'noise', 'target', and 'cond' if labelled)
    step: int = 0                 # optimiser step counter (global, counted across accumulation)
    nimg: int = 0                 # images seen so far
    extra: bool = False           # True on a group's extra pass (`Group.extra_every`)


def halflife_from_decay(decay: float, batch: int) -> float:
    """The half-life (kimg) of a per-step EMA decay `decay` at `batch` images per step: B ln 0.5 / ln decay / 1000
    (0 for decay 0: the EMA is a copy of the weights). With no ramp-up, the loop's EMA (`train.ema.ema_beta`) then
    gives back `decay`: for `Method.ema_default` of methods whose papers give a per-step decay (KD, CD)."""
    if not 0 <= decay < 1:
        raise ValueError(f"an EMA decay must lie in [0, 1), got {decay}")
    return 0.0 if decay == 0 else batch * math.log(0.5) / math.log(decay) / 1000


class Method(nn.Module):
    """Base class. Subclasses set `name`, build networks in __init__, and implement `groups` (each group naming
    its loss function) and `export`."""

    name: str = "method"

    def groups(self) -> dict[str, Group]:
        """Ordered: the loop updates the groups in this order at every step where `step % every == 0`."""
        raise NotImplementedError

    def ema_targets(self) -> dict[str, nn.Module]:
        """Networks of which the loop keeps an EMA (e.g. {'student': self.student})."""
        return {}

    def ema_default(self, batch: int) -> tuple[float, float | None]:
        """The method's own EMA, used when the loop is given none: (half-life in kimg, EDM ramp-up ratio or
        None). Default: EDM's 500 kimg with ramp-up 0.05 (Diff-Instruct, SiD, GDD)."""
        return 500.0, 0.05

    def export(self, ema: dict[str, nn.Module] | None = None) -> tuple[Denoiser, dict]:
        """The sampler-ready student (the EMA copy when given) and its sampling recipe, e.g.
        {'sampler': 'onestep', 'sigmas': [80.0, 0.0]}. No side effects: the loop calls it for every snapshot,
        grid and evaluation. The state of a method is its modules' state dict (parameters and buffers): that is
        what checkpoints hold."""
        raise NotImplementedError

    def begin_step(self, step: int, nimg: int) -> None:
        """A notice before every optimiser step: `step` steps and `nimg` images are done (CD's target EMA update,
        DMD2's hand-off list). The loop ignores any return value; it never resets a group's optimiser, LR schedule
        or EMA during a call of `train` (a method that needs that runs the loop once per `train.loop.Stage`, as
        progressive distillation's rounds do)."""
