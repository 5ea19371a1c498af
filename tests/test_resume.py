"""Checkpoints and resumption: N steps == k steps + kill + resume + N-k steps, bit for bit (on CPU).

The kill-and-resume trials run the real commands (`train-teacher` and `distill gdd/di/pd/kd` on toy:ring8) in forked
children and kill them at 8 points each (40 in all): before the first checkpoint, half-way through a checkpoint's
tensors, after its tensors but before its JSON, after its JSON but before older ones are pruned, during a step,
by SIGTERM (a checkpoint at an odd step and RUN/latest), and while RUN/model is written. Rerunning the same command
after every kill and once more at the end gives the uninterrupted run's every tensor (weights, EMA, optimiser
state) and RUN/model. Also: damaged checkpoints are skipped with a note, a full disk keeps the previous checkpoint.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import checkpoint_faults  # noqa: E402
from test_loop import Points, Toy  # noqa: E402

from diffdistill import io  # noqa: E402
from diffdistill.cli.main import main  # noqa: E402
from diffdistill.errors import DiffdistillError  # noqa: E402
from diffdistill.train import checkpoint as ckpt  # noqa: E402
from diffdistill.train import loop  # noqa: E402
from diffdistill.train.loop import TrainConfig, train  # noqa: E402

STEPS = 10


def run_config(out, **kw) -> TrainConfig:
    # batch 16, checkpoint every 32 images = every 2 steps; group b every 2nd step
    base = dict(out=str(out), max_steps=STEPS, total_kimg=1.0, batch=16, batch_gpu=8, ema_halflife_kimg=0.05,
                tick_kimg=0.032, checkpoint_kimg=0.032, keep_checkpoints=3, seed=7, tensorboard=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def make_method() -> Toy:
    return Toy(every_b=2)


# --------------------------------------------------------------------------------------------------
# Kill-and-resume trials of the real commands

TOTAL = 12     # steps of batch 16; a checkpoint every 2 steps (0.032 kimg)
LOOP = ["--max-steps", str(TOTAL), "--batch", "16", "--checkpoint-kimg", "0.032", "--tick-kimg", "0.032",
        "--grid-kimg", "0", "--seed", "3", "--no-progress"]
COMMANDS = {
    "teacher": ["train-teacher", "--data", "toy:ring8", "--preset", "toy"],
    "gdd": ["distill", "gdd", "--teacher", "toy:ring8", "--data", "toy:ring8"],
    "di": ["distill", "di", "--teacher", "toy:ring8"],
    # two rounds of 4 steps (8 -> 4 -> 2 steps), one loop call (stage) each: round snapshots, a fresh optimiser
    # and EMA per round, a checkpoint at each round's end
    "pd": ["distill", "pd", "--teacher", "toy:ring8", "--data", "toy:ring8", "--start-steps", "8", "--end-steps", "2",
           "--round-kimg", "0.064"],
    # the loop streams KD's 40 training pairs (RUN-pairs) as its data set: 12 steps of 16 cross 4 epoch ends, two
    # of them mid-step; its own model selection (held-out loss, the best EMA) runs every 2 steps
    "kd": ["distill", "kd", "--teacher", "toy:ring8", "--n-pairs", "40", "--heldout", "8", "--shard-size", "16",
           "--pairs-steps", "2", "--eval-kimg", "0.032"],
}
# (how, where, checkpoints on disk afterwards): each kill resumes from what the one before left.
KILLS = [
    ("step", 1, []),                                  # before the first checkpoint: restarts from the same init
    ("hook", "kill-mid-tensors:2", []),               # half a tensors file (a temp file), no checkpoint yet
    ("hook", "kill-after-tensors:4", [2]),            # tensors of 4 written, its JSON not
    ("step", 5, [4, 2]),                              # during a step
    ("hook", "kill-after-json:6", [6, 4, 2]),         # 6 complete, 2 not pruned yet
    ("term", 8, [9, 8]),                              # SIGTERM: finishes step 8, a checkpoint at 9, RUN/latest
    ("step", 11, [10, 9]),
    ("model", None, [12, 10]),                        # killed while writing RUN/model/model.json
]


def _killing(how: str, where) -> None:
    """In the child: arrange to be killed as (how, where) says."""
    if how == "hook":
        checkpoint_faults.install(where)
    elif how in ("step", "term"):
        step = loop._Run.train_step

        def train_step(self, sums):
            if self.step == where:
                os.kill(os.getpid(), signal.SIGKILL if how == "step" else signal.SIGTERM)
            return step(self, sums)

        loop._Run.train_step = train_step
    elif how == "model":
        write_json = io.atomic_write_json

        def atomic_write_json(path, obj):
            if Path(path).name == io.SNAPSHOT_JSON and Path(path).parent.name == loop.MODEL_DIR:
                os.kill(os.getpid(), signal.SIGKILL)
            return write_json(path, obj)

        io.atomic_write_json = atomic_write_json


def _in_child(argv: list[str], how: str | None = None, where=None) -> int:
    """Run `diffdistill argv` in a forked child (killed as `how`/`where` say); its wait status."""
    pid = os.fork()
    if pid == 0:    # pragma: no cover (the child)
        code = 99
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            if how is not None:
                _killing(how, where)
            code = main(argv)
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    _, js = ckpt.list_checkpoints(run)[0]
    tensors, state = ckpt.read_checkpoint(js)
    assert state["step"] == TOTAL
    return {**tensors, **{f"model/{k}": v for k, v in load_file(run / "model" / "model.safetensors").items()}}


@pytest.fixture(autouse=True)
def no_tensorboard(monkeypatch):
    """The trials need no TensorBoard files (importing it in every child costs seconds)."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_kill_and_resume_is_bit_exact(tmp_path, name):
    argv = COMMANDS[name]
    assert main([*argv, "--out", str(tmp_path / "ref"), *LOOP]) == 0       # uninterrupted (and warms this process)
    expected = _tensors(tmp_path / "ref")
    run = tmp_path / "run"
    command = [*argv, "--out", str(run), *LOOP]
    for how, where, left in KILLS:
        status = _in_child(command, how, where)
        if how == "term":
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, (how, where, status)
            assert (run / loop.LATEST_DIR / io.SNAPSHOT_JSON).is_file()
        else:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (how, where, status)
        assert [s for s, _ in ckpt.list_checkpoints(run)] == left, (how, where)
        for _, js in ckpt.list_checkpoints(run):       # every complete checkpoint on disk reads back whole
            ckpt.read_checkpoint(js)
    status = _in_child(command)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    got = _tensors(run)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert not (run / loop.LATEST_DIR).exists()
    assert not list((run / "checkpoints").glob("*.tmp"))


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints and a full disk


