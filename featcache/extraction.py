"""Run a backbone once over every split of a dataset into the HDF5 cache.

The cache key is computed before torch is imported, so a cache hit costs a directory scan and
one HDF5 open, not a torch start-up. torch and the network are imported only to compute.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featcache import cache, distributed
from featcache.backbones import BACKBONES, describe_weights
from featcache.config import ExtractConfig
from featcache.datasets import DatasetIndex, resolve_data_root, scan_dataset
from featcache.environment import default_num_workers, library_versions
from featcache.errors import UserError
from featcache.progress import progress_bar

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExtractPlan:
    """Everything known about one extraction before any image is decoded."""

    config: ExtractConfig
    index: DatasetIndex
    key: str
    path: Path
    meta: dict


def plan_extraction(config: ExtractConfig) -> ExtractPlan:
    """Scan the dataset and compute the cache key and path of `config` (no torch)."""
    if config.model not in BACKBONES:
        raise UserError(f"Unknown model {config.model!r}; run featcache models to list the choices.")
    if config.dtype not in ("float32", "float16"):
        raise UserError(f"--dtype must be float32 or float16, not {config.dtype!r}.")
    if config.batch_size < 1:
        raise UserError("--batch-size must be at least 1.")
    root = resolve_data_root(config.data.root, cache_dir=config.cache_dir)
    index = scan_dataset(root, val_fraction=config.data.val_fraction,
                         test_fraction=config.data.test_fraction, seed=config.data.split_seed)
    weights_tag, weights_id, transform = describe_weights(
        config.model, weights=config.weights, image_size=config.image_size)
    key = cache.cache_key(
        dataset_fingerprint=index.fingerprint(), class_names=index.class_names,
        split_rule=index.split_rule, model=config.model, weights=weights_tag,
        weights_id=weights_id, transform=transform, dtype=config.dtype,
    )
    short = weights_tag.split(":")[0] if not weights_tag.startswith("file:") else weights_tag.replace(":", "-")
    path = cache.cache_path(config.cache_dir, dataset_name=index.name, model=config.model,
                            weights=short, key=key)
    meta = {
        "key": key, "model": config.model, "weights": weights_tag, "weights_sha256": "",
        "transform": transform, "class_names": list(index.class_names),
        "dataset_root": str(index.root), "dataset_name": index.name,
        "dataset_fingerprint": index.fingerprint(), "split_rule": index.split_rule,
        "versions": library_versions(), "created": "",
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
    rule = meta.get("split_rule") or {}
    # A fraction is None when its split was a folder: it was not used, so 0 stands in for it.
    try:
        index = scan_dataset(root, val_fraction=rule.get("val_fraction") or 0.0,
                             test_fraction=rule.get("test_fraction") or 0.0, seed=rule.get("seed") or 0)
        return index.fingerprint() != meta.get("dataset_fingerprint")
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
        return distributed.extract(plan, progress=progress, log=log)
    if _is_complete(plan):
        return _cache_hit(plan, log=log)
    with cache.write_lock(plan.path, wait=config.wait):
        if _is_complete(plan):  # written by the process we waited for
            return _cache_hit(plan, log=log)
        return _run_extraction(plan, progress=progress, log=log)


def _cache_hit(plan: ExtractPlan, *, log: Log) -> Path:
    log(f"cache hit: {plan.path}")
    skipped = cache.read_meta(plan.path).get("skipped") or []
    if skipped:
        _, path, reason = skipped[0]
        if plan.config.data.strict:
            raise _strict_error(plan.index.root / path, reason)
        log(_skipped_line(len(skipped), cache.failures_path(plan.path)))
    return plan.path


def _skipped_line(count: int, csv_path: Path) -> str:
    return f"{count} unreadable image{'s' if count != 1 else ''} skipped (not in the cache), listed in {csv_path}"


def _strict_error(path: Path, reason: str) -> UserError:
    return UserError(f"Cannot read image {path} ({reason}); replace or delete it, or drop --strict to skip "
                     "unreadable images and list them in failures.csv.")


def _run_extraction(plan: ExtractPlan, *, progress: bool, log: Log,
                    open_writer: Callable[..., cache.CacheWriter] = cache.CacheWriter) -> Path:
    """Compute the pending rows and put the cache in place; open_writer: CacheWriter, or a shard's writer."""
    # torch is imported here, not at module level: a cache hit must not pay for it.
    import torch

    from featcache.backbones import build_backbone, pick_device
    from featcache.datasets import ImageDataset, SkipUnreadable, collate_readable

    config = plan.config
    device = pick_device(config.device)
    backbone = build_backbone(config.model, weights=config.weights, image_size=config.image_size)
    if backbone.transform_desc != plan.meta["transform"]:
        raise RuntimeError(f"transform of {config.model} differs from its description: "
                           f"{backbone.transform_desc} != {plan.meta['transform']}")
    net = backbone.net.to(device).eval()
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    meta = dict(plan.meta, weights_sha256=backbone.weights_sha256)
    splits = {
        s: cache.SplitRows(labels=np.array([x.label for x in samples], dtype=np.int64),
                           paths=[x.path for x in samples])
        for s, samples in plan.index.splits.items()
    }
    writer = open_writer(plan.path, meta=meta, feature_dim=backbone.spec.feature_dim,
                         dtype=config.dtype, splits=splits)
    if writer.resumed_rows:
        log(f"resuming {writer.partial.name}: {writer.resumed_rows} rows already written")
    out_dtype = np.dtype(config.dtype)
    num_workers = default_num_workers() if config.num_workers < 0 else config.num_workers
    t0 = time.perf_counter()
    n_done = 0
    reasons: dict[tuple[str, int], str] = {}  # (split, row) -> why its image could not be read (this run)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, progress_bar(progress) as bar:
            # One loader over every split, so the decode workers start once and have the next batch
            # ready across split boundaries. batches[i] = (split, first row in split, global rows).
            samples: list = []
            batches: list[tuple[str, int, range]] = []
            tasks = {}
            for split, split_samples in plan.index.splits.items():
                pending = writer.pending(split, config.batch_size)
                n_todo = sum(b - a for a, b in pending)
                tasks[split] = bar.add_task(f"{config.model} {split}", total=n_todo, info="") if bar else None
                batches += [(split, a, range(len(samples) + a, len(samples) + b)) for a, b in pending]
                samples += split_samples
            loader = torch.utils.data.DataLoader(
                SkipUnreadable(ImageDataset(plan.index.root, samples, backbone.transform)),
                batch_sampler=[rows for _, _, rows in batches], collate_fn=collate_readable,
                num_workers=num_workers if batches else 0, pin_memory=device.type == "cuda",
                persistent_workers=False, worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
            )
            pending_write = None
            for (split, start, rows), (batch, _index, failures) in zip(batches, loader):
                failed = [start + i - rows.start for i, _ in failures]  # rows of `split`
                for row, (i, reason) in zip(failed, failures):
                    if config.data.strict:
                        raise _strict_error(plan.index.root / samples[i].path, reason)
                    reasons[split, row] = reason
                if batch is None:  # no readable image in this batch
                    feats = np.zeros((0, backbone.spec.feature_dim), out_dtype)
                else:
                    images = batch[0].to(device, non_blocking=True)
                    if device.type == "cuda":
                        images = images.contiguous(memory_format=torch.channels_last)
                    with torch.inference_mode(), torch.autocast(
                            device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
                        feats = net(images)  # (B', D): the readable images of the batch
                    feats = feats.float().cpu().numpy().astype(out_dtype, copy=False)
                if pending_write is not None:
                    pending_write.result()
                # HDF5 writing overlaps the next batch's decode and forward pass.
                pending_write = pool.submit(writer.write, split, start, feats, failed=failed)
                n_done += len(feats)
                if bar:
                    bar.advance(tasks[split], len(rows))
            if pending_write is not None:
                pending_write.result()
        skipped = _skipped_rows(plan, writer, reasons)
        if skipped:  # before the cache is in place: a complete cache always has its list beside it
            from featcache.datasets import failures_csv
            from featcache.files import atomic_write_bytes

            atomic_write_bytes(cache.failures_path(plan.path), failures_csv(skipped).encode())
        path = writer.finish(skipped=skipped)
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    rate = n_done / seconds if seconds > 0 else float("nan")
    size_mb = path.stat().st_size / 1e6
    log(f"{config.model}: {n_done} images in {seconds:.1f} s ({rate:.1f} img/s) -> {path} ({size_mb:.1f} MB)")
    if skipped:
        log(_skipped_line(len(skipped), cache.failures_path(path)))
    return path


def _skipped_rows(plan: ExtractPlan, writer: cache.CacheWriter,
                  reasons: dict[tuple[str, int], str]) -> list[tuple[str, str, str]]:
    """(split, path, reason) of every row committed as unreadable, by this run or by the run it resumes."""
    from featcache.datasets import ImageLoadError, load_image

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
