"""DDP: two CPU processes over gloo (global batch 16, micro-batch 8 each) equal one process accumulating two
micro-batches of 8, within float tolerance; only rank 0 writes files."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import Points, Toy  # noqa: E402

from diffdistill.train import checkpoint as ckpt  # noqa: E402
from diffdistill.train.loop import TrainConfig, train  # noqa: E402


def _config(out) -> TrainConfig:
    return TrainConfig(out=str(out), max_steps=6, batch=16, batch_gpu=8, ema_halflife_kimg=0.05, tick_kimg=0.032,
                       checkpoint_kimg=1.0, seed=3, tensorboard=False, progress=False)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        result = train(Toy(every_b=2), _config(out), Points(n=40))
        assert result["step"] == 6
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(tmp_path):
    single = tmp_path / "single"
    train(Toy(every_b=2), _config(single), Points(n=40))
    expected, _ = ckpt.load_latest(single)

    ddp = tmp_path / "ddp"
    mp.start_processes(_worker, args=(2, _free_port(), str(ddp)), nprocs=2, join=True, start_method="fork")
    got, state = ckpt.load_latest(ddp)
    assert state["world"] == 2 and state["step"] == 6
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)
    # the runs really trained (weights moved from their initialisation)
    init = Toy().state_dict()
    assert any(not torch.allclose(got[f"method.{k}"], v) for k, v in init.items())
    assert (ddp / "model" / "model.json").is_file() and (ddp / "stats.jsonl").is_file()
