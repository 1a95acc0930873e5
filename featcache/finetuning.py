"""PyTorch training loops: full fine-tuning, and the classic frozen-backbone loop.

Both follow the same `TrainPlan` as head-train (head init, batch order, lr per epoch) and take
every number from `metrics.py`, so `finetune --freeze-backbone` reports what `extract` +
`head-train` report for the same seed. The frozen loop is the slow baseline the cache replaces:
it pushes every image through the backbone again in every epoch (in eval mode, so BatchNorm
statistics never drift).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import types
import typing
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from featcache import distributed, metrics, plots, precision, runs
from featcache.backbones import (Backbone, build_backbone, check_finetunable, make_finetune_net, make_train_transform,
                                 pick_device)
from featcache.config import FinetuneConfig, TrainConfig
from featcache.datasets import (DatasetIndex, ImageDataset, SkipUnreadable, collate_readable, skipped_images_line, strict_error, write_failures_csv,
                                resolve_data_root, scan_data)
from featcache.files import atomic_write, atomic_write_bytes
from featcache.errors import NoSpaceError, TerminatedError, UserError
from featcache.environment import default_num_workers, library_versions, worker_context
from featcache.plan import TrainPlan, class_weights, make_plan, num_outputs_for
from featcache.progress import progress_bar

Log = Callable[[str], None]
CONFIG_FILE = "finetune.json"  # written first: what --resume needs to rebuild the run
FAILURES_FILE = "failures.csv"  # (split, path, reason) of the images left out as unreadable
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"


def finetune(config: FinetuneConfig, train: TrainConfig, *, resume: str | Path | None = None,
             progress: bool = True, log: Log = print) -> runs.RunResult:
    """Train a backbone with a new linear head (or only the head, with freeze_backbone).

    Args:
        config: model, data, weights, augmentation, device, ...
        train: the training options shared with head-train (epochs, optimizer, lr, seed, ...).
        resume: a run directory stopped before it finished; training continues after its last
            finished epoch. config/train must equal the settings stored there (devices, workers and
            folders aside), and the dataset must be unchanged; otherwise a UserError names what differs.
        progress: show a progress bar per epoch.
        log: where one-line messages go.

    Returns:
        The finished run (also written to its run directory).
    """
    check_finetunable(config.model, frozen=config.freeze_backbone)
    run_dir, stored_fingerprint = None, None
    if resume is not None:
        run_dir, config, train, stored_fingerprint = _resumed_settings(Path(resume), config, train, log=log)
    device = pick_device(config.device)
    group = distributed.join(cuda=device.type == "cuda")  # Solo in one process; DDP under torchrun
    device = group.device(device)
    _check_options(config, device, log=log)
    runs.check_report_options(train)
    index, skipped, fingerprint = _scan(config, group, stored_fingerprint=stored_fingerprint, run_dir=run_dir)
    class_weights(labels=np.array([s.label for s in index.splits["train"]], dtype=np.int64),  # its errors: now
                  num_classes=len(index.class_names), spec=train.class_weight)
    backbone = build_backbone(config.model, weights=config.weights, image_size=config.image_size)
    plan = make_plan(n_train=len(index.splits["train"]), feature_dim=backbone.spec.feature_dim,
                     num_outputs=num_outputs_for(len(index.class_names)), config=train)
    distributed.check_batch_split(n_train=plan.n_train, batch_size=plan.batch_size, world_size=group.world_size)
    mode = "frozen" if config.freeze_backbone else "finetune"
    if run_dir is None and (run_dir := group.restarted_run_dir(train.runs_dir, seed=train.seed)) is not None:
        if group.from_main(lambda: runs.is_finished(run_dir)):
            return group.from_main(lambda: runs.load_run(run_dir))
        log(f"resuming {run_dir} (torchrun restarted the processes)")
    if run_dir is None:
        run_dir = _start_run_dir(config, train, mode=mode, fingerprint=fingerprint, group=group)
    if skipped and group.is_main:
        write_failures_csv(run_dir / FAILURES_FILE, skipped)
        log(skipped_images_line(len(skipped), run_dir / FAILURES_FILE))
    loop = _Loop(config=config, train=train, plan=plan, index=index, backbone=backbone,
                 device=device, run_dir=run_dir, log=log, dataset_fingerprint=fingerprint, group=group)
    return loop.run(mode=mode, progress=progress)


def finetune_seeds(config: FinetuneConfig, train: TrainConfig, *, seeds: int, resume: str | Path | None = None,
                   progress: bool = True, log: Log = print,
                   on_run: Callable[[runs.RunResult], None] | None = None) -> list[runs.RunResult]:
    """`finetune` with the seeds train.seed, train.seed + 1, ..., train.seed + seeds - 1 in turn, one run each.

    Args:
        config, train, progress, log: as for `finetune`; with seeds > 1 each run starts with a line
            "== seed S (k/K)".
        seeds: how many seeds (K >= 1).
        resume: a stopped run to continue (only with seeds=1: a run has one seed).
        on_run: called with each finished run before the next starts (the CLI prints its summary).

    Returns:
        The runs in seed order; report(runs) shows their mean ± 95 % CI.
    """
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}.")
    if resume is not None and seeds > 1:
        raise UserError("--resume continues one run; drop --seeds (resume each seed's run on its own).")
    results = []
    for k, seed in enumerate(range(train.seed, train.seed + seeds), start=1):
        if seeds > 1:
            log(f"== seed {seed} ({k}/{seeds})")
        results.append(finetune(config, dataclasses.replace(train, seed=seed), resume=resume, progress=progress,
                                log=log))
        if on_run is not None:
            on_run(results[-1])
    return results


def _drop_unreadable(index: DatasetIndex, config: FinetuneConfig) -> tuple[DatasetIndex, list[tuple[str, str, str]]]:
    """Decode every image once and leave out the unreadable ones (extract's skip rule), before the plan is made.

    The plan (batch order of every epoch) needs the number of training images up front, so they are
    found here rather than mid-epoch. Returns the index without them and their (split, path, reason);
    with --strict the first one is a UserError.
    """
    samples = [sample for _, sample in index.files()]
    splits = [split for split, _ in index.files()]
    workers = config.num_workers if config.num_workers >= 0 else default_num_workers()
    loader = torch.utils.data.DataLoader(
        SkipUnreadable(ImageDataset(index.root, samples, _decoded_only)), batch_size=config.eval_batch_size,
        num_workers=workers, collate_fn=collate_readable, worker_init_fn=_worker_ignores_sigterm,
        multiprocessing_context=worker_context(workers))
    skipped = [(splits[i], samples[i].path, reason) for _, _, failures in loader for i, reason in failures]
    if not skipped:
        return index, []
    if config.data.strict:
        split, path, reason = skipped[0]
        raise strict_error(index.root / path, reason)
    bad = {path for _, path, _ in skipped}
    kept = {split: tuple(s for s in samples if s.path not in bad) for split, samples in index.splits.items()}
    return dataclasses.replace(index, splits=kept), skipped


def _decoded_only(image) -> int:
    """The transform of the readability pass: the image was decoded; nothing else is needed."""
    return 0


def _readable(loader):
    """The batches of a SkipUnreadable loader; an image that became unreadable after the first pass is a UserError."""
    for batch, _, failures in loader:
        if failures:
            i, reason = failures[0]
            dataset = loader.dataset.dataset
            raise UserError(f"Image {dataset.root / dataset.samples[i].path} became unreadable during training "
                            f"({reason}); restore it and continue with --resume.")
        yield batch


def _check_same_settings(run_dir: Path, stored: tuple, given: tuple) -> None:
    """UserError naming every setting that differs between a stored run and the resuming command."""
    def fields(config: FinetuneConfig, train: TrainConfig) -> dict:
        out = {k: v for k, v in asdict(config).items() if k not in _RESUME_FREE}
        out.update({k: v for k, v in out.pop("data").items() if k not in _RESUME_FREE})
        out["root"] = _same_root(out["root"])
        out.update({k: v for k, v in asdict(train).items() if k not in _RESUME_FREE})
        return out

    was, now = fields(*stored), fields(*given)
    differ = [f"{k} {was[k]!r} (run) vs {now[k]!r} (given)" for k in was if was[k] != now.get(k)]
    if differ:
        raise UserError(f"Cannot resume {run_dir} with other settings: {'; '.join(differ)}. Give the run's own "
                        f"options (see {run_dir / CONFIG_FILE}), or start a new run without --resume.")


# Settings that change how a run executes, not its numbers: a resumed run may use others (device, num_workers
# and strict are then the resuming command's; the folders and eval_batch_size stay the run's).
_RESUME_FREE = {"device", "num_workers", "eval_batch_size", "cache_dir", "runs_dir", "strict"}


def _same_root(root: str) -> str:
    return root if root in ("demo", "demo3") else os.path.abspath(os.path.expanduser(root))


def _load_run_config(run_dir: Path) -> tuple[FinetuneConfig, TrainConfig, str | None]:
    from featcache.config import DataConfig

    if runs.is_finished(run_dir):
        raise UserError(f"{run_dir} is already finished (it has metrics.json); nothing to resume.")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a featcache finetune run (no {CONFIG_FILE}); pass the run directory "
                        "that the killed finetune printed.")
    try:
        doc = json.loads(path.read_text())
        ft = _typed_fields(FinetuneConfig, doc["finetune"], nested={"data": DataConfig})
        config = FinetuneConfig(**ft, data=DataConfig(**_typed_fields(DataConfig, doc["finetune"]["data"])))
        train = TrainConfig(**_typed_fields(TrainConfig, doc["train"]))
        fingerprint = doc["dataset_fingerprint"]
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError("dataset_fingerprint is not a string")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise UserError(f"{path} is damaged or not written by featcache ({_reason(exc)}), so the run cannot be checked "
                        "against the dataset; start a new run without --resume.") from None
    return config, train, fingerprint


def _typed_fields(cls, values: dict, *, nested: dict | None = None) -> dict:
    """The fields of dataclass `cls` from a JSON object, each of its declared type (nested ones left out).

    TypeError for a missing required field, an unknown or a mistyped one: a stored run is read back as data,
    never trusted. A field with a default may be missing (a run written before the field existed).
    """
    nested = nested or {}
    names = [f.name for f in dataclasses.fields(cls)]
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not isinstance(values, dict) or not set(required) <= set(values) <= set(names):
        raise TypeError(f"the fields of {cls.__name__} are not {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    for name in values:
        if name not in nested and not _of_type(values[name], hints[name]):
            hint = hints[name]
            raise TypeError(f"{name} is {values[name]!r}, not {getattr(hint, '__name__', None) or hint}")
    return {k: v for k, v in values.items() if k not in nested}


def _of_type(value, hint) -> bool:
    """Whether a JSON value is of a plain field type: bool, int, float (ints allowed), str, X | None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_of_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint in (bool, str) and isinstance(value, hint)


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message (a KeyError says which key)."""
    text = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def _resumed_settings(run_dir: Path, config: FinetuneConfig, train: TrainConfig, *,
                      log: Log) -> tuple[Path, FinetuneConfig, TrainConfig, str | None]:
    """The stored run's (run_dir, config, train, dataset fingerprint); UserError if the given settings differ."""
    stored, stored_train, stored_fingerprint = _load_run_config(run_dir)
    _check_same_settings(run_dir, (stored, stored_train), (config, train))
    # how this process runs is the resuming command's: its device, decode workers and --strict
    stored = dataclasses.replace(stored, device=config.device, num_workers=config.num_workers,
                                 data=dataclasses.replace(stored.data, strict=config.data.strict))
    log(f"resuming {run_dir}")
    return run_dir, stored, stored_train, stored_fingerprint


def _check_options(config: FinetuneConfig, device: torch.device, *, log: Log) -> None:
    """UserError for options this device cannot run; a note for options that give up parity."""
    if config.amp and device.type != "cuda":
        raise UserError("--amp is bf16 autocast on CUDA; add --device cuda or drop --amp.")
    precision.check(config.precision)
    if config.augment and config.freeze_backbone:
        log("note: --augment with --freeze-backbone departs from the cached frozen mode (no parity)")


def _scan(config: FinetuneConfig, group: distributed.Solo, *, stored_fingerprint: str | None,
          run_dir: Path | None) -> tuple[DatasetIndex, list[tuple[str, str, str]], str]:
    """(the readable dataset, its unreadable images, the fingerprint of every file); UserError for unusable data."""
    root = resolve_data_root(config.data.root, cache_dir=config.cache_dir)
    index = scan_data(root, config.data)
    # of every file, readable or not: what extract's cache key covers
    fingerprint = index.fingerprint(content=config.data.verify_content)
    if stored_fingerprint is not None and stored_fingerprint != fingerprint:
        raise UserError(f"The dataset {root} changed since {run_dir} started (files added, removed or edited); "
                        "resuming would mix two datasets: start a new run without --resume.")
    index, skipped = _drop_unreadable(index, config)
    group.require_same((fingerprint, len(index.splits.get("train") or ())), "The processes of this torchrun group "
                       f"see different datasets (file lists, sizes or times differ); {distributed.SAME_DATA}")
    for split in ("train", "val", "test"):
        if not index.splits.get(split):
            raise UserError(f"The {split} split of {root} is empty; add images or change the split fractions.")
    return index, skipped, fingerprint


def _start_run_dir(config: FinetuneConfig, train: TrainConfig, *, mode: str, fingerprint: str,
                   group: distributed.Solo) -> Path:
    """A new run directory holding CONFIG_FILE (what --resume rebuilds the run from); rank 0 makes it."""
    def start() -> Path:
        new = runs.new_run_dir(runs_dir=train.runs_dir, mode=mode, model=config.model)
        atomic_write_bytes(new / CONFIG_FILE, json.dumps(
            {"finetune": asdict(config), "train": asdict(train), "dataset_fingerprint": fingerprint},
            indent=2).encode())
        return new

    run_dir = group.from_main(start)  # rank 0 writes the run directory
    group.mark_run_dir(run_dir, seed=train.seed)
    return run_dir


class _PlanBatches:
    """A batch sampler yielding the plan's batches of the current epoch (set `.epoch`)."""

    def __init__(self, plan: TrainPlan, group: distributed.Solo):
        self.plan, self.group = plan, group
        self.epoch = 0

    def __iter__(self):  # with DDP: this process's part of each batch
        return iter([self.group.local_rows(b).tolist() for b in self.plan.batches(self.epoch)])

    def __len__(self):
        return self.plan.num_batches


def classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of every PyTorch loop: BCE on one logit for two classes, softmax cross-entropy for more.

    logits: (B, K) float32, K = num_outputs_for(C); labels: (B,) int64; weight: (C,) float32 class weights
    (plan.class_weights) or None. Returns the mean over the batch; with weight the class-weighted mean
    sum(w[y] * l) / sum(w[y]) of metrics.weighted_loss_from_logits (for two classes NOT BCE's
    reduction="mean" with weight=, which divides by B, nor pos_weight=).
    """
    if logits.shape[1] == 1:  # two classes: one logit, BCE
        if weight is None:
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        w = weight[labels]  # (B,)
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float(), weight=w,
                                                              reduction="sum") / w.sum()
    return nn.functional.cross_entropy(logits, labels, weight=weight)


class _Checkpoints:
    """last.pt and best.pt of one run directory: written whole by rank 0, read back by every rank."""

    def __init__(self, *, run_dir: Path, group: distributed.Solo, device: torch.device):
        self.run_dir, self.group, self.device = run_dir, group, device
        self.saved_epoch = 0  # epoch of last.pt (0: none)

    def save(self, name: str, payload: dict) -> None:
        """Write `payload` as run_dir/name; a full disk is a NoSpaceError saying what is left to resume from."""
        try:
            if self.group.is_main:  # rank 0 writes the run directory
                atomic_write(self.run_dir / name, lambda f: torch.save(payload, f))
            if name == LAST_CKPT:
                self.saved_epoch = payload["epoch"]
        except NoSpaceError as exc:
            raise NoSpaceError(exc.path, exc.reason, f"{self.kept()}; free space in {self.run_dir.parent} and "
                               f"continue with the same command plus --resume {self.run_dir}.") from None

    def load(self, name: str) -> dict | None:
        """A checkpoint of the run directory, or None; with DDP rank 0 reads it and sends it to the others."""
        path = self.run_dir / name
        if self.group.world_size == 1:
            return _read_checkpoint(path, map_location=self.device)
        return self.group.from_main(lambda: _read_checkpoint(path, map_location="cpu"))

    def kept(self) -> str:
        """What a stopped run leaves to resume from, as a clause."""
        if not self.saved_epoch:
            return "no epoch had finished, so there is no checkpoint"
        return f"{self.run_dir / LAST_CKPT} (epoch {self.saved_epoch}) is intact"

    def restore(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> list[metrics.EpochRecord] | None:
        """Load last.pt into `net` and `optimizer`; the history of its finished epochs, or None without one."""
        ckpt = self.load(LAST_CKPT)
        if ckpt is None:
            return None
        path = self.run_dir / LAST_CKPT
        try:
            (net.head if ckpt.get("head_only") else net).load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            history = [metrics.EpochRecord.from_dict(r) for r in ckpt["history"]]
        except (RuntimeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(_BAD_CHECKPOINT.format(path=path, reason=_reason(exc))) from None
        if len(history) != ckpt["epoch"]:
            raise UserError(_BAD_CHECKPOINT.format(path=path, reason=f"{len(history)} epochs of history, not "
                                                                     f"{ckpt['epoch']}"))
        self.saved_epoch = ckpt["epoch"]
        return history


_BAD_CHECKPOINT = ("{path} is not a featcache checkpoint that loads as plain data ({reason}); "
                   "start a new run without --resume.")
_CHECKPOINT_KEYS = {"epoch": int, "state_dict": dict, "optimizer": dict, "history": list}


def _read_checkpoint(path: Path, *, map_location) -> dict | None:
    """A checkpoint loaded as data (tensors and plain types only, weights_only=True), or None if there is none.

    A file that needs anything else to load (a pickled object: code would run) or lacks the keys
    of a featcache checkpoint is a UserError naming it.
    """
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refusal, zip or pickle errors, EOF
        raise UserError(_BAD_CHECKPOINT.format(path=path, reason=_reason(exc))) from None
    if not isinstance(ckpt, dict):
        raise UserError(_BAD_CHECKPOINT.format(path=path, reason=f"it holds a {type(ckpt).__name__}"))
    for key, kind in _CHECKPOINT_KEYS.items():
        if not isinstance(ckpt.get(key), kind) or isinstance(ckpt.get(key), bool):
            raise UserError(_BAD_CHECKPOINT.format(path=path, reason=f"no {kind.__name__} {key!r}"))
    return ckpt


def _build_network(backbone: Backbone, plan: TrainPlan, config: FinetuneConfig, *, device: torch.device) -> nn.Module:
    """Backbone + linear head, the head starting at the plan's init; with freeze_backbone only the head trains."""
    net = make_finetune_net(backbone, plan.weight.shape[0]).to(device)
    with torch.no_grad():
        net.head.weight.copy_(torch.tensor(plan.weight))
        net.head.bias.copy_(torch.tensor(plan.bias))
    if config.freeze_backbone:
        net.backbone.requires_grad_(False)
    return net


def _make_loaders(index: DatasetIndex, backbone: Backbone, config: FinetuneConfig, *, sampler: _PlanBatches,
                  device: torch.device, group: distributed.Solo) -> tuple[torch.utils.data.DataLoader, dict]:
    """(the train loader over the plan's batches, {"val"|"test": eval loader of this process's rows})."""
    workers = config.num_workers if config.num_workers >= 0 else default_num_workers()
    train_tf = make_train_transform(backbone.transform_desc) if config.augment else backbone.transform
    # Not persistent: each epoch's workers then take their seeds from the per-epoch torch seed
    # (_Loop._train_epoch), so augmentation and Dropout of a resumed run replay an uninterrupted one.
    train_loader = torch.utils.data.DataLoader(
        SkipUnreadable(ImageDataset(index.root, index.splits["train"], train_tf)), batch_sampler=sampler,
        num_workers=workers, pin_memory=device.type == "cuda", collate_fn=collate_readable,
        worker_init_fn=_worker_ignores_sigterm, multiprocessing_context=worker_context(workers))
    eval_loaders = {
        split: torch.utils.data.DataLoader(
            # with DDP: this process's contiguous part of the split (logits() gathers them in order)
            SkipUnreadable(ImageDataset(index.root, group.local_rows(index.splits[split]), backbone.transform)),
            batch_size=config.eval_batch_size, shuffle=False, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=device.type == "cuda", collate_fn=collate_readable,
            worker_init_fn=_worker_ignores_sigterm, multiprocessing_context=worker_context(workers))
        for split in ("val", "test")
    }
    return train_loader, eval_loaders


class _Loop:
    """One training run: epochs of the plan, a val pass after each, checkpoints; `run()` trains and writes the run."""

    def __init__(self, *, config: FinetuneConfig, train: TrainConfig, plan: TrainPlan, index: DatasetIndex,
                 backbone: Backbone, device: torch.device, run_dir: Path, log: Log,
                 dataset_fingerprint: str | None = None, group: distributed.Solo | None = None):
        self.config, self.train, self.plan, self.index = config, train, plan, index
        self.group = group or distributed.Solo()
        self.device, self.run_dir, self.log = device, run_dir, log
        # of the scanned dataset, unreadable images included (index no longer holds them)
        self.dataset_fingerprint = dataset_fingerprint or index.fingerprint()
        self._stop = _NO_SIGNAL  # set by run(): SIGTERM received
        self.first_batch_at: float | None = None  # wall clock of this process's first train batch (bench's fixed cost)
        self.checkpoints = _Checkpoints(run_dir=run_dir, group=self.group, device=device)
        self.backbone = backbone
        self.num_classes = len(index.class_names)
        # the backbone's arithmetic (precision.resolve); the frozen loop's forward is extract's (precision.features)
        self.precision = precision.resolve(config.precision, str(device), amp=config.amp)
        self.net = _build_network(backbone, plan, config, device=device).to(memory_format=torch.channels_last)
        self.optimizer = _make_optimizer([p for p in self.net.parameters() if p.requires_grad], train)
        # what the training forward pass calls: with DDP, its backward averages gradients over the processes
        self.trained = self.group.wrap(self.net.head if config.freeze_backbone else self.net, device=device,
                                       sync_batchnorm=not config.freeze_backbone)
        weights = class_weights(labels=np.array([s.label for s in index.splits["train"]]),
                                num_classes=self.num_classes, spec=train.class_weight)
        self.class_weights = None if weights is None else torch.tensor(weights, dtype=torch.float32, device=device)
        self.sampler = _PlanBatches(plan, self.group)
        self.train_loader, self.eval_loaders = _make_loaders(index, backbone, config, sampler=self.sampler,
                                                             device=device, group=self.group)

    # ---- one epoch

    def _set_modes(self, training: bool) -> None:
        self.net.train(training)
        if self.config.freeze_backbone:
            self.net.backbone.eval()  # BatchNorm statistics and Dropout of the backbone stay frozen

    def _autocast(self):
        return precision.autocast(self.device, self.precision)

    def _forward(self, images: torch.Tensor, *, net: nn.Module) -> torch.Tensor:
        """(B, K) float32 logits of `net` (self.trained or self.net): frozen, the backbone runs extract's forward
        (precision.features) and the head float32 on its features; fine-tuning, all of it under autocast."""
        if self.config.freeze_backbone:
            feats = precision.features(self.net.backbone, images, device=self.device, precision=self.precision)
            return net(feats) if net is self.trained else net.head(feats)
        with self._autocast():
            return net(precision.to_input(images, self.device)).float()

    def _train_epoch(self, epoch: int, bar) -> tuple[float, float]:
        """One epoch of the plan's batches; (train loss, train acc), means over its mini-batches."""
        self._set_modes(True)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.plan.lrs[epoch])
        self.sampler.epoch = epoch
        # Augmentation and Dropout draw from torch's RNG: seed it per epoch so a resumed run
        # replays exactly what an uninterrupted one does.
        torch.manual_seed(self.train.seed * 100_003 + epoch + 1_000_003 * self.group.rank)
        loss_sums, correct, sizes = [], [], []
        global_sizes = self.plan.batch_sizes()
        task = bar.add_task(f"epoch {epoch + 1}/{self.plan.epochs}", total=self.plan.n_train, info="") if bar else None
        for step, (images, labels, _) in enumerate(_readable(self.train_loader)):
            self.first_batch_at = self.first_batch_at or time.time()
            self._stop_if_asked(epoch)
            loss_sum, right, n = self._train_step(images, labels, global_rows=int(global_sizes[step]))
            loss_sums.append(loss_sum)
            correct.append(right)
            sizes.append(n)
            if not math.isfinite(loss_sum):
                break  # the divergence check of run() ends the run
            if bar:
                done = sum(sizes)
                bar.update(task, advance=n, info=f"loss {sum(loss_sums) / done:.4f} acc {sum(correct) / done:.3f}")
        if bar:
            bar.remove_task(task)
        return metrics.epoch_train_metrics(loss_sums, correct, sizes)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, *, global_rows: int) -> tuple[float, int, int]:
        """One optimizer step on a batch; its (loss sum, correct, rows), with DDP summed over the processes."""
        images = images.to(self.device, non_blocking=True)  # (B, 3, S, S) float32
        labels = labels.to(self.device, non_blocking=True)  # (B,) int64
        logits = self._forward(images, net=self.trained)
        loss = classification_loss(logits, labels, self.class_weights)
        # rows count by their class weight: the global batch's weighted mean is sum(w * l) / sum(w) over all ranks
        local_w = len(labels) if self.class_weights is None else float(self.class_weights[labels].sum())
        (global_w,) = (global_rows,) if self.class_weights is None else self.group.sum(local_w)
        self.optimizer.zero_grad(set_to_none=True)
        self.group.scale_loss(loss, rows=local_w, global_rows=global_w).backward()
        self.optimizer.step()
        n = len(labels)
        batch_loss = float(loss.detach())
        pred = metrics.predict(logits.detach().float().cpu().numpy(), self.num_classes)
        # with DDP: sums over the processes, so every one sees the global batch's numbers
        loss_sum, right, n = self.group.sum(batch_loss * local_w, int((pred == labels.cpu().numpy()).sum()), n)
        if self.class_weights is not None:  # the weighted mean of the global batch, times its rows
            loss_sum = loss_sum / global_w * n
        return loss_sum, int(right), int(n)

    @torch.no_grad()
    def logits(self, split: str) -> np.ndarray:
        """(N, K) float32 logits of one split in eval mode."""
        self._set_modes(False)
        out = []
        for images, _, _ in _readable(self.eval_loaders[split]):
            out.append(self._forward(images.to(self.device, non_blocking=True), net=self.net).cpu().numpy())
        local = np.concatenate(out) if out else np.zeros((0, self.plan.weight.shape[0]), np.float32)
        return self.group.gather_rows(local)  # with DDP: every process's rows, in order

    # ---- checkpoints

    def _stop_if_asked(self, epoch: int) -> None:
        """After SIGTERM: stop at this batch boundary; the checkpoint of the last finished epoch is what resume uses."""
        if self._stop.is_set():
            raise self._terminated(epoch)

    def _terminated(self, epoch: int) -> TerminatedError:
        return TerminatedError(f"Stopped by SIGTERM in epoch {epoch + 1} of {self.plan.epochs}; "
                               f"{self.checkpoints.kept()}; continue with the same command plus --resume "
                               f"{self.run_dir}.")

    def _state(self, epoch: int, history: list[metrics.EpochRecord], *, head_only: bool = False) -> dict:
        """The checkpoint after `epoch` finished epochs: network, optimizer, history and what export needs.

        head_only: only the head's weights (last.pt of --freeze-backbone: the frozen backbone is rebuilt
        bit-identical from the starting weights on --resume, and best.pt keeps the whole network for export)."""
        return {
            "epoch": epoch, "model": self.config.model, "class_names": list(self.index.class_names),
            "transform": self.backbone.transform_desc, "weights": self.backbone.weights_tag,
            "freeze_backbone": self.config.freeze_backbone, "head_only": head_only,
            "state_dict": (self.net.head if head_only else self.net).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [r.to_dict() for r in history],
        }

    def _checkpoint(self, epoch: int, history: list[metrics.EpochRecord]) -> None:
        """After epoch `epoch` (0-based): best.pt if it is the selected epoch so far, last.pt always."""
        if metrics.select_epoch(history) == len(history) - 1:
            self.checkpoints.save(BEST_CKPT, self._state(epoch + 1, history))
        self.checkpoints.save(LAST_CKPT, self._state(epoch + 1, history, head_only=self.config.freeze_backbone))

    # ---- the run

    def run(self, *, mode: str, progress: bool) -> runs.RunResult:
        """Train the epochs left (after last.pt's, if any), then score the selected epoch and write the run."""
        history = self.checkpoints.restore(self.net, self.optimizer)
        if history is None:
            history = []
        else:
            self.log(f"continuing after epoch {len(history)} of {self.plan.epochs}")
        val_labels = np.array([s.label for s in self.index.splits["val"]])
        diverged = None
        # Under torchrun, SIGTERM is how the agent stops the survivors of a failed rank (which may be waiting
        # in a collective, never reaching a batch boundary): it keeps its default there.
        with _sigterm_flag(enabled=self.group.world_size == 1) as self._stop, progress_bar(progress) as bar:
            for epoch in range(len(history), self.plan.epochs):
                try:
                    record = self._epoch(epoch, bar, val_labels)
                except RuntimeError:  # a decode worker that SIGTERM reached before it could ignore it
                    if self._stop.is_set():
                        raise self._terminated(epoch) from None
                    raise
                diverged = metrics.divergence_reason(history, record, num_classes=self.num_classes)
                history.append(record)
                self.log(_epoch_line(record, self.plan.epochs))
                if diverged:
                    kept = (f"the last good checkpoint is {self.run_dir / LAST_CKPT}" if len(history) > 1
                            else "no epoch finished before it, so there is no checkpoint")
                    self.log(f"stopped: {diverged}; {kept}")
                    break
                self._checkpoint(epoch, history)
                if epoch + 1 < self.plan.epochs:
                    self._stop_if_asked(epoch + 1)
        return self._finish(mode=mode, history=history, diverged=diverged)

    def _epoch(self, epoch: int, bar, val_labels: np.ndarray) -> metrics.EpochRecord:
        """Train epoch `epoch` (0-based), then one val pass: its record."""
        t0 = time.perf_counter()
        train_loss, train_acc = self._train_epoch(epoch, bar)
        val_loss, val_acc = metrics.evaluate(self.logits("val"), val_labels, self.num_classes)
        return metrics.EpochRecord(epoch=epoch + 1, lr=float(self.plan.lrs[epoch]), train_loss=train_loss,
                                   train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                                   seconds=time.perf_counter() - t0)

    def _finish(self, *, mode: str, history: list[metrics.EpochRecord], diverged: str | None) -> runs.RunResult:
        """Test metrics of the selected epoch; rank 0 writes the run directory; every rank gets the result."""
        good = history[:-1] if diverged else history
        test_logits = self._test_logits(scored=bool(good))
        # best.pt's val logits for the operating point and temperature (NaN when nothing was scored)
        val_logits = (self.logits("val") if good else
                      np.full((len(self.index.splits["val"]), test_logits.shape[1]), np.nan, np.float32))
        last_batch_at = time.time()  # the network's last batch is done: the rest is writing the run
        test_labels = np.array([s.label for s in self.index.splits["test"]])
        selected = metrics.select_epoch(good or history)
        summary = metrics.summarize(history, selected, test_logits=test_logits, test_labels=test_labels,
                                    class_names=self.index.class_names,
                                    train_seconds=sum(r.seconds for r in history), diverged=diverged is not None)
        if not self.group.is_main:
            return self.group.broadcast(None)  # rank 0 writes the run directory and sends its result
        head = self.net.head
        return self.group.broadcast(_write_run(
            self.run_dir, mode=mode, config=self.config, train=self.train, backbone=self.backbone,
            index=self.index, dataset_fingerprint=self.dataset_fingerprint,
            head=(head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy()),
            history=history, summary=summary, selected=selected, diverged=diverged, arithmetic=self.precision,
            batches_at=(self.first_batch_at, last_batch_at),
            clinical=self._clinical(val_logits=val_logits, test_logits=test_logits),
            scored=(test_logits, test_labels)))

    def _clinical(self, *, val_logits: np.ndarray, test_logits: np.ndarray) -> dict:
        """runs.write_clinical of this run (rank 0): extra["clinical"] and test_logits.npz (its ROC and calibration
        figures come with the run's other figures, _figure_spec)."""
        labels = {split: np.array([s.label for s in self.index.splits[split]], dtype=np.int64)
                  for split in ("train", "val", "test")}
        return runs.write_clinical(
            self.run_dir, val_logits=val_logits, val_labels=labels["val"], test_logits=test_logits,
            test_labels=labels["test"], test_paths=[s.path for s in self.index.splits["test"]],
            num_classes=self.num_classes, config=self.train, train_labels=labels["train"])

    def _test_logits(self, *, scored: bool) -> np.ndarray:
        """(N_test, K) float32 logits of best.pt's weights; NaN when no epoch was good enough to score."""
        best = self.checkpoints.load(BEST_CKPT) if scored else None
        if best is None:  # diverged in the first epoch: nothing good to score
            return np.full((len(self.index.splits["test"]), self.plan.weight.shape[0]), np.nan, np.float32)
        try:
            self.net.load_state_dict(best["state_dict"])
        except RuntimeError as exc:
            raise UserError(_BAD_CHECKPOINT.format(path=self.run_dir / BEST_CKPT, reason=_reason(exc))) from None
        return self.logits("test")


