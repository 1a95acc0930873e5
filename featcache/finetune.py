"""PyTorch training loops: full fine-tuning, and the classic frozen-backbone loop.

Both follow the same `TrainPlan` as head-train (head init, batch order, lr per epoch) and take
every number from `metrics.py`, so `finetune --freeze-backbone` reports what `extract` +
`head-train` report for the same seed. The frozen loop is the slow baseline the cache replaces:
it pushes every image through the backbone again in every epoch (in eval mode, so BatchNorm
statistics never drift).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from featcache import metrics, plots, runs
from featcache.backbones import (Backbone, build_backbone, make_finetune_net, make_train_transform, pick_device)
from featcache.config import FinetuneConfig, TrainConfig
from featcache.datasets import DatasetIndex, ImageDataset, resolve_data_root, scan_dataset
from featcache.errors import UserError
from featcache.extract import library_versions
from featcache.plan import TrainPlan, make_plan, num_outputs_for
from featcache.progress import progress_bar

Log = Callable[[str], None]
CONFIG_FILE = "finetune.json"  # written first: what --resume needs to rebuild the run
LAST_CKPT = "last.pt"
BEST_CKPT = "best.pt"


def finetune(config: FinetuneConfig, train: TrainConfig, *, resume: str | Path | None = None,
             progress: bool = True, log: Log = print) -> runs.RunResult:
    """Train a backbone with a new linear head (or only the head, with freeze_backbone).

    Args:
        config: model, data, weights, augmentation, device, ...
        train: the training options shared with head-train (epochs, optimizer, lr, seed, ...).
        resume: a run directory killed before it finished; training continues after its last
            finished epoch with the configuration stored there (config/train are then ignored).
        progress: show a progress bar per epoch.
        log: where one-line messages go.

    Returns:
        The finished run (also written to its run directory).
    """
    if resume is not None:
        run_dir = Path(resume)
        config, train = _load_run_config(run_dir)
        log(f"resuming {run_dir}")
    else:
        run_dir = None
    device = pick_device(config.device)
    if config.amp and device.type != "cuda":
        raise UserError("--amp is bf16 autocast on CUDA; add --device cuda or drop --amp.")
    if config.augment and config.freeze_backbone:
        log("note: --augment with --freeze-backbone departs from the cached frozen mode (no parity)")
    root = resolve_data_root(config.data.root, cache_dir=config.cache_dir)
    index = scan_dataset(root, val_fraction=config.data.val_fraction,
                         test_fraction=config.data.test_fraction, seed=config.data.split_seed)
    for split in ("train", "val", "test"):
        if not index.splits.get(split):
            raise UserError(f"The {split} split of {root} is empty; add images or change the split fractions.")
    backbone = build_backbone(config.model, weights=config.weights, image_size=config.image_size)
    num_classes = len(index.class_names)
    plan = make_plan(n_train=len(index.splits["train"]), feature_dim=backbone.spec.feature_dim,
                     num_outputs=num_outputs_for(num_classes), config=train)
    mode = "frozen" if config.freeze_backbone else "finetune"
    if run_dir is None:
        run_dir = runs.new_run_dir(runs_dir=train.runs_dir, mode=mode, model=config.model)
        runs.atomic_write_bytes(run_dir / CONFIG_FILE, json.dumps(
            {"finetune": asdict(config), "train": asdict(train)}, indent=2).encode())
    loop = _Loop(config=config, train=train, plan=plan, index=index, backbone=backbone,
                 device=device, run_dir=run_dir, log=log)
    return loop.run(mode=mode, progress=progress)


def _load_run_config(run_dir: Path) -> tuple[FinetuneConfig, TrainConfig]:
    from featcache.config import DataConfig

    if runs.is_finished(run_dir):
        raise UserError(f"{run_dir} is already finished (it has metrics.json); nothing to resume.")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a featcache finetune run (no {CONFIG_FILE}); pass the run directory "
                        "that the killed finetune printed.")
    doc = json.loads(path.read_text())
    ft = dict(doc["finetune"])
    ft["data"] = DataConfig(**ft["data"])
    return FinetuneConfig(**ft), TrainConfig(**doc["train"])


class _PlanBatches:
    """A batch sampler yielding the plan's batches of the current epoch (set `.epoch`)."""

    def __init__(self, plan: TrainPlan):
        self.plan = plan
        self.epoch = 0

    def __iter__(self):
        return iter([b.tolist() for b in self.plan.batches(self.epoch)])

    def __len__(self):
        return self.plan.num_batches


