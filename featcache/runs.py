"""The run directory: metrics.json, history.csv and head.npz, written atomically, and read back.

    runs/<YYYYmmdd-HHMMSS>-<mode>-<model>/
        head.npz      weight (K, D) float32, bias (K,), class_names (unicode), mean (D,), std (D,),
                      standardized (bool): logits = ((x - mean) / std) @ weight.T + bias
        history.csv   one row per epoch
        curves.png    written by the caller (featcache.plots) before finish_run
        metrics.json  config, summary, history, timings, versions, cache key; written LAST

Every file goes to a temporary name in the same folder and is renamed into place, and
metrics.json is written last, so a run directory without metrics.json is unfinished (crashed
or still running) and `load_run` refuses it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from featcache.config import TrainConfig
from featcache.errors import UserError
from featcache.files import atomic_write_bytes
from featcache.metrics import EpochRecord, RunSummary

MODES = ("head", "finetune", "frozen")
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
HEAD_FILE = "head.npz"
CURVES_FILE = "curves.png"
RUN_FORMAT = 1


@dataclass(frozen=True)
class RunResult:
    """A finished run as written to (or read from) its directory."""

    run_dir: Path
    mode: str  # "head" | "finetune" | "frozen"
    model: str
    config: TrainConfig
    summary: RunSummary
    history: list[EpochRecord]
    timings: dict[str, float]  # seconds: load_s, compile_s, train_s, ...
    class_names: list[str]
    cache: dict = field(default_factory=dict)  # {"key": ..., "path": ...}; empty when no cache was used
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.summary.diverged


def new_run_dir(*, runs_dir: str | Path, mode: str, model: str, name: str | None = None) -> Path:
    """Create and return an empty run directory.

    Args:
        runs_dir: parent folder (created if missing).
        mode: "head" | "finetune" | "frozen".
        model: backbone name, part of the default name.
        name: the directory name; None = `<YYYYmmdd-HHMMSS>-<mode>-<model>`, with `-2`, `-3`, ...
            appended when that exists. An explicit name that exists is a UserError.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parent = Path(runs_dir)
    parent.mkdir(parents=True, exist_ok=True)
    if name is not None:
        run_dir = parent / name
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise UserError(f"Run directory {run_dir} already exists; choose another run name.") from None
        return run_dir
    safe_model = re.sub(r"[^A-Za-z0-9_.+-]", "_", model) or "model"
    base = f"{datetime.now():%Y%m%d-%H%M%S}-{mode}-{safe_model}"
    for i in range(1, 10_000):
        run_dir = parent / (base if i == 1 else f"{base}-{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise UserError(f"Too many runs named {base} in {parent}; clean it up.")


@dataclass(frozen=True)
class HeadWeights:
    """A linear head as head.npz stores it: logits = ((x - mean) / std) @ weight.T + bias."""

    weight: np.ndarray  # (K, D) float32, nn.Linear layout; K = plan.num_outputs_for(C)
    bias: np.ndarray  # (K,)
    mean: np.ndarray | None = None  # (D,) float32 of a standardized head, else None
    std: np.ndarray | None = None  # (D,)


def save_head(path: str | Path, *, weight: np.ndarray, bias: np.ndarray, class_names: Sequence[str],
              mean: np.ndarray | None = None, std: np.ndarray | None = None) -> None:
    """Write head.npz (no pickled objects). mean/std None = no standardization (stored as 0 and 1)."""
    weight = np.asarray(weight, dtype=np.float32)  # (K, D)
    dim = weight.shape[1]
    buf = io.BytesIO()
    np.savez(
        buf,
        weight=weight,
        bias=np.asarray(bias, dtype=np.float32),  # (K,)
        class_names=np.asarray([str(c) for c in class_names], dtype=np.str_),
        mean=np.zeros(dim, np.float32) if mean is None else np.asarray(mean, dtype=np.float32),
        std=np.ones(dim, np.float32) if std is None else np.asarray(std, dtype=np.float32),
        standardized=np.asarray(mean is not None),
    )
    atomic_write_bytes(path, buf.getvalue())


def load_head(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a head.npz: weight, bias, class_names, mean, std, standardized."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def write_history_csv(path: str | Path, history: Sequence[EpochRecord]) -> None:
    """history.csv: one row per epoch, the EpochRecord fields as columns (empty cell = not finite)."""
    names = [f.name for f in dataclasses.fields(EpochRecord)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: "" if v is None else v for k, v in record.to_dict().items()})
    atomic_write_bytes(path, buf.getvalue().encode())


def finish_run(run_dir: str | Path, *, mode: str, model: str, config: TrainConfig, summary: RunSummary,
               history: Sequence[EpochRecord], timings: Mapping[str, float], versions: Mapping[str, str],
               cache_key: str | None = None, cache_path: str | None = None,
               extra: Mapping | None = None) -> RunResult:
    """Write metrics.json, which marks the run finished; call after every other file is in place.

    Non-finite numbers are written as null (strict JSON).
    """
    run_dir = Path(run_dir)
    result = RunResult(
        run_dir=run_dir, mode=mode, model=model, config=config, summary=summary, history=list(history),
        timings={k: float(v) for k, v in timings.items()}, class_names=list(summary.class_names),
        cache={} if cache_key is None and cache_path is None else {"key": cache_key, "path": cache_path},
        versions={k: str(v) for k, v in versions.items()}, extra=dict(extra or {}),
    )
    doc = {
        "format": RUN_FORMAT,
        "mode": result.mode,
        "model": result.model,
        "class_names": result.class_names,
        "diverged": summary.diverged,
        "config": dataclasses.asdict(config),
        "summary": summary.to_dict(),
        "history": [r.to_dict() for r in result.history],
        "timings": result.timings,
        "versions": result.versions,
        "cache": result.cache,
        "extra": result.extra,
    }
    text = json.dumps(doc, indent=2, allow_nan=False)
    atomic_write_bytes(run_dir / METRICS_FILE, text.encode())
    return result


def is_finished(run_dir: str | Path) -> bool:
    """True when the run directory holds its metrics.json."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def load_run(run_dir: str | Path) -> RunResult:
    """Read a finished run directory back; an unfinished or foreign one is a UserError."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "is not a finished run (no metrics.json)"
        raise UserError(f"{run_dir} {what}; pass a run directory written by featcache.")
    try:
        doc = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in doc["config"].items() if k in known})
        return RunResult(
            run_dir=run_dir, mode=doc["mode"], model=doc["model"], config=config,
            summary=RunSummary.from_dict(doc["summary"]),
            history=[EpochRecord.from_dict(r) for r in doc["history"]],
            timings=dict(doc["timings"]), class_names=list(doc["class_names"]), cache=dict(doc.get("cache") or {}),
            versions=dict(doc.get("versions") or {}), extra=dict(doc.get("extra") or {}),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a featcache run file ({e}); was it edited by hand?") from None


# --------------------------------------------------------------------------- clinical metrics of a run

TEST_LOGITS_FILE = "test_logits.npz"  # logits (N, K) float32, labels (N,) int64, paths (N,) str: what compare pairs
ROC_FILE = "roc.png"
CALIBRATION_FILE = "calibration.png"
BOOTSTRAP_SEED = 0  # every run's intervals use the same seed: runs over one test set draw the same resamples
# --bootstrap -1 (auto): (most classes, resamples); ~0.5 s for 2 classes x 2000 rows, ~10 s for 10 x 5000 at 1000
BOOTSTRAP_AUTO = ((4, 1000), (None, 200))
LOSS_NOTE = ("train_loss is the loss optimised (class-weighted under --class-weight); val_loss and test_loss "
             "are the plain unweighted mean, so runs with and without weights compare")


def bootstrap_resamples(requested: int, *, num_classes: int) -> int:
    """The resamples of a run's test intervals: `requested` (>= 0), or for -1 BOOTSTRAP_AUTO's by class count."""
    if requested >= 0:
        return int(requested)
    return next(n for most, n in BOOTSTRAP_AUTO if most is None or num_classes <= most)


def check_report_options(config: TrainConfig) -> None:
    """One-sentence UserErrors for --class-weight, --operating-point and --bootstrap, before any training."""
    from featcache.metrics import parse_operating_point
    from featcache.plan import parse_class_weight

    parse_class_weight(config.class_weight)
    parse_operating_point(config.operating_point)
    if not (isinstance(config.bootstrap, int) and config.bootstrap >= -1):
        raise UserError(f"--bootstrap must be 0 (no intervals), a number of resamples or -1 (auto), "
                        f"got {config.bootstrap!r}.")


def clinical_record(*, val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                    test_labels: np.ndarray, num_classes: int, config: TrainConfig,
                    train_labels: np.ndarray | None = None) -> dict:
    """What metrics.json's extra["clinical"] holds: metrics.clinical_report of the selected epoch's val and test
    logits ((N_val, K), (N_test, K)) under config.operating_point and config.bootstrap (bootstrap_resamples,
    seed BOOTSTRAP_SEED), plus "class_weight": {"rule", "weights" (C floats or None), "losses": LOSS_NOTE}.

    train_labels: (N_train,) int, for the weights of "balanced" (plan.class_weights); None leaves weights None.
    """
    from featcache.metrics import clinical_report
    from featcache.plan import class_weights

    report = clinical_report(val_logits=val_logits, val_labels=val_labels, test_logits=test_logits,
                             test_labels=test_labels, num_classes=num_classes, operating_point=config.operating_point,
                             bootstrap=bootstrap_resamples(config.bootstrap, num_classes=num_classes),
                             seed=BOOTSTRAP_SEED)
    weights = (None if train_labels is None else
               class_weights(labels=train_labels, num_classes=num_classes, spec=config.class_weight))
    report["class_weight"] = {"rule": config.class_weight,
                              "weights": None if weights is None else [float(w) for w in weights],
                              "losses": LOSS_NOTE}
    return report


def save_test_logits(path: str | Path, *, logits: np.ndarray, labels: np.ndarray, paths: Sequence[str]) -> None:
    """test_logits.npz: the selected epoch's test logits (N, K) float32, labels (N,) int64 and each row's image
    path (N,) (relative to the dataset root), in the same order."""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    names = np.asarray([str(p) for p in paths], dtype=np.str_)
    if not (logits.ndim == 2 and len(logits) == len(labels) == len(names)):
        raise ValueError(f"test logits {logits.shape}, labels {labels.shape} and {len(names)} paths do not align")
    buf = io.BytesIO()
    np.savez(buf, logits=logits, labels=labels, paths=names)
    atomic_write_bytes(path, buf.getvalue())


@dataclass(frozen=True)
class ScoredRows:
    """A run's test_logits.npz read back."""

    logits: np.ndarray  # (N, K) float32
    labels: np.ndarray  # (N,) int64
    paths: np.ndarray  # (N,) str


def load_test_logits(run_dir: str | Path) -> ScoredRows:
    """The run's test_logits.npz; a run without one (or a damaged one) is a one-sentence UserError."""
    path = Path(run_dir) / TEST_LOGITS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {TEST_LOGITS_FILE} (written by featcache runs since the clinical "
                        f"metrics); train the run again to compare it.")
    try:
        with np.load(path, allow_pickle=False) as f:
            scores = ScoredRows(logits=np.asarray(f["logits"]), labels=np.asarray(f["labels"]),
                                paths=np.asarray(f["paths"]).astype(str))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path} is not a featcache test-logits file ({e}); train the run again.") from None
    if not (scores.logits.ndim == 2 and len(scores.logits) == len(scores.labels) == len(scores.paths)):
        raise UserError(f"{path} holds logits, labels and paths of different lengths; train the run again.")
    return scores


