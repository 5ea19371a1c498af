"""Checkpoints and resumption: N steps == k steps + SIGKILL + resume + N-k steps, bit for bit (on CPU), also when
the kill lands in the middle of a checkpoint write; damaged checkpoints are skipped; a full disk keeps the
previous checkpoint valid.

Run as a script (`python tests/test_resume.py RUN STEPS`), this file trains the toy method of test_loop.py; the
tests below start it in subprocesses and SIGKILL it.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import Points, Toy  # noqa: E402

from diffdistill.errors import DiffdistillError  # noqa: E402
from diffdistill.train import checkpoint as ckpt  # noqa: E402
from diffdistill.train.loop import TrainConfig, train  # noqa: E402

STEPS = 10
KILL_AT_STEP_ENV = "TOY_KILL_AT_STEP"


def run_config(out, **kw) -> TrainConfig:
    # batch 16, checkpoint every 32 images = every 2 steps; group b every 2nd step, reset at step 5
    base = dict(out=str(out), max_steps=STEPS, total_kimg=1.0, batch=16, batch_gpu=8, ema_halflife_kimg=0.05,
                tick_kimg=0.032, checkpoint_kimg=0.032, keep_checkpoints=3, seed=7, tensorboard=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def make_method() -> Toy:
    return Toy(every_b=2, reset_b_at=5)


def final_state(run) -> dict[str, torch.Tensor]:
    tensors, state = ckpt.load_latest(run)
    assert state["step"] == STEPS
    return tensors


def run_script(out, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)
    return subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_sigkill_and_resume_is_bit_exact(tmp_path):
    ref = tmp_path / "ref"
    train(make_method(), run_config(ref), Points())
    expected = final_state(ref)

    run = tmp_path / "run"
    # 1) SIGKILL in the middle of training (step 5, after the checkpoint of step 4)
    p = run_script(run, {KILL_AT_STEP_ENV: "5"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 2]
    # 2) resumed from 4, killed half-way through writing the tensors of checkpoint 6
    p = run_script(run, {ckpt.TEST_HOOK_ENV: "kill-mid-tensors:6"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "resuming" in p.stdout and "step 4" in p.stdout
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 2]
    # 3) resumed from 4 again, killed after the tensors of checkpoint 8 but before its JSON
    p = run_script(run, {ckpt.TEST_HOOK_ENV: "kill-after-tensors:8"})
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (run / "checkpoints" / "ckpt-000000008.safetensors").is_file()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [6, 4, 2]
    # 4) the same command once more: resumes from 6 and finishes
    method = make_method()
    result = train(method, run_config(run), Points())
    assert result["step"] == STEPS
    assert {s for _, s, _ in method.seen} == set(range(6, STEPS))
    got = final_state(run)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert not list((run / "checkpoints").glob("*.tmp"))


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, state = ckpt.load_latest(run)
    assert state["step"] == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "ckpt-000000006.safetensors" in messages and "ckpt-000000004.json" in messages
    with pytest.raises(DiffdistillError, match="damaged"):
        ckpt.read_checkpoint(json6)


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    real_save = ckpt.save_file
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then the disk is full
            real_save(tensors, path)
            with open(path, "r+b") as f:
                f.truncate(Path(path).stat().st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    with pytest.raises(DiffdistillError, match=r"step 4 \(No space left on device\).*ckpt-000000002.json is intact"):
        train(make_method(), run_config(run), Points())
    tensors, state = ckpt.load_latest(run)
    assert state["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000002.json",
                                                                       "ckpt-000000002.safetensors"]
    json.loads((run / "config.json").read_text())


def _main(out: str) -> None:
    torch.set_num_threads(1)
    method = make_method()
    kill_at = os.environ.get(KILL_AT_STEP_ENV)
    if kill_at is not None:
        loss = method.loss

        def killing_loss(group, batch):
            if batch.step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
            return loss(group, batch)

        method.loss = killing_loss
    train(method, run_config(out), Points())


if __name__ == "__main__":
    _main(sys.argv[1])
