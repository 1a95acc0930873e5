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
from featcache.head import (HeadFit, HeadSteps, epoch_record, finish_fit, head_steps, linear_from_params,
                            params_from_linear)
from featcache.metrics import EpochRecord
from featcache.plan import TrainPlan, check_config, class_weights, make_plan, num_outputs_for
from featcache.progress import progress_bar
from featcache.standardize import as_features, blockwise_standardization, check_labels

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
    s, dim = int(config.batch_size), reader.feature_dim
    class_names = _checked_labels(reader, block_rows=block_rows, batch_size=s)
    n_train = reader.rows("train")
    mean, std, load_s = _checked_standardization(reader, block_rows=block_rows, standardize=config.standardize)
    say(f"Checked {', '.join(f'{reader.rows(sp)} {sp}' for sp in SPLITS)} rows of {dim} {reader.meta['model']} "
        f"features in {load_s:.2f} s{' (and took the train mean/std)' if mean is not None else ''}")
    prepared = _preparer(mean, std)

    num_outputs = num_outputs_for(len(class_names))
    plan = make_plan(n_train=n_train, feature_dim=dim, num_outputs=num_outputs, config=config)
    steps = head_steps(num_outputs=num_outputs, config=config, class_weights=class_weights(
        labels=reader.labels("train"), num_classes=len(class_names), spec=config.class_weight))
    carry = steps.init(params_from_linear(plan.weight, plan.bias))
    t1 = time.perf_counter()
    programs, val_program = _compile(steps, carry, n_train=n_train, block_rows=block_rows, batch_size=s, dim=dim,
                                     val_rows=min(reader.rows("val"), block_rows))
    compile_s = time.perf_counter() - t1
    val_logits = _val_scorer(reader, val_program, prepared=prepared, block_rows=block_rows)

    per_epoch = math.ceil(n_train / block_rows)
    say(f"Streaming {n_train} train rows per epoch in {per_epoch} block(s) of up to {block_rows} rows "
        f"({block_rows * dim * 4 / 2**20:.1f} MiB), read with {'os.preadv' if reader.raw('train') else 'h5py'}")
    blocks = _Prefetcher(_block_maker(reader, plan, reader.labels("train").astype(np.int32), prepared, block_rows),
                         [(e, j) for e in range(plan.epochs) for j in range(per_epoch)])
    t2 = time.perf_counter()
    try:
        history, weights, biases, wait_s = _train_epochs(
            carry, steps=steps, programs=programs, plan=plan, blocks=blocks, per_epoch=per_epoch,
            val_logits=val_logits, y_val=reader.labels("val"), num_classes=len(class_names), progress=progress)
    finally:
        blocks.close()
    train_s = time.perf_counter() - t2

    timings = {"load_s": load_s, "compile_s": compile_s, "train_s": train_s, "read_s": blocks.read_s,
               "wait_s": wait_s}
    fit = finish_fit(history, plan=plan, epoch_weights=weights, epoch_biases=biases,
                     test_logits=_test_scorer(reader, prepared=prepared, block_rows=block_rows),
                     y_test=reader.labels("test"), class_names=class_names, mean=mean, std=std, timings=timings)
    info = {"block_rows": block_rows, "blocks_per_epoch": per_epoch, "rows_read": plan.epochs * n_train,
            "pread": reader.raw("train")}
    return fit, info


def _checked_labels(reader: FeatureReader, *, block_rows: int, batch_size: int) -> list[str]:
    """The class names, once every split's labels are checked (standardize.check_labels) and block_rows is a
    positive multiple of the batch size."""
    if block_rows < batch_size or block_rows % batch_size:
        raise ValueError(f"block_rows {block_rows} is not a positive multiple of the batch size {batch_size}")
    class_names = [str(c) for c in reader.meta["class_names"]]
    for split in SPLITS:  # a missing split is an empty one
        labels = reader.labels(split) if split in reader.meta["splits"] else np.zeros(0)
        check_labels(split, labels, len(class_names))
    return class_names


def _checked_standardization(reader: FeatureReader, *, block_rows: int, standardize: bool
                             ) -> tuple[np.ndarray | None, np.ndarray | None, float]:
    """Refuse a cache with NaN or inf features (every split read once in file order, block by block) and take
    the train mean (D,) and std (D,) under standardize, else None and None; then the seconds it took. The
    standardization's first pass over train is the check's: one sequential read less."""
    t0 = time.perf_counter()

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

    mean = std = None
    if standardize:
        passes = iter([checked("train"), blocks("train")])
        mean, std = blockwise_standardization(lambda: next(passes))
    for split in SPLITS:
        if split not in bad:
            for _ in checked(split):
                pass
        if bad[split]:
            raise non_finite_error(reader.path, split, bad[split], reader.rows(split))
    return mean, std, time.perf_counter() - t0


def _preparer(mean: np.ndarray | None, std: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
    """x (M, D) -> float32, z-scored with mean/std when given: the rule of standardize.prepare_splits."""
    def prepared(x: np.ndarray) -> np.ndarray:
        x = as_features(x)
        return x if mean is None else (x - mean) / std

    return prepared


def _test_scorer(reader: FeatureReader, *, prepared: Callable[[np.ndarray], np.ndarray], block_rows: int
                 ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """(weight (K, D), bias (K,)) -> test logits (Nt, K), the test split read in blocks (numpy, as
    head.fit_from_outputs)."""
    def test_logits(weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        rows = reader.rows("test")
        return np.concatenate([prepared(reader.read("test", a, min(a + block_rows, rows))) @ weight.T + bias
                               for a in range(0, rows, block_rows)])

    return test_logits


def _compile(steps: HeadSteps, carry, *, n_train: int, block_rows: int, batch_size: int, dim: int,
             val_rows: int) -> tuple[dict[int, Callable], Callable]:
    """The compiled programs: {Bb: the batches of one block of Bb batches} (a full block and the epoch's last,
    shorter one) and the val logits of val_rows rows (M, D) -> (M, 1, K)."""
    s = batch_size

    def run_block(carry, xs, ys, mask, lr):  # the batches of one block, as the in-memory scan runs them
        return jax.lax.scan(lambda c, batch: steps.batch(c, *batch, lr), carry, (xs, ys, mask))

    spec = jax.ShapeDtypeStruct
    last = (math.ceil(n_train / block_rows) - 1) * block_rows  # first row of the epoch's last block
    programs = {}
    for nb in sorted({-(-(min(block_rows, n_train - a)) // s) for a in (0, last)}):
        programs[nb] = jax.jit(run_block).lower(
            carry, spec((nb, s, dim), np.float32), spec((nb, s), np.int32), spec((nb, s), np.float32),
            spec((), np.float32)).compile()
    val_program = jax.jit(steps.logits).lower(carry, spec((val_rows, dim), np.float32)).compile()
    return programs, val_program


def _val_scorer(reader: FeatureReader, val_program: Callable, *, prepared: Callable[[np.ndarray], np.ndarray],
                block_rows: int) -> Callable:
    """carry -> val logits (Nv, K): val kept in memory when it fits in one block, else read again in blocks of
    block_rows (the last one padded to the compiled size)."""
    val_rows, dim = reader.rows("val"), reader.feature_dim
    chunk = min(val_rows, block_rows)
    x_val = prepared(reader.read("val", 0, val_rows)) if val_rows <= block_rows else None

    def val_logits(carry) -> np.ndarray:  # (Nv, K)
        if x_val is not None:
            return np.asarray(val_program(carry, x_val))[:, 0]
        parts = []
        for a in range(0, val_rows, chunk):
            x = prepared(reader.read("val", a, min(a + chunk, val_rows)))
            padded = np.zeros((chunk, dim), np.float32)
            padded[:len(x)] = x
            parts.append(np.asarray(val_program(carry, padded))[:len(x), 0])
        return np.concatenate(parts)

    return val_logits


def _train_epochs(carry, *, steps: HeadSteps, programs: dict[int, Callable], plan: TrainPlan, blocks: _Prefetcher,
                  per_epoch: int, val_logits: Callable, y_val: np.ndarray, num_classes: int, progress: bool
                  ) -> tuple[list[EpochRecord], np.ndarray, np.ndarray, float]:
    """Run every epoch on the prefetched blocks: (history, head weights (E, K, D) and biases (E, K) at the end of
    each epoch, seconds spent waiting for blocks)."""
    history, weights, biases, wait_s = [], [], [], 0.0
    with progress_bar(progress) as bar:
        task = bar.add_task("head-train (streamed)", total=plan.epochs * plan.n_train, info="") if bar else None
        for e in range(plan.epochs):
            t_epoch, lr = time.perf_counter(), np.float32(plan.lrs[e])
            losses, correct = [], []
            for _ in range(per_epoch):
                t = time.perf_counter()
                block = blocks.get()
                wait_s += time.perf_counter() - t
                carry, (loss, right) = programs[len(block.xs)](carry, block.xs, block.ys, block.mask, lr)
                losses.append(loss[:, 0])
                correct.append(right[:, 0])
                if bar:
                    bar.update(task, advance=int(block.mask.sum()))
            w, b = linear_from_params(steps.params(carry))
            weights.append(w)
            biases.append(b)
            history.append(epoch_record(plan, e, batch_loss=np.concatenate([np.asarray(x) for x in losses]),
                                        batch_correct=np.concatenate([np.asarray(x) for x in correct]),
                                        val_logits=val_logits(carry), y_val=y_val, num_classes=num_classes,
                                        seconds=time.perf_counter() - t_epoch))
            if bar:
                bar.update(task, info=f"epoch {e + 1}/{plan.epochs} val acc {history[-1].val_acc:.3f}")
    return history, np.stack(weights), np.stack(biases), wait_s


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