def write_clinical(run_dir: str | Path, *, val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                   test_labels: np.ndarray, test_paths: Sequence[str], num_classes: int, config: TrainConfig,
                   train_labels: np.ndarray | None, title: str) -> dict:
    """test_logits.npz, roc.png and calibration.png of a run; returns its `clinical_record` (for extra["clinical"]).

    Args:
        val_logits, test_logits: (N_val, K), (N_test, K) logits of the selected epoch; val_labels, test_labels:
            (N_val,), (N_test,) int; test_paths: (N_test,) image paths relative to the dataset root, row-aligned.
        num_classes: C; config: operating_point, bootstrap, class_weight; train_labels: see clinical_record.
        title: the figures' title.
    """
    from featcache.plots import plot_calibration, plot_roc

    run_dir = Path(run_dir)
    record = clinical_record(val_logits=val_logits, val_labels=val_labels, test_logits=test_logits,
                             test_labels=test_labels, num_classes=num_classes, config=config, train_labels=train_labels)
    save_test_logits(run_dir / TEST_LOGITS_FILE, logits=test_logits, labels=test_labels, paths=test_paths)
    if np.isfinite(np.asarray(test_logits, dtype=np.float64)).all():  # a diverged run has no curve to draw
        plot_roc({"test": (test_logits, test_labels)}, run_dir / ROC_FILE, f"ROC, {title}", num_classes=num_classes)
        plot_calibration(test_logits, test_labels, run_dir / CALIBRATION_FILE, f"Reliability, {title}",
                         num_classes=num_classes, bins=record["calibration"]["bins"],
                         temperature=record["calibration"]["temperature"])
    return record
