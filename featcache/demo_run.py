"""`featcache demo`: the whole comparison on the built-in demo dataset, one step after another.

demo data -> extract -> head-train (JAX, cached) -> finetune --freeze-backbone (the classic loop; same
numbers) -> full finetune -> report -> export the head-train run and predict the demo test images.
Orchestration: each step imports what it needs inside it, so importing this module (as the CLI does
for the defaults of `featcache demo`) starts neither torch nor jax.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from featcache.config import DataConfig, ExtractConfig, FinetuneConfig, TrainConfig

if TYPE_CHECKING:
    from featcache.runs import RunResult

Log = Callable[[str], None]
OnRun = Callable[["RunResult"], None]
FIGURE_FILE = "demo-comparison.png"  # in runs_dir: the val curves of the three runs
MODEL_FILE = "demo-model.pt"  # in runs_dir: the head-train run, exported
SHOWN_PREDICTIONS = 3  # test images whose prediction is printed


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` produced: the three runs, the comparison figure, the exported model and the timings."""

    head: RunResult  # extract + head-train: the cached frozen mode
    frozen: RunResult  # the classic frozen loop (finetune --freeze-backbone)
    full: RunResult  # the full fine-tune
    figure: Path  # val accuracy/loss curves of the three runs
    model_path: Path  # the head-train run exported as one TorchScript module
    predicted_acc: float  # accuracy of that module's predictions on the demo test images
    extract_s: float  # wall seconds of the extraction step (next to nothing on a cache hit)

    @property
    def runs(self) -> tuple[RunResult, RunResult, RunResult]:
        """(head, frozen, full), in the order the demo trains and reports them."""
        return self.head, self.frozen, self.full

    @property
    def cached_s(self) -> float:
        """Seconds of the cached frozen mode: extraction + head training."""
        return self.extract_s + self.head.summary.training_time

    @property
    def frozen_s(self) -> float:
        """Training seconds of the classic frozen loop."""
        return self.frozen.summary.training_time


def run_demo(*, model: str = "resnet18", weights: str = "none", image_size: int = 64, epochs: int = 30,
             finetune_epochs: int = 3, lr: float = 0.01, cache_dir: str = "cache", runs_dir: str = "runs",
             progress: bool = True, log: Log = print, on_run: OnRun | None = None) -> DemoResult:
    """Run every step of the demo on the built-in dataset (rendered once under cache_dir; no network).

    Args:
        model, weights, image_size: the backbone of every step (weights "none" needs no network).
        epochs: epochs of head-train and of the classic frozen loop (the same plan, so the same numbers).
        finetune_epochs: epochs of the full fine-tune (the slowest step).
        lr: learning rate of all three trainings (SGD, the TrainConfig defaults otherwise).
        cache_dir, runs_dir: where the dataset and cache, and the runs, figure and exported model go.
        progress: progress bars of extraction and training.
        log: where each step's lines go.
        on_run: called with each finished run (the CLI prints its summary table).

    Returns:
        The runs, the figure, the exported model, its accuracy and the timings.
    """
    from featcache.datasets import resolve_data_root

    show = on_run or (lambda run: None)
    root = resolve_data_root("demo", cache_dir=cache_dir)
    log(f"== demo dataset: {root}")
    data = DataConfig(root="demo")
    train = TrainConfig(epochs=epochs, lr=lr, runs_dir=runs_dir)
    cache_file, extract_s = _extract(ExtractConfig(model=model, data=data, weights=weights, image_size=image_size,
                                                   cache_dir=cache_dir), progress=progress, log=log)
    head = _head_train(cache_file, train, progress=progress, log=log)
    show(head)
    tune = FinetuneConfig(model=model, data=data, weights=weights, image_size=image_size, cache_dir=cache_dir)
    log(f"\n== 3. the classic frozen loop: images through the backbone every epoch ({epochs} epochs)")
    frozen = _finetune(dataclasses.replace(tune, freeze_backbone=True), train, progress=progress, log=log)
    show(frozen)
    log(f"\n== 4. full fine-tune ({finetune_epochs} epochs)")
    full = _finetune(tune, dataclasses.replace(train, epochs=finetune_epochs), progress=progress, log=log)
    show(full)
    result = DemoResult(head=head, frozen=frozen, full=full, figure=Path(runs_dir) / FIGURE_FILE,
                        model_path=Path(runs_dir) / MODEL_FILE, predicted_acc=float("nan"), extract_s=extract_s)
    _report(result, log=log)
    return dataclasses.replace(result, predicted_acc=_export_and_predict(result, root / "test", log=log))


def _extract(config: ExtractConfig, *, progress: bool, log: Log) -> tuple[Path, float]:
    """Step 1: the cache of the backbone (extracted, or found); (its path, seconds taken)."""
    from featcache.extraction import extract

    log(f"\n== 1. extract {config.model} once (weights {config.weights}, {config.image_size} px)")
    t0 = time.perf_counter()
    cache_file = extract(config, progress=progress, log=log)
    return cache_file, time.perf_counter() - t0


def _head_train(cache_file: Path, train: TrainConfig, *, progress: bool, log: Log) -> RunResult:
    """Step 2: the linear head in JAX on the cache."""
    from featcache.head_runs import train_head

    log(f"\n== 2. head-train on the cache ({train.epochs} epochs, JAX)")
    return train_head(cache=cache_file, config=train, progress=progress)


def _finetune(config: FinetuneConfig, train: TrainConfig, *, progress: bool, log: Log) -> RunResult:
    """Steps 3 and 4: a PyTorch loop (frozen backbone or full fine-tune)."""
    from featcache.finetuning import finetune

    return finetune(config, train, progress=progress, log=log)


def _report(result: DemoResult, *, log: Log) -> None:
    """Step 5: the three runs side by side, the comparison figure and the speed of the cached mode."""
    from featcache.reporting import compare_runs

    head, frozen = result.head.summary, result.frozen.summary
    log("\n== 5. report")
    log(compare_runs(list(result.runs), format="table", figure=result.figure).removesuffix("\n"))
    log(f"cached frozen mode: extract {result.extract_s:.1f} s + head {head.training_time:.2f} s; "
        f"classic frozen loop {result.frozen_s:.1f} s ({result.frozen_s / result.cached_s:.1f}x); same test acc: "
        f"{head.test_acc:.4f} vs {frozen.test_acc:.4f}")
    log(f"figure: {result.figure}")


def _export_and_predict(result: DemoResult, test_dir: Path, *, log: Log) -> float:
    """Step 6: export the head-train run, predict the test images with it; returns its accuracy."""
    from featcache.exporting import export
    from featcache.prediction import predict

    log("\n== 6. export the best demo model (the head-train run) and predict the demo test images")
    exported = export(result.head.run_dir, out=result.model_path, log=log)
    predictions = predict(exported.path, test_dir, num_workers=0)  # JAX is loaded: no forked workers
    for row in predictions.rows[:SHOWN_PREDICTIONS]:
        log(f"  {row.path}: {row.predicted} (p={max(row.probabilities):.3f})")
    acc = sum(Path(r.path).parent.name == r.predicted for r in predictions.rows) / len(predictions.rows)
    run_acc = result.head.summary.test_acc
    log(f"predicted {len(predictions.rows)} test images with {exported.path}: accuracy {acc:.4f}; the run's "
        f"test accuracy {run_acc:.4f} ({'agree' if acc == run_acc else 'DISAGREE'})")
    return acc
