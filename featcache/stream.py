"""head-train on caches larger than memory: the plan's batches read from the HDF5 file a block at a time.

The training of head.fit_head — the same plan (head init, batch order, lr per epoch), the same step
(head.head_steps), the same epoch records and selection (head.epoch_record, head.finish_fit) — with
the features never all in memory. Epoch e's row order, plan.perms[e], is cut into blocks of R rows
(R a multiple of the batch size, so a block is whole batches); a thread reads block j+1 from the
cache (cache.FeatureReader gathers its rows by file position) while one compiled program runs the
batches of block j, the parameters and optimizer state carried from block to block. The val logits
come at the end of every epoch (val kept in memory when it fits in one block, else read again in
blocks), the test logits once, from the selected epoch's parameters. --standardize takes the train
mean and std in two sequential passes (standardize.blockwise_standardization).

Memory: about BLOCKS_HELD blocks of R x D float32 (the one training, its device copy, the one
waiting, the one being read), plus the labels, the plan's row orders (E x N int64) and the head
of every epoch (E x K x D).

Shapes: N train rows, D feature dim, K logits, S batch size, R rows per block, Bb = R / S batches.
Never imports torch (tests check `sys.modules`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import jax
import numpy as np

from featcache.cache import SPLITS, FeatureReader, non_finite_rows, non_finite_error
from featcache.config import DEFAULT_STREAM_MEMORY_MIB, TrainConfig
from featcache.head import (HeadFit, check_labels, epoch_record, finish_fit, head_steps, linear_from_params,
                            params_from_linear)
from featcache.plan import TrainPlan, check_config, make_plan, num_outputs_for
from featcache.progress import progress_bar
from featcache.standardize import blockwise_standardization

BLOCKS_HELD = 4  # blocks of features alive at once, see the module docstring
IN_MEMORY_COPIES = 3  # in-memory head-train holds the features ~3 times (file dtype, float32/z-scored, JAX's)


def block_rows_for(*, feature_dim: int, batch_size: int, memory_mib: int) -> int:
    """Rows per block: BLOCKS_HELD float32 blocks within memory_mib, a multiple of batch_size, at least one batch."""
    fit = memory_mib * 2**20 // (BLOCKS_HELD * 4 * max(feature_dim, 1))
    return max(batch_size, fit // batch_size * batch_size)


def block_memory_mib(available: int | None) -> int:
    """The default memory for streamed blocks: DEFAULT_STREAM_MEMORY_MIB, or a quarter of the memory
    `available` (bytes, from memory_available; None = unknown) when that is less (at least 16 MiB)."""
    if available is None:
        return DEFAULT_STREAM_MEMORY_MIB
    return max(16, min(DEFAULT_STREAM_MEMORY_MIB, available // 4 // 2**20))


def in_memory_bytes(meta: dict) -> int:
    """About what in-memory head-train needs for a cache: its features as float32, IN_MEMORY_COPIES times."""
    return sum(meta["splits"].values()) * int(meta["feature_dim"]) * 4 * IN_MEMORY_COPIES


def needs_streaming(meta: dict, available: int | None) -> bool:
    """Whether in-memory head-train would not fit in the memory `available` (bytes; None = unknown: no)."""
    return available is not None and in_memory_bytes(meta) > available


@dataclass(frozen=True)
class _Block:
    """Batches of one block, ready for the compiled program."""

    xs: np.ndarray  # (Bb, S, D) float32, z-scored under --standardize; padding rows 0
    ys: np.ndarray  # (Bb, S) int32
    mask: np.ndarray  # (Bb, S) float32: 1 for rows of the plan, 0 for the padding of a short last batch


class _Prefetcher:
    """Makes the blocks of a training in order in one thread, at most one ready ahead of the trainer."""

    def __init__(self, make: Callable[[int, int], _Block], order: list[tuple[int, int]]):
        self.read_s = 0.0  # seconds the thread spent making blocks
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, order), daemon=True,
                                        name="featcache-stream-reader")
        self._thread.start()

    def _run(self, make, order) -> None:
        try:
            for epoch, j in order:
                if self._stop.is_set():
                    return
                t0 = time.perf_counter()
                block = make(epoch, j)
                self.read_s += time.perf_counter() - t0
                self._put(block)
        except BaseException as exc:  # noqa: BLE001 - handed to the trainer, which raises it
            self._put(exc)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> _Block:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()


def fit_streamed(reader: FeatureReader, *, config: TrainConfig, block_rows: int, progress: bool = False,
                 say: Callable[[str], None] = lambda _: None) -> tuple[HeadFit, dict]:
    """Train the linear head on an open cache, reading the train rows block by block in plan order.

    Args:
        reader: the cache, open.
        config: the TrainConfig, as for head.fit_head.
        block_rows: R, rows per block, a multiple of config.batch_size (block_rows_for gives one).
        progress: a progress bar over the blocks of all epochs (interactive stderr only).
        say: where the one-line phase messages go.

    Returns:
        (HeadFit, stream info: block_rows, blocks_per_epoch, rows_read, and whether the file was read
        with os.preadv: "pread"). The HeadFit equals fit_head's on the same cache up to float rounding (the
        same accuracies and selected epoch; losses within 1e-6 in the tests). Timings: load_s (the
        NaN check and --standardize passes), compile_s, train_s (all epochs, reading included),
        read_s (the reader thread's time, overlapped with training), wait_s (training waiting for it).
    """
    check_config(config)
    s = int(config.batch_size)
    if block_rows < s or block_rows % s:
        raise ValueError(f"block_rows {block_rows} is not a positive multiple of the batch size {s}")
    meta = reader.meta
    class_names = [str(c) for c in meta["class_names"]]
    num_classes, dim = len(class_names), reader.feature_dim
    num_outputs = num_outputs_for(num_classes)
    for split in SPLITS:  # a missing split is an empty one
        check_labels(split, reader.labels(split) if split in meta["splits"] else np.zeros(0), num_classes)

    def blocks(split: str) -> Iterator[np.ndarray]:  # the split once, in file order, as float32
        n = reader.rows(split)
        for a in range(0, n, block_rows):
            yield np.asarray(reader.read(split, a, min(a + block_rows, n)), dtype=np.float32)

    bad: dict[str, int] = {}

    def checked(split: str) -> Iterator[np.ndarray]:  # blocks(split), counting the rows with NaN or inf
        bad[split] = 0
        for x in blocks(split):
            bad[split] += non_finite_rows(x)
            yield x

    t0 = time.perf_counter()
    mean = std = None
    if config.standardize:  # its first pass over train is the check's: one sequential read less
        passes = iter([checked("train"), blocks("train")])
        mean, std = blockwise_standardization(lambda: next(passes))
    for split in SPLITS:
        if split not in bad:
            for _ in checked(split):
                pass
        if bad[split]:
            raise non_finite_error(reader.path, split, bad[split], reader.rows(split))

    def prepared(x: np.ndarray) -> np.ndarray:  # the rule of head.prepare_data
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x if mean is None else (x - mean) / std

    load_s = time.perf_counter() - t0
    say(f"Checked {', '.join(f'{reader.rows(sp)} {sp}' for sp in SPLITS)} rows of {dim} {meta['model']} features "
        f"in {load_s:.2f} s{' (and took the train mean/std)' if mean is not None else ''}")

    n_train = reader.rows("train")
    plan = make_plan(n_train=n_train, feature_dim=dim, num_outputs=num_outputs, config=config)
    y_train = reader.labels("train").astype(np.int32)
    per_epoch = math.ceil(n_train / block_rows)
    make_block = _block_maker(reader, plan, y_train, prepared, block_rows)

    steps = head_steps(num_outputs=num_outputs, config=config)
    carry = steps.init(params_from_linear(plan.weight, plan.bias))

    def run_block(carry, xs, ys, mask, lr):  # the batches of one block, as the in-memory scan runs them
        return jax.lax.scan(lambda c, batch: steps.batch(c, *batch, lr), carry, (xs, ys, mask))

    val_rows, y_val = reader.rows("val"), reader.labels("val")
    val_resident = val_rows <= block_rows
    val_chunk = val_rows if val_resident else block_rows
    t1 = time.perf_counter()
    spec = jax.ShapeDtypeStruct
    programs = {}
    for nb in sorted({-(-(min(block_rows, n_train - a)) // s) for a in (0, (per_epoch - 1) * block_rows)}):
        programs[nb] = jax.jit(run_block).lower(
            carry, spec((nb, s, dim), np.float32), spec((nb, s), np.int32), spec((nb, s), np.float32),
            spec((), np.float32)).compile()
    val_logits_of = jax.jit(steps.logits).lower(carry, spec((val_chunk, dim), np.float32)).compile()
    compile_s = time.perf_counter() - t1
    x_val = prepared(reader.read("val", 0, val_rows)) if val_resident else None

    def val_logits(carry) -> np.ndarray:  # (Nv, K)
        if x_val is not None:
            return np.asarray(val_logits_of(carry, x_val))[:, 0]
        parts = []
        for a in range(0, val_rows, val_chunk):
            x = prepared(reader.read("val", a, min(a + val_chunk, val_rows)))
            padded = np.zeros((val_chunk, dim), np.float32)
            padded[:len(x)] = x
            parts.append(np.asarray(val_logits_of(carry, padded))[:len(x), 0])
        return np.concatenate(parts)

    say(f"Streaming {n_train} train rows per epoch in {per_epoch} block(s) of up to {block_rows} rows "
        f"({block_rows * dim * 4 / 2**20:.1f} MiB), read with {'os.preadv' if reader.raw('train') else 'h5py'}")
    history, weights, biases, wait_s = [], [], [], 0.0
    prefetch = _Prefetcher(make_block, [(e, j) for e in range(plan.epochs) for j in range(per_epoch)])
    t2 = time.perf_counter()
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("head-train (streamed)", total=plan.epochs * n_train, info="") if bar else None
            for e in range(plan.epochs):
                t_epoch, lr = time.perf_counter(), np.float32(plan.lrs[e])
                losses, correct = [], []
                for _ in range(per_epoch):
                    t = time.perf_counter()
                    block = prefetch.get()
                    wait_s += time.perf_counter() - t
                    carry, (loss, right) = programs[len(block.xs)](carry, block.xs, block.ys, block.mask, lr)
                    losses.append(loss[:, 0])
                    correct.append(right[:, 0])
                    if bar:
                        bar.update(task, advance=int(block.mask.sum()))
                w, b = linear_from_params(steps.params(carry))
                weights.append(w)
                biases.append(b)
                record = epoch_record(plan, e, batch_loss=np.concatenate([np.asarray(x) for x in losses]),
                                      batch_correct=np.concatenate([np.asarray(x) for x in correct]),
                                      val_logits=val_logits(carry), y_val=y_val, num_classes=num_classes,
                                      seconds=time.perf_counter() - t_epoch)
                history.append(record)
                if bar:
                    bar.update(task, info=f"epoch {e + 1}/{plan.epochs} val acc {record.val_acc:.3f}")
    finally:
        prefetch.close()
    train_s = time.perf_counter() - t2

    test_rows = reader.rows("test")

    def test_logits(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:  # numpy, as fit_from_outputs
        return np.concatenate([prepared(reader.read("test", a, min(a + block_rows, test_rows))) @ weight.T + bias
                               for a in range(0, test_rows, block_rows)])

    timings = {"load_s": load_s, "compile_s": compile_s, "train_s": train_s, "read_s": prefetch.read_s,
               "wait_s": wait_s}
    fit = finish_fit(history, plan=plan, epoch_weights=np.stack(weights), epoch_biases=np.stack(biases),
                     test_logits=test_logits, y_test=reader.labels("test"), class_names=class_names,
                     mean=mean, std=std, timings=timings)
    info = {"block_rows": block_rows, "blocks_per_epoch": per_epoch, "rows_read": plan.epochs * n_train,
            "pread": reader.raw("train")}
    return fit, info


def _block_maker(reader: FeatureReader, plan: TrainPlan, y_train: np.ndarray,
                 prepared: Callable[[np.ndarray], np.ndarray], block_rows: int) -> Callable[[int, int], _Block]:
    """make(epoch, j) -> block j of that epoch's row order: its rows read, prepared and cut into batches."""
    s, dim = plan.batch_size, reader.feature_dim

    def make(epoch: int, j: int) -> _Block:
        rows = plan.perms[epoch][j * block_rows:(j + 1) * block_rows]  # (M,) in plan order
        x = prepared(reader.take("train", rows))
        nb = -(-len(rows) // s)
        pad = nb * s - len(rows)  # only the epoch's short last batch is padded, under mask 0
        if pad:
            x = np.concatenate([x, np.zeros((pad, dim), np.float32)])
        ys = np.concatenate([y_train[rows], np.zeros(pad, np.int32)])
        mask = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
        return _Block(xs=x.reshape(nb, s, dim), ys=ys.reshape(nb, s), mask=mask.reshape(nb, s))

    return make