class _Loop:
    """One training run: model, optimizer, loaders, checkpoints; `run()` trains and writes the run."""

    def __init__(self, *, config: FinetuneConfig, train: TrainConfig, plan: TrainPlan, index: DatasetIndex,
                 backbone: Backbone, device: torch.device, run_dir: Path, log: Log):
        self.config, self.train, self.plan, self.index = config, train, plan, index
        self.device, self.run_dir, self.log = device, run_dir, log
        self.backbone = backbone
        self.num_classes = len(index.class_names)
        self.net = make_finetune_net(backbone, plan.weight.shape[0]).to(device)
        with torch.no_grad():
            self.net.head.weight.copy_(torch.tensor(plan.weight))
            self.net.head.bias.copy_(torch.tensor(plan.bias))
        if config.freeze_backbone:
            self.net.backbone.requires_grad_(False)
        params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(params, train)
        self.sampler = _PlanBatches(plan)
        workers = config.num_workers if config.num_workers >= 0 else _default_workers()
        train_tf = make_train_transform(backbone.transform_desc) if config.augment else backbone.transform
        # Not persistent: each epoch's workers then take their seeds from the per-epoch torch seed
        # (_train_epoch), so augmentation and Dropout of a resumed run replay an uninterrupted one.
        self.train_loader = torch.utils.data.DataLoader(
            ImageDataset(index.root, index.splits["train"], train_tf), batch_sampler=self.sampler,
            num_workers=workers, pin_memory=device.type == "cuda")
        self.eval_loaders = {
            split: torch.utils.data.DataLoader(
                ImageDataset(index.root, index.splits[split], backbone.transform),
                batch_size=config.eval_batch_size, shuffle=False, num_workers=workers,
                persistent_workers=workers > 0, pin_memory=device.type == "cuda")
            for split in ("val", "test")
        }

    # ---- one epoch

    def _set_modes(self, training: bool) -> None:
        self.net.train(training)
        if self.config.freeze_backbone:
            self.net.backbone.eval()  # BatchNorm statistics and Dropout of the backbone stay frozen

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.config.amp and self.device.type == "cuda")

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:  # two classes: one logit, BCE
            return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        return nn.functional.cross_entropy(logits, labels)

    def _train_epoch(self, epoch: int, bar) -> tuple[float, float]:
        self._set_modes(True)
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.plan.lrs[epoch])
        self.sampler.epoch = epoch
        # Augmentation and Dropout draw from torch's RNG: seed it per epoch so a resumed run
        # replays exactly what an uninterrupted one does.
        torch.manual_seed(self.train.seed * 100_003 + epoch)
        loss_sums, correct, sizes = [], [], []
        task = bar.add_task(f"epoch {epoch + 1}/{self.plan.epochs}", total=self.plan.n_train, info="") if bar else None
        for images, labels, _ in self.train_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                if self.config.freeze_backbone:
                    with torch.no_grad():
                        feats = self.net.backbone(images)
                    logits = self.net.head(feats.float())
                else:
                    logits = self.net(images)
                loss = self._loss(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            n = len(labels)
            batch_loss = float(loss.detach())
            pred = metrics.predict(logits.detach().float().cpu().numpy(), self.num_classes)
            loss_sums.append(batch_loss * n)
            correct.append(int((pred == labels.cpu().numpy()).sum()))
            sizes.append(n)
            if not math.isfinite(batch_loss):
                break  # the divergence check below ends the run
            if bar:
                done = sum(sizes)
                bar.update(task, advance=n, info=f"loss {sum(loss_sums) / done:.4f} acc {sum(correct) / done:.3f}")
        if bar:
            bar.remove_task(task)
        return metrics.epoch_train_metrics(loss_sums, correct, sizes)

    @torch.no_grad()
    def logits(self, split: str) -> np.ndarray:
        """(N, K) float32 logits of one split in eval mode."""
        self._set_modes(False)
        out = []
        for images, _, _ in self.eval_loaders[split]:
            with self._autocast():
                out.append(self.net(images.to(self.device, non_blocking=True)).float().cpu().numpy())
        return np.concatenate(out)

    # ---- checkpoints

    def _save(self, name: str, payload: dict) -> None:
        tmp = self.run_dir / f".{name}.tmp"
        torch.save(payload, tmp)
        tmp.replace(self.run_dir / name)

    def _state(self, epoch: int, history: list[metrics.EpochRecord]) -> dict:
        return {
            "epoch": epoch, "model": self.config.model, "class_names": list(self.index.class_names),
            "transform": self.backbone.transform_desc, "weights": self.backbone.weights_tag,
            "freeze_backbone": self.config.freeze_backbone,
            "state_dict": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [r.to_dict() for r in history],
        }

    def _restore(self) -> list[metrics.EpochRecord]:
        path = self.run_dir / LAST_CKPT
        if not path.is_file():
            return []
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        self.net.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        history = [metrics.EpochRecord.from_dict(r) for r in ckpt["history"]]
        self.log(f"continuing after epoch {len(history)} of {self.plan.epochs}")
        return history

    # ---- the run

    def run(self, *, mode: str, progress: bool) -> runs.RunResult:
        history = self._restore()
        val_labels = np.array([s.label for s in self.index.splits["val"]])
        diverged = None
        with progress_bar(progress) as bar:
            for epoch in range(len(history), self.plan.epochs):
                t0 = time.perf_counter()
                train_loss, train_acc = self._train_epoch(epoch, bar)
                val_loss, val_acc = metrics.evaluate(self.logits("val"), val_labels, self.num_classes)
                record = metrics.EpochRecord(epoch=epoch + 1, lr=float(self.plan.lrs[epoch]),
                                             train_loss=train_loss, train_acc=train_acc, val_loss=val_loss,
                                             val_acc=val_acc, seconds=time.perf_counter() - t0)
                diverged = metrics.divergence_reason(history, record, num_classes=self.num_classes)
                history.append(record)
                self.log(_epoch_line(record, self.plan.epochs))
                if diverged:
                    kept = (f"the last good checkpoint is {self.run_dir / LAST_CKPT}" if len(history) > 1
                            else "no epoch finished before it, so there is no checkpoint")
                    self.log(f"stopped: {diverged}; {kept}")
                    break
                if metrics.select_epoch(history) == len(history) - 1:
                    self._save(BEST_CKPT, self._state(epoch + 1, history))
                self._save(LAST_CKPT, self._state(epoch + 1, history))
        return self._finish(mode=mode, history=history, diverged=diverged)

    def _finish(self, *, mode: str, history: list[metrics.EpochRecord], diverged: str | None) -> runs.RunResult:
        good = history[:-1] if diverged else history
        if good and (self.run_dir / BEST_CKPT).is_file():
            best = torch.load(self.run_dir / BEST_CKPT, map_location=self.device, weights_only=False)
            self.net.load_state_dict(best["state_dict"])
            test_logits = self.logits("test")
        else:  # diverged in the first epoch: nothing good to score
            test_logits = np.full((len(self.index.splits["test"]), self.plan.weight.shape[0]), np.nan, np.float32)
        test_labels = np.array([s.label for s in self.index.splits["test"]])
        selected = metrics.select_epoch(good or history)
        summary = metrics.summarize(history, selected, test_logits=test_logits, test_labels=test_labels,
                                    class_names=self.index.class_names,
                                    train_seconds=sum(r.seconds for r in history), diverged=diverged is not None)
        head = self.net.head
        runs.save_head(self.run_dir / runs.HEAD_FILE, weight=head.weight.detach().cpu().numpy(),
                       bias=head.bias.detach().cpu().numpy(), class_names=self.index.class_names)
        runs.write_history_csv(self.run_dir / runs.HISTORY_FILE, history)
        plots.plot_curves(history, self.run_dir / runs.CURVES_FILE,
                          f"{self.config.model} — {mode}", selected=selected)
        return runs.finish_run(
            self.run_dir, mode=mode, model=self.config.model, config=self.train, summary=summary,
            history=history, timings={"train_s": sum(r.seconds for r in history)},
            versions=library_versions(),
            extra={"finetune": asdict(self.config), "dataset_root": str(self.index.root),
                   "dataset_fingerprint": self.index.fingerprint(), "weights": self.backbone.weights_tag,
                   "transform": self.backbone.transform_desc, "diverged_reason": diverged},
        )


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


def _default_workers() -> int:
    from featcache.extract import default_num_workers

    return default_num_workers()


# `featcache.finetune(...)` is the Python API function of the same name (see featcache.api).
import sys as _sys  # noqa: E402

from featcache import api as _api  # noqa: E402

_api.make_module_callable(_sys.modules[__name__], _api.finetune)