def test_damaged_checkpoints_are_skipped(tmp_path):
    run = tmp_path / "run"
    train(make_method(), run_config(run, max_steps=6), Points())
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert steps == [6, 4, 2]
    tensors6, json6 = ckpt.checkpoint_files(run, 6)
    with open(tensors6, "r+b") as f:  # truncate the newest tensors
        f.truncate(tensors6.stat().st_size - 10)
    json4 = ckpt.checkpoint_files(run, 4)[1]
    json4.write_text(json4.read_text()[:40])  # and break the JSON of the next one
    notes = []
    _, state = ckpt.load_latest(run, say=notes.append)
    assert state["step"] == 2
    assert len(notes) == 2 and all("resuming from the older intact checkpoint" in n for n in notes)
    assert "ckpt-000000006.safetensors" in notes[0] and "ckpt-000000004.json" in notes[1]
    with warnings.catch_warnings(record=True) as caught:      # the default: warnings
        warnings.simplefilter("always")
        ckpt.load_latest(run)
    assert len(caught) == 2
    with pytest.raises(DiffdistillError, match="damaged"):
        ckpt.read_checkpoint(json6)
    # no intact checkpoint left: an error (not a silent restart from step 0)
    tensors2 = ckpt.checkpoint_files(run, 2)[0]
    tensors2.write_bytes(tensors2.read_bytes()[:-1] + b"x")
    with pytest.raises(DiffdistillError, match=r"no intact checkpoint.*--force"):
        ckpt.load_latest(run, say=notes.append)


@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    real_save = ckpt.save_file
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then the disk is full
            real_save(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(Path(path).stat().st_size // 2)
            if error == "oserror":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(DiffdistillError) as caught:
        train(make_method(), run_config(run), Points())
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("cannot write the checkpoint of step 4")
    assert message.endswith(f"(No space left on device); the previous checkpoint {run}/checkpoints/"
                            "ckpt-000000002.json is intact")
    tensors, state = ckpt.load_latest(run)
    assert state["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000002.json",
                                                                       "ckpt-000000002.safetensors"]
    # the same command again resumes from it and finishes
    assert train(make_method(), run_config(run), Points())["step"] == STEPS
