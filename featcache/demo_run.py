"""`featcache demo`: a small study on the built-in demo dataset, then export and predict with its best head.

demo data -> `featcache study` (extract once, head-train on the cache, the classic frozen loop with the same
numbers, the full fine-tune; the report a user gets: report.md / report.html) -> export the best cached head
and predict the demo test images with it. Orchestration: each step imports what it needs inside it, so
importing this module (as the CLI does for the defaults of `featcache demo`) starts neither torch nor jax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from featcache.runs import RunResult
    from featcache.study.runner import StudyResult

Log = Callable[[str], None]
# The demo's backbones: a pretrained one that needs no network, and the same network with random weights.
DEMO_MODELS = ("timm/tf_efficientnet_lite0@lite0-package", "timm/tf_efficientnet_lite0@none")
STUDY_FOLDER = "demo-study"  # in runs_dir: the study (runs, report.md, report.html, figures/)
MODEL_FILE = "demo-model.pt2"  # in runs_dir: the best cached head, exported
SHOWN_PREDICTIONS = 3  # test images whose prediction is printed


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` produced: the study, the exported head run, the exported model and its accuracy."""

    study: StudyResult  # .report (report.json's content), .report_md, .report_html
    head: RunResult  # the best cached head (first seed): the run exported
    model_path: Path  # that run exported as one torch.export program
    predicted_acc: float  # accuracy of that module's predictions on the demo test images

    @property
    def report_html(self) -> Path:
        return self.study.report_html


def run_demo(*, models: Sequence[str] = DEMO_MODELS, image_size: int = 96, epochs: int = 30,
             finetune_epochs: int = 3, lr: float = 0.01, seeds: int = 1, cache_dir: str = "cache",
             runs_dir: str = "runs", progress: bool = True, log: Log = print) -> DemoResult:
    """Run the demo study on the built-in dataset (rendered once under cache_dir; no network), export, predict.

    Args:
        models: backbones NAME@WEIGHTS (DEMO_MODELS: EfficientNet-Lite0 pretrained and with random weights).
        image_size: crop size of every step.
        epochs: epochs of head-train and of the classic frozen loop (the same plan, so the same numbers).
        finetune_epochs: epochs of the full fine-tune (the slowest step).
        lr: learning rate of every training (SGD, the TrainConfig defaults otherwise).
        seeds: seeds per row.
        cache_dir, runs_dir: where the dataset and caches, and the study and exported model go.
        progress: the study's live overview on a terminal.
        log: where each step's lines go.

    Returns:
        The study, the exported run and model, and the accuracy of its predictions.
    """
    from featcache.datasets import resolve_data_root
    from featcache.study.plan import StudyPlan
    from featcache.study.runner import run_study

    root = resolve_data_root("demo", cache_dir=cache_dir)
    log(f"== demo dataset: {root}")
    log(f"\n== 1. the study: {', '.join(models)} x cached head, frozen loop, fine-tune "
        f"({epochs} epochs, fine-tune {finetune_epochs}, {seeds} seed{'s' if seeds > 1 else ''}, {image_size} px)")
    plan = StudyPlan(data="demo", out=str(Path(runs_dir) / STUDY_FOLDER), models=tuple(models),
                     modes=("head", "frozen", "finetune"), solvers=("sgd",), seeds=seeds, weights="none",
                     image_size=image_size, epochs=epochs, finetune_epochs=finetune_epochs, lr=lr,
                     cache_dir=cache_dir)
    study = run_study(plan, progress=progress, log=log)
    head = _best_head(study)
    acc = _export_and_predict(head, root / "test", Path(runs_dir) / MODEL_FILE, log=log)
    return DemoResult(study=study, head=head, model_path=Path(runs_dir) / MODEL_FILE, predicted_acc=acc)


def _best_head(study: StudyResult) -> RunResult:
    """The first seed's run of the cached head row with the best mean test accuracy."""
    from featcache import runs
    from featcache.study import store

    rows = [r for r in study.report["rows"] if r["mode"] == "head" and r["test_acc"]["mean"] is not None]
    best = max(rows, key=lambda r: r["test_acc"]["mean"])
    spec = next(s for s in study.specs if s.row == (best["model"], best["mode"], best["solver"]))
    return runs.load_run(store.finished_run(study.plan.out, spec))


def _export_and_predict(head: RunResult, test_dir: Path, model_path: Path, *, log: Log) -> float:
    """Export the head run, predict the test images with it; returns its accuracy."""
    from featcache.exporting import export
    from featcache.prediction import predict

    log(f"\n== 2. export the best cached head ({head.model}) and predict the demo test images")
    exported = export(head.run_dir, out=model_path, log=log)
    predictions = predict(exported.path, test_dir, num_workers=0)  # JAX is loaded: no forked workers
    for row in predictions.rows[:SHOWN_PREDICTIONS]:
        log(f"  {row.path}: {row.predicted} (p={max(row.probabilities):.3f})")
    acc = sum(Path(r.path).parent.name == r.predicted for r in predictions.rows) / len(predictions.rows)
    run_acc = head.summary.test_acc
    log(f"predicted {len(predictions.rows)} test images with {exported.path}: accuracy {acc:.4f}; the run's "
        f"test accuracy {run_acc:.4f} ({'agree' if acc == run_acc else 'DISAGREE'})")
    return acc
