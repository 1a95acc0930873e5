"""Several processes under torchrun: which one this is, its process group, and `--nproc N`.

torch.distributed does the work (gloo on the CPU, NCCL on CUDA); this module fits featcache to it,
so that N processes give the results of one.

* extract: each rank extracts its shard of the batch grid and rank 0 merges them; that flow lives in
  featcache.extraction, which uses this module's group (join), never the reverse.
* finetune: DistributedDataParallel. Each global batch of the plan is cut into contiguous parts, one
  per rank (`local_rows`). Each rank's mean loss is scaled by N * rows / global rows (`scale_loss`),
  so DDP's average of the N gradients is the gradient of the mean loss over the global batch. Loss
  sums and correct counts are summed over the ranks after every step and val/test logits gathered
  in row order, so the metrics are the one-process metrics. Only rank 0 writes the run directory;
  after torchrun restarts a failed group (--max-restarts) it resumes the run from its last.pt.

`Solo` is one process (every collective is the identity); `join()` returns it outside torchrun,
so the training loop has no branches for the two cases. torch is imported inside functions: extract
asks `world_size()` before it knows whether the cache exists, and a cache hit must not pay for torch.
This module imports no other featcache module but errors (and, inside functions, datasets and plan).
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featcache.errors import UserError

# How long a collective waits for the slowest rank: at the barrier after its shard a rank waits for
# the others' shards (and for rank 0's merge), in training for rank 0's checkpoint. A rank that dies
# never makes the others wait this long: torchrun then stops the whole group.
TIMEOUT = timedelta(hours=6)
SAME_DATA = ("give every machine the same dataset at the same path, copied with its file times (rsync -a), "
             "and the same command.")  # the fix, when processes see different data


def world_size() -> int:
    """Processes in this torchrun group (WORLD_SIZE); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (RANK); 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


def with_rank(log: Callable[[str], None], group: Solo) -> Callable[[str], None]:
    """`log` with every message prefixed "[rank R/N] " (the messages of N processes share one terminal)."""
    return lambda message: log(f"[rank {group.rank}/{group.world_size}] {message}")


def _part(n: int, rank: int, world_size: int) -> slice:
    """Rows [start, stop) of rank `rank` when n rows are cut into world_size contiguous parts, sizes
    differing by at most one, the larger ones first (numpy.array_split's rule)."""
    q, r = divmod(n, world_size)
    start = rank * q + min(rank, r)
    return slice(start, start + q + (rank < r))


def loss_scale(*, rows: int, global_rows: int, world_size: int) -> float:
    """The factor on one rank's mean loss over its `rows` that makes DDP's gradient average the gradient of
    the mean loss over the global batch: (1/N) sum_r N * rows_r / global * mean_r = sum of row losses / global."""
    return world_size * rows / global_rows


class Solo:
    """One process: the interface of Group, where every collective is the identity."""

    rank = 0
    world_size = 1
    local_rank = 0
    is_main = True

    def barrier(self) -> None:
        """Wait until every process gets here."""

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable)."""
        return obj

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """compute() run on rank 0 only, its result sent to every rank (files only rank 0 writes or reads)."""
        return compute()

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        return [obj]

    def sum(self, *values: float) -> tuple:
        """Each value summed over the ranks (float64)."""
        return values

    def require_same(self, value: Any, error: str) -> None:
        """UserError(error) on every rank unless every rank has the same `value` (picklable, comparable)."""
        if any(v != value for v in self.all_gather(value)):
            raise UserError(error)

    def local_rows(self, rows: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (or of any sequence)."""
        return rows

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        """The parts of every rank, concatenated in rank order: the rows of the whole sequence."""
        return local

    def scale_loss(self, loss, *, rows: int, global_rows: int):
        """The loss to back-propagate so that DDP's gradient average is the global batch's gradient."""
        return loss

    def device(self, device):
        """The torch.device of this rank (its own GPU, LOCAL_RANK, for "cuda")."""
        return device

    def wrap(self, module, *, device, sync_batchnorm: bool):
        """The module whose backward averages its gradients over the ranks (DDP)."""
        return module

    def restarted_run_dir(self, runs_dir: str | Path, *, seed: int) -> Path | None:
        """After torchrun restarted the group: the run directory the failed attempt was training."""
        return None

    def mark_run_dir(self, run_dir: Path, *, seed: int) -> None:
        """Leave in `run_dir` what restarted_run_dir looks for."""