def _write_run(run_dir: Path, *, mode: str, config: FinetuneConfig, train: TrainConfig, backbone: Backbone,
               index: DatasetIndex, dataset_fingerprint: str, head: tuple[np.ndarray, np.ndarray],
               history: list[metrics.EpochRecord], summary: metrics.RunSummary, selected: int,
               diverged: str | None, clinical: dict | None = None, arithmetic: str = "fp32",
               batches_at: tuple[float | None, float] | None = None, scored: tuple | None = None) -> runs.RunResult:
    """head.npz, history.csv, curves.png and metrics.json of a finished run (rank 0 only).

    head: (weight (K, D) float32, bias (K,) float32) of the selected epoch; clinical: runs.write_clinical's
    record, stored as extra["clinical"]; arithmetic: the resolved precision, stored as extra["precision"];
    batches_at: wall clock of the first train batch and of the end of the last pass (timings first_batch_at,
    last_batch_at: what featcache bench reads the process's fixed cost from).
    """
    weight, bias = head
    runs.save_head(run_dir / runs.HEAD_FILE, weight=weight, bias=bias, class_names=index.class_names)
    runs.write_history_csv(run_dir / runs.HISTORY_FILE, history)
    plots.draw_run_figures(run_dir, _figure_spec(mode=mode, config=config, train=train, backbone=backbone, index=index,
                                                 history=history, summary=summary, selected=selected,
                                                 clinical=clinical, scored=scored))
    return runs.finish_run(
        run_dir, mode=mode, model=config.model, config=train, summary=summary,
        history=history, timings={"train_s": sum(r.seconds for r in history),
                                  **_batch_times(batches_at)},
        versions=library_versions(),
        extra={"finetune": asdict(config), "dataset_root": str(index.root),
               "dataset_fingerprint": dataset_fingerprint, "weights": backbone.weights_tag,
               "transform": backbone.transform_desc, "diverged_reason": diverged, "precision": arithmetic,
               **({"clinical": clinical} if clinical is not None else {})},
    )


