"""One featcache command line per run of a study: what `featcache study --list` prints for a job runner.

Each line runs as-is from any folder (absolute paths) and writes its run where the study looks for it
(<out>/runs/<key>/), so `featcache study ... --report-only` collects whatever finished. A head run's line
extracts (or finds) its cache first with `extract --wait`: several array tasks may share one extraction.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from featcache.study.plan import RunSpec, StudyPlan
from featcache.study.store import run_parent


def _q(value) -> str:  # one argument, as text (command_line quotes for the shell)
    return str(value)


def _data_args(plan: StudyPlan) -> list[str]:
    return ["--data", _q(plan.data), "--val-fraction", _q(plan.val_fraction), "--test-fraction",
            _q(plan.test_fraction), "--split-seed", _q(plan.split_seed)]


def _backbone_args(plan: StudyPlan, spec: RunSpec) -> list[str]:
    size = [] if plan.image_size is None else ["--image-size", _q(plan.image_size)]
    return ["--model", _q(spec.model), "--weights", _q(spec.weights), *size,
            "--cache-dir", _q(Path(plan.cache_dir).resolve())]


def _train_args(plan: StudyPlan, spec: RunSpec, epochs: int) -> list[str]:
    return ["--epochs", _q(epochs), "--batch-size", _q(plan.batch_size), "--optimizer", _q(plan.optimizer),
            "--lr", _q(plan.lr), "--momentum", _q(plan.momentum), "--weight-decay", _q(plan.weight_decay),
            "--seed", _q(spec.seed), "--runs-dir", _q(run_parent(Path(plan.out).resolve(), spec))]


def extract_args(plan: StudyPlan, spec: RunSpec) -> list[str]:
    """featcache extract's arguments for the cache of the run's backbone."""
    nproc = ["--nproc", _q(plan.nproc)] if plan.nproc > 1 else []
    return ["extract", *_backbone_args(plan, spec), *_data_args(plan), "--num-workers", _q(plan.num_workers),
            "--device", _q(plan.device), "--wait", "--quiet", *nproc]


def run_args(plan: StudyPlan, spec: RunSpec) -> list[str]:
    """The arguments of the featcache command that trains the run (head-train or finetune)."""
    if spec.mode == "head":
        return ["head-train", *_backbone_args(plan, spec), *_data_args(plan), "--solver", spec.solver,
                *_train_args(plan, spec, plan.epochs)]
    epochs = plan.epochs if spec.mode == "frozen" else plan.tune_epochs
    nproc = ["--nproc", _q(plan.nproc)] if plan.nproc > 1 else []
    frozen = ["--freeze-backbone"] if spec.mode == "frozen" else []
    return ["finetune", *_backbone_args(plan, spec), *_data_args(plan), *_train_args(plan, spec, epochs), *frozen,
            "--device", _q(plan.device), "--num-workers", _q(plan.num_workers), "--quiet", *nproc]


def command_line(plan: StudyPlan, spec: RunSpec) -> str:
    """The shell line of one run (a head run's extraction first)."""
    line = shlex.join(["featcache", *run_args(plan, spec)])
    if spec.mode == "head":
        return shlex.join(["featcache", *extract_args(plan, spec)]) + " && " + line
    return line
