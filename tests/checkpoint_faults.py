"""Crashes while a checkpoint is written, for the kill-and-resume tests: test code only, nothing in the package.

`install(where)` wraps the two writers that `diffdistill.train.checkpoint.save_checkpoint` calls (safetensors'
`save_file` and `io.atomic_write_json`, as the checkpoint module names them) so that this process is SIGKILLed at
one point of writing the checkpoint of one step; `where` is one of

  kill-mid-tensors:STEP    half-way through the tensors file (its temp file written, then cut to half its length)
  kill-after-tensors:STEP  after the tensors file, before its JSON
  kill-after-json:STEP     after its JSON (the checkpoint is complete), before older checkpoints are pruned

Call it in the process to be killed (a forked child) before the command runs.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from diffdistill.train import checkpoint

POINTS = ("kill-mid-tensors", "kill-after-tensors", "kill-after-json")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(where: str) -> None:
    point, _, step = where.partition(":")
    if point not in POINTS or not step.isdigit():
        raise ValueError(f"unknown checkpoint fault {where!r} (expected one of {', '.join(POINTS)} and ':STEP')")
    tensors_name, json_name = (p.name for p in checkpoint.checkpoint_files(".", int(step)))
    save_file, write_json = checkpoint.save_file, checkpoint.atomic_write_json

    def save_file_then_cut(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        # io.atomic_write's temp file of the tensors file: .ckpt-<step>.safetensors.<random>.tmp
        if point == "kill-mid-tensors" and Path(filename).name.startswith(f".{tensors_name}."):
            size = os.path.getsize(filename)
            with open(filename, "r+b") as f:
                f.truncate(size // 2)
            _die()

    def write_json_around(path, obj):
        ours = Path(path).name == json_name
        if ours and point == "kill-after-tensors":
            _die()
        write_json(path, obj)
        if ours and point == "kill-after-json":
            _die()

    checkpoint.save_file = save_file_then_cut
    checkpoint.atomic_write_json = write_json_around