def _batch_times(batches_at: tuple[float | None, float] | None) -> dict:
    """timings first_batch_at / last_batch_at (wall clock), those known."""
    if batches_at is None:
        return {}
    return {k: float(v) for k, v in zip(("first_batch_at", "last_batch_at"), batches_at) if v is not None}


def _figure_spec(*, mode: str, config: FinetuneConfig, train: TrainConfig, backbone: Backbone, index: DatasetIndex,
                 history: list[metrics.EpochRecord], summary: metrics.RunSummary, selected: int,
                 clinical: dict | None, scored: tuple | None) -> dict:
    """plots.draw_run_figures' spec of a fine-tune run: curves, chance line, confusion (ROC, calibration)."""
    crop = backbone.transform_desc.get("crop") if isinstance(backbone.transform_desc, dict) else None
    title = (f"{config.model} {mode} on {index.name}" + (f", {crop} px" if crop else "")
             + f"\n{runs.settings_text(train)}" + (", augmented" if config.augment else ""))
    logits, labels = scored if scored is not None else (None, None)
    return {"title": title, "chance": metrics.chance_accuracy(summary.support),
            "curves": {"kind": "epochs", "history": list(history), "selected": selected},
            "test": runs.test_figures(summary, logits=logits, labels=labels, clinical=clinical)}


