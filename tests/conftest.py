"""Test-wide settings: one intra-op thread per process. The suite's models are tiny, so extra threads only add
contention (measured: a tiny UNet forward took 2 s with 2 threads on a loaded 2-core machine, 13 ms with 1)."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Every test starts on one torch thread, and what a test or an in-process CLI call changes (`--threads` sets
    torch's threads and OMP_NUM_THREADS) is undone after it."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the project's root; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA
