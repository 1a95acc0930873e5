"""Run a backbone once over every split of a dataset into the HDF5 cache, in one process or sharded.

The cache key is computed before torch is imported, so a cache hit costs a directory scan and
one HDF5 open, not a torch start-up. torch and the network are imported only to compute.

Under torchrun (featcache.distributed gives the process group) each rank extracts its shard of the
one-process batch grid (cache.shard_batches: batch b, counted across the splits, goes to rank b % N)
into its own shard file (cache.ShardWriter). After a barrier rank 0 copies the shards into the one
cache file (cache.merge_shards): same key, same rows in the same order, the same features, since
every batch holds the images it holds in one process. Rank 0 holds the cache's writer lock
throughout; a re-run resumes every shard where it stopped.

The finished cache records the run that computed it in its attribute `extraction` (Measurement).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from featcache import cache, distributed, precision
from featcache.backbones import check_model, describe_weights, key_transform_is_deferred
from featcache.config import ExtractConfig
from featcache.datasets import (DatasetIndex, ImageDataset, ImageLoadError, SkipUnreadable, collate_readable,
                                load_image, rescan, resolve_data_root, scan_data, skipped_images_line, strict_error,
                                write_failures_csv)
from featcache.environment import default_num_workers, library_versions, worker_context
from featcache.errors import LockedError, UserError
from featcache.progress import progress_bar

Log = Callable[[str], None]
NOT_IN_CACHE = "not in the cache"  # what skipping an image means for extract (skipped_images_line's note)


@dataclass(frozen=True)
class ExtractPlan:
    """Everything known about one extraction before any image is decoded."""

    config: ExtractConfig
    index: DatasetIndex
    key: str
    path: Path
    meta: dict


@dataclass(frozen=True)
class Measurement:
    """What one extraction run measured; stored in the finished cache as the JSON attribute `extraction`."""

    images: int  # images through the backbone in this run (a resumed run counts only the rows it computed)
    seconds: float  # from the first batch until every row is written (sharded: earliest rank start to merged)
    device: str
    batch_size: int
    num_workers: int  # decode workers of each process
    processes: int = 1  # torchrun processes whose shards were merged
    precision: str = "fp32"  # the forward's arithmetic (featcache.precision.resolve)
    first_batch_at: float | None = None  # wall clock (time.time()) when the first batch reached the network
    last_batch_at: float | None = None  # wall clock when the last batch was written: the process's fixed cost is
    # the time before first_batch_at and after last_batch_at (featcache bench shows both)

    def attribute(self) -> dict:
        """The attribute `extraction`: images, seconds, images_per_s, device, batch_size, num_workers, processes,
        precision, first_batch_at, last_batch_at."""
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return {"images": self.images, "seconds": self.seconds, "images_per_s": rate, "device": self.device,
                "batch_size": self.batch_size, "num_workers": self.num_workers, "processes": self.processes,
                "precision": self.precision, "first_batch_at": self.first_batch_at,
                "last_batch_at": self.last_batch_at}

    @classmethod
    def from_attribute(cls, attribute: Mapping) -> "Measurement":
        """The Measurement an attribute `extraction` was made from."""
        return cls(**{name: value for name, value in attribute.items() if name != "images_per_s"})


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Scan the dataset and compute the cache key and path of `config` (no torch)."""
    check_model(config.model)  # UserError for a model no source builds
    if config.dtype not in ("float32", "float16"):
        raise UserError(f"--dtype must be float32 or float16, not {config.dtype!r}.")
    if config.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    # in the key: auto differs by machine; --amp (older) is bf16 on CUDA
    arithmetic = precision.resolve(config.precision, config.device,
                                   amp=config.amp and config.device.startswith("cuda"))
    root = resolve_data_root(config.data.root, cache_dir=config.cache_dir)
    index = scan_data(root, config.data)
    fingerprint = index.fingerprint(content=config.data.verify_content)  # a stat (or a read) of every image: once
    weights_tag, weights_id, transform = describe_weights(
        config.model, weights=config.weights, image_size=config.image_size)
    key = cache.cache_key(
        dataset_fingerprint=fingerprint, class_names=index.class_names,
        split_rule=index.split_rule, model=config.model, weights=weights_tag,
        weights_id=weights_id, transform=transform, dtype=config.dtype,
        precision=arithmetic,
    )
    short = weights_tag.split(":")[0] if not weights_tag.startswith("file:") else weights_tag.replace(":", "-")
    path = cache.cache_path(config.cache_dir, dataset_name=index.name, model=config.model,
                            weights=short, key=key)
    meta = {
        "key": key, "model": config.model, "weights": weights_tag, "weights_sha256": "",
        "transform": transform, "class_names": list(index.class_names),
        "dataset_root": str(index.root), "dataset_name": index.name,
        "dataset_fingerprint": fingerprint, "split_rule": index.split_rule,
        "versions": library_versions(), "created": "",
        "key_mode": "content" if config.data.verify_content else "stat",
        "precision": arithmetic,
    }
    return ExtractPlan(config=config, index=index, key=key, path=path, meta=meta)


def find_cache(config: ExtractConfig) -> Path | None:
    """The complete cache file for `config`, or None if it has not been extracted (or only in part).

    Raises LockedError while another process is extracting it: a reader never waits on a partial file.
    """
    plan = plan_extraction(config)
    if _is_complete(plan):
        return plan.path
    if cache.lock_holder(plan.path) is not None:
        raise cache.missing_cache_error(plan.path)
    return None


def dataset_changed(meta: dict) -> bool | None:
    """Has the dataset of a cache changed since extraction (files added, removed or edited; split rule)?

    Rescans `meta["dataset_root"]` with the stored split rule and compares fingerprints (a walk and a
    stat per file, no image opened). None when that folder no longer exists: nothing to compare.
    """
    root = Path(meta.get("dataset_root") or "")
    if not meta.get("dataset_root") or not root.is_dir():
        return None
    try:
        index = rescan(root, meta.get("split_rule") or {})
        return index.fingerprint(content=meta.get("key_mode") == "content") != meta.get("dataset_fingerprint")
    except UserError:  # no longer a valid dataset at all
        return True


def _is_complete(plan: ExtractPlan) -> bool:
    if not plan.path.is_file():
        return False
    try:
        return cache.read_meta(plan.path)["key"] == plan.key
    except UserError:
        return False


def extract(config: ExtractConfig, *, progress: bool = True, log: Log = print) -> Path:
    """Extract (or find) the cache of one backbone over one dataset.

    Args:
        config: what to extract (model, data, weights, transform, dtype, device, ...).
        progress: show a progress bar per split.
        log: where the one-line messages go.

    Returns:
        The path of the complete cache file.
    """
    plan = plan_extraction(config)
    if distributed.world_size() > 1:  # under torchrun: one shard per process, merged by rank 0
        return _extract_sharded(plan, progress=progress, log=log)
    if _is_complete(plan):
        if _leftovers(plan.path):
            with contextlib.suppress(UserError), cache.write_lock(plan.path):  # held: leave them to the holder
                _remove_leftovers(plan.path)
        return _cache_hit(plan, log=log)
    with cache.write_lock(plan.path, wait=config.wait):
        if _is_complete(plan):  # written by the process we waited for
            _remove_leftovers(plan.path)
            return _cache_hit(plan, log=log)
        return _run_extraction(plan, progress=progress, log=log)


def _leftovers(final: Path) -> list[Path]:
    """The partial files of a complete cache that a kill right after its final rename left behind."""
    return [p for p in (cache.partial_path(final), cache.compact_path(final)) if p.is_symlink() or p.exists()]


def _remove_leftovers(final: Path) -> None:
    """Remove _leftovers(final); call it holding the writer lock, with `final` complete."""
    for p in _leftovers(final):
        p.unlink(missing_ok=True)


def _cache_hit(plan: ExtractPlan, *, log: Log) -> Path:
    log(f"cache hit: {plan.path}")
    skipped = cache.read_meta(plan.path).get("skipped") or []
    if skipped:
        _, path, reason = skipped[0]
        if plan.config.data.strict:
            raise strict_error(plan.index.root / path, reason)
        log(skipped_images_line(len(skipped), cache.failures_path(plan.path), note=NOT_IN_CACHE))
    return plan.path


# --------------------------------------------------------------------------- one process (or one shard)


def _run_extraction(plan: ExtractPlan, *, progress: bool, log: Log,
                    open_writer: Callable[..., cache.CacheWriter] = cache.CacheWriter) -> Path:
    """Compute the pending rows and put the cache in place; open_writer: CacheWriter, or a shard's writer."""
    # torch is imported here, not at module level: a cache hit must not pay for it.
    from featcache.backbones import build_backbone, pick_device

    config = plan.config
    device = pick_device(config.device)
    backbone = build_backbone(config.model, weights=config.weights, image_size=config.image_size)
    for note in backbone.notes:
        log(note)
    meta = dict(plan.meta, weights_sha256=backbone.weights_sha256)
    if key_transform_is_deferred(plan.meta["transform"]):  # timm: the key names it, the cache stores it resolved
        meta["transform"] = backbone.transform_desc
    elif backbone.transform_desc != plan.meta["transform"]:
        raise RuntimeError(f"transform of {config.model} differs from its description: "
                           f"{backbone.transform_desc} != {plan.meta['transform']}")
    net = precision.prepare(backbone.net, device, plan.meta["precision"])
    splits = {
        s: cache.SplitRows(labels=np.array([x.label for x in samples], dtype=np.int64),
                           paths=[x.path for x in samples])
        for s, samples in plan.index.splits.items()
    }
    writer = open_writer(plan.path, meta=meta,
                         feature_dim=backbone.spec.feature_dim, dtype=config.dtype, splits=splits)
    if writer.resumed_rows:
        log(f"resuming {writer.partial.name}: {writer.resumed_rows} rows already written")
    num_workers = default_num_workers() if config.num_workers < 0 else config.num_workers
    t0 = time.perf_counter()
    try:
        if config.data.strict:  # rows an interrupted run committed as unreadable fail --strict as well
            _refuse_failed_rows(plan, writer)
        n_done, reasons, first_at = _compute(plan, writer, net=net, backbone=backbone, device=device,
                                             num_workers=num_workers, progress=progress)
        measured = Measurement(images=n_done, seconds=time.perf_counter() - t0, device=str(device),
                               batch_size=config.batch_size, num_workers=num_workers,
                               precision=plan.meta["precision"], first_batch_at=first_at, last_batch_at=time.time())
        skipped = _skipped_rows(plan, writer, reasons)
        if skipped:  # before the cache is in place: a complete cache always has its list beside it
            write_failures_csv(cache.failures_path(plan.path), skipped)
        path = writer.finish(skipped=skipped, extraction=measured.attribute())
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    rate = n_done / seconds if seconds > 0 else float("nan")
    size_mb = path.stat().st_size / 1e6
    log(f"{config.model}: {n_done} images in {seconds:.1f} s ({rate:.1f} img/s) -> {path} ({size_mb:.1f} MB)")
    if skipped:
        log(skipped_images_line(len(skipped), cache.failures_path(path), note=NOT_IN_CACHE))
    return path


@dataclass(frozen=True)
class _Batch:
    """One batch of the loader: `rows` of the concatenated splits, the first of them row `start` of `split`."""

    split: str
    start: int
    rows: range


def _compute(plan: ExtractPlan, writer, *, net, backbone, device, num_workers: int,
             progress: bool) -> tuple[int, dict[tuple[str, int], str], float | None]:
    """Run `net` over the writer's pending batches and commit each; (images computed, reasons, first batch at).

    reasons: (split, row) -> why its image could not be read, for the rows found unreadable in this run;
    first batch at: the wall clock when the first batch came out of the loader (None: no batch to compute).
    """
    import torch

    config = plan.config
    n_done, reasons, first_at = 0, {}, None
    with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(progress) as bar:
        samples, batches, tasks = _pending_batches(plan, writer, bar)
        # One loader over every split, so the decode workers start once and have the next batch
        # ready across split boundaries.
        context = worker_context(num_workers if batches else 0)
        loader = torch.utils.data.DataLoader(
            SkipUnreadable(ImageDataset(plan.index.root, samples, backbone.transform)),
            batch_sampler=[b.rows for b in batches], collate_fn=collate_readable,
            num_workers=num_workers if batches else 0, pin_memory=device.type == "cuda",
            persistent_workers=False, multiprocessing_context=context,
            # a forked worker dies with this process; a fork server's are not its children (and hold nothing of it)
            worker_init_fn=None if context else functools.partial(_die_with_parent, os.getpid()),
        )
        pending_write = None
        for b, (batch, _index, failures) in zip(batches, loader):
            first_at = first_at or time.time()
            failed = [b.start + i - b.rows.start for i, _ in failures]  # rows of `b.split`
            for row, (i, reason) in zip(failed, failures):
                if config.data.strict:
                    raise strict_error(plan.index.root / samples[i].path, reason)
                reasons[b.split, row] = reason
            feats = _forward(net, batch, device=device, arithmetic=plan.meta["precision"],
                             dtype=np.dtype(config.dtype), feature_dim=backbone.spec.feature_dim)  # (B', D): the readable images of the batch
            if pending_write is not None:
                pending_write.result()
            # HDF5 writing overlaps the next batch's decode and forward pass.
            pending_write = pool.submit(writer.write, b.split, b.start, feats, failed=failed)
            n_done += len(feats)
            if bar:
                bar.advance(tasks[b.split], len(b.rows))
        if pending_write is not None:
            pending_write.result()
    return n_done, reasons, first_at


def _pending_batches(plan: ExtractPlan, writer, bar) -> tuple[list, list[_Batch], dict]:
    """(samples of every split in order, the batches still to compute, a progress task per split)."""
    samples: list = []
    batches: list[_Batch] = []
    tasks = {}
    for split, split_samples in plan.index.splits.items():
        pending = writer.pending(split, plan.config.batch_size)
        n_todo = sum(b - a for a, b in pending)
        tasks[split] = bar.add_task(f"{plan.config.model} {split}", total=n_todo, info="") if bar else None
        batches += [_Batch(split, a, range(len(samples) + a, len(samples) + b)) for a, b in pending]
        samples += split_samples
    return samples, batches, tasks


def _forward(net, batch, *, device, arithmetic: str, dtype: np.dtype, feature_dim: int) -> np.ndarray:
    """(B', D) features in `dtype` of a collated batch of readable images ((0, D) when it has none).

    arithmetic: the resolved precision; precision.features is also the classic frozen loop's forward.
    """
    if batch is None:  # no readable image in this batch
        return np.zeros((0, feature_dim), dtype)
    feats = precision.features(net, batch[0], device=device, precision=arithmetic)  # (B', D) float32
    return feats.cpu().numpy().astype(dtype, copy=False)


def _refuse_failed_rows(plan: ExtractPlan, writer: cache.CacheWriter) -> None:
    """strict_error for the first row an earlier, interrupted run committed as unreadable (if any)."""
    for _, row_path, reason in _skipped_rows(plan, writer, {}):
        raise strict_error(plan.index.root / row_path, reason)


def _skipped_rows(plan: ExtractPlan, writer: cache.CacheWriter,
                  reasons: dict[tuple[str, int], str]) -> list[tuple[str, str, str]]:
    """(split, path, reason) of every row committed as unreadable, by this run or by the run it resumes."""
    out = []
    for split, samples in plan.index.splits.items():
        for row in writer.failed_rows(split):
            path = samples[row].path
            reason = reasons.get((split, int(row)))
            if reason is None:  # found by an interrupted earlier run: ask the file again for its reason
                try:
                    load_image(plan.index.root / path)
                    reason = "unreadable when an earlier, interrupted run read it"
                except ImageLoadError as exc:
                    reason = exc.reason
            out.append((split, path, reason))
    return out


