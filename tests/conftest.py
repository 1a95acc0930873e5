"""Set-up shared by every test file."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op thread in this process and (OMP_NUM_THREADS) in the subprocesses tests start.

    On a shared 2-core machine two OpenMP threads that lose their core to another process make a tiny
    forward pass 10x slower, and the tests only need values; a run is also only bit-identical to another
    with the same thread count (the resume tests compare processes).
    """
    import torch

    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env