class _Flag:
    """Set by a signal handler, read by the loop (no lock: a handler must not block)."""

    def __init__(self):
        self._set = False

    def set(self, *_):
        self._set = True

    def is_set(self) -> bool:
        return self._set


_NO_SIGNAL = _Flag()  # never set: a _Loop outside run()


@contextmanager
def _sigterm_flag(*, enabled: bool = True):
    """A flag that SIGTERM sets while the block runs (the handler only sets it; the loop stops at a batch boundary).

    Stopping mid-epoch and keeping the last finished epoch's checkpoint is what resume can replay
    bit for bit; a mid-epoch checkpoint could not be (augmentation and worker seeds are per epoch).
    """
    flag, installed, previous = _Flag(), False, None
    if enabled:
        try:
            previous, installed = signal.signal(signal.SIGTERM, flag.set), True
        except ValueError:  # not the main thread: signals cannot be handled here
            pass
    try:
        yield flag
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _worker_ignores_sigterm(worker_id: int) -> None:
    """DataLoader worker_init_fn: SIGTERM to the process group (Slurm, a shell's kill -- -PGID) is the main
    process's to handle (it stops at a batch boundary and ends the workers); a worker it killed would make the
    main process fail with the DataLoader's traceback instead."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _epoch_line(r: metrics.EpochRecord, epochs: int) -> str:
    return (f"epoch {r.epoch:3d}/{epochs}  lr {r.lr:.2e}  train loss {r.train_loss:.4f} acc {r.train_acc:.4f}"
            f"  val loss {r.val_loss:.4f} acc {r.val_acc:.4f}  {r.seconds:.1f} s")


def _make_optimizer(params, train: TrainConfig) -> torch.optim.Optimizer:
    """torch.optim with the arithmetic the optax chains of head.py reproduce."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, nesterov=train.nesterov,
                               weight_decay=train.weight_decay)
    if train.optimizer == "adam":
        return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
