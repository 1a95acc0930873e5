"""Run a backbone once over every split of a dataset into the HDF5 cache.

The cache key is computed before torch is imported, so a cache hit costs a directory scan and
one HDF5 open, not a torch start-up. torch and the network are imported only to compute.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from featcache import cache
from featcache.backbones import BACKBONES, describe_weights
from featcache.config import ExtractConfig
from featcache.datasets import DatasetIndex, resolve_data_root, scan_dataset
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


def library_versions() -> dict:
    """Versions recorded in every cache and run (read from package metadata, nothing imported)."""
    versions = {"python": platform.python_version()}
    for pkg in ("featcache", "torch", "torchvision", "numpy", "h5py", "pillow", "jax", "flax", "optax"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


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
    """The complete cache file for `config`, or None if it has not been extracted."""
    plan = plan_extraction(config)
    return plan.path if _is_complete(plan) else None


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
    if _is_complete(plan):
        log(f"cache hit: {plan.path}")
        return plan.path
    with cache.write_lock(plan.path, wait=config.wait):
        if _is_complete(plan):  # written by the process we waited for
            log(f"cache hit: {plan.path}")
            return plan.path
        return _run_extraction(plan, progress=progress, log=log)


def _run_extraction(plan: ExtractPlan, *, progress: bool, log: Log) -> Path:
    # torch is imported here, not at module level: a cache hit must not pay for it.
    import torch

    from featcache.backbones import build_backbone, pick_device
    from featcache.datasets import ImageDataset

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
    writer = cache.CacheWriter(plan.path, meta=meta, feature_dim=backbone.spec.feature_dim,
                               dtype=config.dtype, splits=splits)
    if writer.resumed_rows:
        log(f"resuming {writer.partial.name}: {writer.resumed_rows} rows already written")
    out_dtype = np.dtype(config.dtype)
    num_workers = default_num_workers() if config.num_workers < 0 else config.num_workers
    t0 = time.perf_counter()
    n_done = 0
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
                ImageDataset(plan.index.root, samples, backbone.transform),
                batch_sampler=[rows for _, _, rows in batches],
                num_workers=num_workers if batches else 0, pin_memory=device.type == "cuda",
                persistent_workers=False, worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
            )
            pending_write = None
            for (split, start, _rows), (images, _labels, _index) in zip(batches, loader):
                images = images.to(device, non_blocking=True)
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.inference_mode(), torch.autocast(
                        device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
                    feats = net(images)  # (B, D)
                feats = feats.float().cpu().numpy().astype(out_dtype, copy=False)
                if pending_write is not None:
                    pending_write.result()
                # HDF5 writing overlaps the next batch's decode and forward pass.
                pending_write = pool.submit(writer.write, split, start, feats)
                n_done += len(feats)
                if bar:
                    bar.advance(tasks[split], len(feats))
            if pending_write is not None:
                pending_write.result()
        path = writer.finish()
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    rate = n_done / seconds if seconds > 0 else float("nan")
    size_mb = path.stat().st_size / 1e6
    log(f"{config.model}: {n_done} images in {seconds:.1f} s ({rate:.1f} img/s) -> {path} ({size_mb:.1f} MB)")
    return path


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


def default_num_workers() -> int:
    """Decode workers when --num-workers is not given: half the cores, at most 4 (forward uses the rest).

    None when JAX is loaded in this process (e.g. `featcache demo` after head-train): DataLoader
    workers are forked, and forking a process that runs JAX's threads can deadlock.
    """
    if "jax" in sys.modules:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(0, min(4, cores // 2))


# `featcache.extract(...)` is the Python API function of the same name (see featcache.api).
import sys as _sys  # noqa: E402

from featcache import api as _api  # noqa: E402

_api.make_module_callable(_sys.modules[__name__], _api.extract)