def _die_with_parent(parent_pid: int, _worker_id: int) -> None:
    """DataLoader worker init: die with the extracting process (Linux).

    A forked worker shares the cache lock and the HDF5 file of its parent; orphaned by a SIGKILL it
    would keep them for ~5 s (torch's watchdog interval) and an immediate re-run would be refused.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


# --------------------------------------------------------------------------- torchrun: shards, merged by rank 0


def _extract_sharded(plan: ExtractPlan, *, progress: bool, log: Log) -> Path:
    """`featcache extract` in one process of a torchrun group: its shard, then rank 0 merges.

    Args:
        plan: the ExtractPlan of this process (every rank must compute the same key).
        progress: rank 0 shows its progress bar.
        log: one-line messages, prefixed with the rank.

    Returns:
        The path of the complete cache file, on every rank.
    """
    config = plan.config
    group = distributed.join(cuda=False)  # the shards meet on disk: gloo's small CPU collectives are all this needs
    say = distributed.with_rank(log, group)
    if config.device != "cpu":
        import torch

        if torch.cuda.is_available():
            distributed.take_own_gpu(group.local_rank)
    group.require_same(plan.key, "The processes of this torchrun group see different data or options (their "
                       f"cache keys differ); {distributed.SAME_DATA}")
    with contextlib.ExitStack() as stack:
        state = None
        if group.is_main:
            try:
                stack.enter_context(cache.write_lock(plan.path, wait=config.wait))
                state = "hit" if _is_complete(plan) else "extract"
            except LockedError as exc:
                state = str(exc)
            if state == "extract":
                _remove_other_shards(plan.path, world_size=group.world_size, batch_size=config.batch_size, log=say)
        state = group.broadcast(state)
        if state == "hit":
            return _cache_hit(plan, log=say)
        if state != "extract":
            raise LockedError(state)
        writer = functools.partial(_GroupShardWriter, group=group, batch_size=config.batch_size, log=say)
        return _run_extraction(plan, progress=progress and group.is_main, log=say, open_writer=writer)


def _remove_other_shards(final: Path, *, world_size: int, batch_size: int, log: Log) -> None:
    """Delete shard files of an earlier run with another number of processes or batch size: not resumable."""
    ours = {cache.shard_path(final, rank=r, world_size=world_size, batch_size=batch_size) for r in range(world_size)}
    ours |= {cache.partial_path(p) for p in ours}
    stale = [p for p in cache.shard_files(final) if p not in ours]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log(f"removed {len(stale)} shard file(s) of an earlier run with another --nproc or --batch-size")


class _GroupShardWriter(cache.ShardWriter):
    """This rank's shard; finish() waits for every shard, rank 0 merges them, and every rank gets the cache."""

    def __init__(self, final: Path, *, group: distributed.Solo, batch_size: int, log: Log, meta,
                 feature_dim: int, dtype: str, splits):
        super().__init__(final, rank=group.rank, world_size=group.world_size, batch_size=batch_size, meta=meta,
                         feature_dim=feature_dim, dtype=dtype, splits=splits)
        self._group, self._log = group, log
        self._cache = dict(meta=meta, feature_dim=feature_dim, dtype=dtype, splits=splits)
        self._started = time.time()  # wall clock: the ranks' clocks are compared (one machine, or NTP)

    def finish(self, *, skipped: Sequence[tuple[str, str, str]] = (), extraction: Mapping) -> Path:
        super().finish(skipped=skipped, extraction=extraction)
        self._group.barrier()  # every shard is complete
        runs = self._group.all_gather((self._started, extraction["images"]))  # (wall-clock start, images) per rank
        if self._group.is_main:
            shards = [cache.shard_path(self.final, rank=r, world_size=self._group.world_size,
                                       batch_size=self.batch_size) for r in range(self._group.world_size)]
            every_skipped = cache.shards_skipped(shards, self._cache["splits"])
            if every_skipped:  # beside the cache before it is in place, as one process does it
                write_failures_csv(cache.failures_path(self.final), every_skipped)

            def merged() -> dict:  # the group's run: every rank's images, from the earliest start until merged
                return replace(Measurement.from_attribute(extraction), images=sum(n for _, n in runs),
                                           seconds=time.time() - min(t for t, _ in runs),
                                           processes=self._group.world_size).attribute()

            t0 = time.perf_counter()
            cache.merge_shards(self.final, shards=shards, skipped=every_skipped, extraction=merged, **self._cache)
            self._log(f"merged {len(shards)} shards into {self.final.name} in {time.perf_counter() - t0:.1f} s")
        self._group.barrier()  # the cache is in place
        return self.final