class Group(Solo):
    """This process in the torchrun group that started it (use `join`, which joins once per process)."""

    def __init__(self, *, cuda: bool):
        import torch
        import torch.distributed as dist

        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.cuda = cuda
        if cuda:
            take_own_gpu(self.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=TIMEOUT)
        # featcache's own collectives (objects, metric sums) run on the CPU through gloo; DDP's through NCCL
        self._cpu = dist.new_group(backend="gloo", timeout=TIMEOUT) if cuda else None

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self._cpu)

    def broadcast(self, obj: Any) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._cpu)
        return box[0]

    def from_main(self, compute: Callable[[], Any]) -> Any:
        return self.broadcast(compute() if self.is_main else None)

    def all_gather(self, obj: Any) -> list:
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._cpu)
        return out

    def sum(self, *values: float) -> tuple:
        import torch
        import torch.distributed as dist

        totals = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(totals, group=self._cpu)
        return tuple(totals.tolist())

    def local_rows(self, rows):
        return rows[_part(len(rows), self.rank, self.world_size)]

    def gather_rows(self, local: np.ndarray) -> np.ndarray:
        return np.concatenate(self.all_gather(local))

    def scale_loss(self, loss, *, rows: int, global_rows: int):
        return loss * loss_scale(rows=rows, global_rows=global_rows, world_size=self.world_size)

    def device(self, device):
        import torch

        return torch.device("cuda", self.local_rank) if device.type == "cuda" else device

    def wrap(self, module, *, device, sync_batchnorm: bool):
        from torch import nn
        from torch.nn.parallel import DistributedDataParallel

        if sync_batchnorm and device.type == "cuda":
            # BatchNorm statistics over the global batch, as in one process (SyncBatchNorm is CUDA-only)
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def restarted_run_dir(self, runs_dir: str | Path, *, seed: int) -> Path | None:
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0 or not _run_marker(seed):
            return None

        def find() -> Path | None:
            marks = sorted(Path(runs_dir).glob(f"*/{_run_marker(seed)}"))
            return marks[-1].parent if marks else None

        return self.from_main(find)

    def mark_run_dir(self, run_dir: Path, *, seed: int) -> None:
        if self.is_main and _run_marker(seed):
            (run_dir / _run_marker(seed)).write_text(f"torchrun run {os.environ['TORCHELASTIC_RUN_ID']}\n")


def take_own_gpu(local_rank: int) -> None:
    """Make GPU LOCAL_RANK current: "cuda" is then this process's own GPU."""
    import torch

    if local_rank >= torch.cuda.device_count():
        raise UserError(f"Process {local_rank} of this machine needs GPU {local_rank}, and there are "
                        f"{torch.cuda.device_count()}; start at most one process per GPU (--nproc, --nproc-per-node).")
    torch.cuda.set_device(local_rank)


def _run_marker(seed: int) -> str:
    """File name marking the run directory of one seed of one torchrun launch ('' outside torchrun)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f".torchrun-{run_id}-seed{seed}" if run_id else ""


_joined: Group | None = None  # torch's process group is per process, and cannot be joined again after leaving


def join(*, cuda: bool = False) -> Solo:
    """This process's group: Solo outside torchrun, else the Group, joined on the first call and left at exit.

    Args:
        cuda: NCCL for the tensors of DDP (and this rank's GPU made current); gloo otherwise.
    """
    global _joined
    if world_size() <= 1:
        return Solo()
    if _joined is None:
        _joined = Group(cuda=cuda)
        atexit.register(leave)
    elif cuda and not _joined.cuda:
        raise RuntimeError("this process joined its group without CUDA; one command per process")
    return _joined


def leave() -> None:
    """Destroy the process group, if this process joined one."""
    global _joined
    if _joined is not None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _joined = None


# --------------------------------------------------------------------------- launching


def torchrun_command(command: str, args: Sequence[str], *, nproc: int, max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run ... -m featcache COMMAND ARGS`: N processes on this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "featcache", command, *args]


# torchrun shares its rendezvous store with the processes by default, and a restarted group then
# reads the addresses of the processes that died (pytorch/pytorch#135712): a fresh store per attempt.
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def launch(command: str, args: Sequence[str], *, nproc: int, max_restarts: int = 0) -> int:
    """Run `featcache COMMAND ARGS` in `nproc` processes under torchrun and wait; torchrun's exit code."""
    if world_size() > 1:
        raise UserError("--nproc starts torchrun, and this process already runs under torchrun; drop --nproc.")
    return subprocess.run(torchrun_command(command, args, nproc=nproc, max_restarts=max_restarts),
                          env={**TORCHRUN_ENV, **os.environ}).returncode


def check_batch_split(*, n_train: int, batch_size: int, world_size: int) -> None:
    """UserError unless every batch of the plan gives rows to each of `world_size` processes.

    The global batch stays --batch-size, so it must split evenly; the last, short batch of an epoch
    is split as evenly as it can be, and needs at least one row per process.
    """
    if world_size <= 1:
        return
    if batch_size % world_size:
        raise UserError(f"--batch-size {batch_size} does not split evenly over {world_size} processes; use a "
                        f"multiple of {world_size} (it stays the global batch, {world_size} parts per step).")
    last = n_train % batch_size
    if 0 < last < world_size:
        raise UserError(f"The last batch of each epoch has {last} of the {n_train} training images, fewer than the "
                        f"{world_size} processes; pick a --batch-size that leaves none or at least {world_size}.")


def check_finetune_launch(config, train, *, nproc: int) -> None:
    """The user errors of `finetune --nproc N` found before torchrun starts: one line, not one per process."""
    from featcache.datasets import resolve_data_root, scan_data
    from featcache.plan import check_config

    check_config(train)
    root = resolve_data_root(config.data.root, cache_dir=config.cache_dir)
    index = scan_data(root, config.data, log=lambda line: None)  # each process warns when it scans
    check_batch_split(n_train=len(index.splits.get("train") or ()), batch_size=train.batch_size, world_size=nproc)
