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
import math
import os
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from featcache.config import TrainConfig
from featcache.errors import UserError
from featcache.files import NOT_WRITABLE, atomic_write_bytes, model_file_part, not_writable
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
            appended when that exists. An explicit name that exists, or one that would leave runs_dir (a path
            separator, "..", an absolute path), is a UserError; so is a runs_dir that cannot be written.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    parent = Path(runs_dir)
    if name is not None:
        check_run_name(name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return _make_run_dir(parent, mode=mode, model=model, name=name)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in NOT_WRITABLE:
            raise
        raise not_writable(parent, exc) from None


def check_run_name(name: str) -> None:
    """UserError unless `name` is one plain folder name (no path separator, not "." or "..", not absolute),
    so that a run directory never lands outside --runs-dir."""
    separators = {"/", os.sep, os.altsep} - {None}
    if not name or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        raise UserError(f"Run name {name!r} is not a plain folder name; choose a name without '/', '..' or a "
                        "leading '/' (the run goes under --runs-dir).")


def _make_run_dir(parent: Path, *, mode: str, model: str, name: str | None) -> Path:
    """mkdir of new_run_dir's directory under `parent` (which exists)."""
    if name is not None:
        run_dir = parent / name
        try:
            run_dir.mkdir()
        except FileExistsError:
            raise UserError(f"Run directory {run_dir} already exists; choose another run name.") from None
        return run_dir
    safe_model = model_file_part(model)
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


HEAD_KEYS = ("weight", "bias", "class_names", "mean", "std", "standardized")


def load_head(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a head.npz: weight (K, D), bias (K,), class_names (C,), mean (D,), std (D,), standardized ().

    A missing, unreadable, damaged or crafted file (a key missing, a wrong dtype or shape, NaN/inf, a std
    <= 0) is a one-sentence UserError naming it; no pickled object is ever loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; train the head with featcache head-train.")
    try:
        with np.load(path, allow_pickle=False) as z:
            head = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, TypeError, AttributeError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable head file ({type(e).__name__}); train the head again.") from None
    problem = head_problem(head)
    if problem:
        raise UserError(f"{path} is not a valid head file ({problem}); train the head again.")
    return head


def head_problem(head: Mapping[str, np.ndarray]) -> str | None:
    """What is wrong with the arrays of a head.npz (see load_head), or None."""
    missing = [k for k in HEAD_KEYS if k not in head]
    if missing:
        return f"no {', '.join(missing)}"
    weight, names = head["weight"], head["class_names"]
    floats = ("weight", "bias", "mean", "std")
    bad = [k for k in floats if head[k].dtype.kind != "f"]
    if bad or names.dtype.kind != "U" or head["standardized"].dtype != np.bool_:
        return f"wrong types: {', '.join(bad) or 'class_names or standardized'}"
    if weight.ndim != 2 or 0 in weight.shape or names.ndim != 1 or head["standardized"].shape != ():
        return f"weight of shape {weight.shape} with {names.shape} class names"
    k, d = weight.shape
    if len(names) < 2 or k != (1 if len(names) == 2 else len(names)):
        return f"{k} outputs for {len(names)} classes"
    shapes = {"bias": (k,), "mean": (d,), "std": (d,)}
    wrong = [f"{n} {head[n].shape} for {want}" for n, want in shapes.items() if head[n].shape != want]
    if wrong:
        return f"wrong shapes: {', '.join(wrong)}"
    for n in floats:
        if not np.isfinite(head[n]).all():
            return f"NaN or inf in {n}" + (" (the run may have diverged)" if n in ("weight", "bias") else "")
    if not (head["std"] > 0).all():
        return "a std <= 0"
    return None


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
        "summary": {**summary.to_dict(), **split_seconds(result.timings)},
        "history": [r.to_dict() for r in result.history],
        "timings": result.timings,
        "versions": result.versions,
        "cache": result.cache,
        "extra": result.extra,
    }
    text = json.dumps(doc, indent=2, allow_nan=False)
    atomic_write_bytes(run_dir / METRICS_FILE, text.encode())
    return result


def split_seconds(timings: Mapping[str, float]) -> dict:
    """The summary's compile_seconds and train_seconds (a JAX program's compilation and its run, which
    summary.training_time adds up), from timings compile_s and train_s; {} for a run without a compile."""
    if "compile_s" not in timings or "train_s" not in timings:
        return {}
    return {"compile_seconds": float(timings["compile_s"]), "train_seconds": float(timings["train_s"])}


def settings_text(config: TrainConfig) -> str:
    """The key training settings of a run in a few words, for figure titles and the report:
    `sgd lr 0.001 wd 0, 30 epochs, batch 32[, standardized]`."""
    text = (f"{config.optimizer} lr {config.lr:g} wd {config.weight_decay:g}, {config.epochs} epochs, "
            f"batch {config.batch_size}")
    return text + (", standardized" if config.standardize else "")


def is_finished(run_dir: str | Path) -> bool:
    """True when the run directory holds its metrics.json."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def load_run(run_dir: str | Path) -> RunResult:
    """Read a finished run directory back; an unfinished or foreign one is a UserError, and so is a damaged or
    crafted metrics.json (not strict JSON, NaN/inf, a key missing, a value of the wrong type)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "is not a finished run (no metrics.json)"
        raise UserError(f"{run_dir} {what}; pass a run directory written by featcache.")
    try:
        doc = json.loads(path.read_text(), parse_constant=_not_finite, parse_float=_finite_float)
        _check_run_doc(doc)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in doc["config"].items() if k in known})
        return RunResult(
            run_dir=run_dir, mode=doc["mode"], model=doc["model"], config=config,
            summary=RunSummary.from_dict(doc["summary"]),
            history=[EpochRecord.from_dict(r) for r in doc["history"]],
            timings=dict(doc["timings"]), class_names=list(doc["class_names"]), cache=dict(doc.get("cache") or {}),
            versions=dict(doc.get("versions") or {}), extra=dict(doc.get("extra") or {}),
        )
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); check its permissions.") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a featcache run file ({e}); was it edited by hand?") from None


def _not_finite(name: str):
    raise ValueError(f"{name} where a number must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} where a number must be finite")
    return value


def _is_number(v, *, none: bool = True) -> bool:
    return (v is None and none) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _check_run_doc(doc) -> None:
    """ValueError naming the first field of a metrics.json document that finish_run would not have written."""
    _check(isinstance(doc, dict), "not a JSON object")
    _check(doc.get("mode") in MODES, "mode is not one of " + ", ".join(MODES))
    _check(isinstance(doc.get("model"), str), "model is not a string")
    names = doc.get("class_names")
    _check(isinstance(names, list) and len(names) >= 2 and all(isinstance(c, str) for c in names),
           "class_names is not a list of two or more strings")
    _check_config(doc.get("config"))
    _check_summary(doc.get("summary"), len(names))
    history = doc.get("history")
    _check(isinstance(history, list) and all(isinstance(r, dict) for r in history), "history is not a list of epochs")
    for r in history:
        _check(isinstance(r.get("epoch"), int) and not isinstance(r["epoch"], bool), "an epoch number is not an int")
        _check(all(_is_number(r.get(f.name)) for f in dataclasses.fields(EpochRecord)),
               f"epoch {r['epoch']} has a missing or non-numeric value")
    timings = doc.get("timings")
    _check(isinstance(timings, dict) and all(_is_number(v, none=False) for v in timings.values()),
           "timings is not an object of numbers")
    for key in ("cache", "versions", "extra"):
        _check(isinstance(doc.get(key) or {}, dict), f"{key} is not an object")
    _check(all(v is None or isinstance(v, str) for v in (doc.get("cache") or {}).values()),
           "cache holds a value that is not a string")


_CONFIG_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _check_config(config) -> None:
    _check(isinstance(config, dict), "config is not an object")
    for f in dataclasses.fields(TrainConfig):
        kind = type(f.default)
        value = config.get(f.name, f.default)
        ok = isinstance(value, _CONFIG_TYPES[kind]) and (kind is bool or not isinstance(value, bool))
        _check(ok, f"config.{f.name} is not a {kind.__name__}")


def _check_summary(summary, num_classes: int) -> None:
    _check(isinstance(summary, dict), "summary is not an object")
    numbers = ("train_loss", "train_acc", "best_val_loss", "best_val_acc", "test_acc", "training_time",
               "test_loss", "balanced_accuracy", "roc_auc")
    _check(all(_is_number(summary.get(k)) and k in summary for k in numbers), "summary has a non-numeric metric")
    for k in ("precision", "recall", "f1", "support"):
        v = summary.get(k)
        _check(isinstance(v, list) and len(v) == num_classes and all(_is_number(x, none=k != "support") for x in v),
               f"summary.{k} is not one number per class")
    cm = summary.get("confusion_matrix")
    _check(isinstance(cm, list) and len(cm) == num_classes
           and all(isinstance(row, list) and len(row) == num_classes and all(_is_number(x, none=False) for x in row)
                   for row in cm), "summary.confusion_matrix is not a C x C matrix")
    for k in ("selected_epoch", "epochs"):
        _check(isinstance(summary.get(k), int) and not isinstance(summary.get(k), bool), f"summary.{k} is not an int")
    _check(isinstance(summary.get("diverged"), bool), "summary.diverged is not true or false")
    _check(all(_is_number(summary.get(k), none=False) for k in ("compile_seconds", "train_seconds") if k in summary),
           "summary.compile_seconds or train_seconds is not a number")
    _check(summary.get("class_names") == [str(c) for c in summary.get("class_names") or []],
           "summary.class_names is not a list of strings")


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
                   train_labels: np.ndarray | None) -> dict:
    """test_logits.npz of a run; returns its `clinical_record` (for extra["clinical"]). Its figures (roc.png,
    calibration.png) are drawn by plots.draw_run_figures from `test_figures`.

    Args:
        val_logits, test_logits: (N_val, K), (N_test, K) logits of the selected epoch; val_labels, test_labels:
            (N_val,), (N_test,) int; test_paths: (N_test,) image paths relative to the dataset root, row-aligned.
        num_classes: C; config: operating_point, bootstrap, class_weight; train_labels: see clinical_record.
    """
    run_dir = Path(run_dir)
    record = clinical_record(val_logits=val_logits, val_labels=val_labels, test_logits=test_logits,
                             test_labels=test_labels, num_classes=num_classes, config=config, train_labels=train_labels)
    save_test_logits(run_dir / TEST_LOGITS_FILE, logits=test_logits, labels=test_labels, paths=test_paths)
    return record


def test_figures(summary: RunSummary, *, logits: np.ndarray | None = None, labels: np.ndarray | None = None,
                 clinical: Mapping | None = None) -> dict:
    """The "test" entry of plots.draw_run_figures' spec for a run: its confusion matrix and per-class scores
    (from the summary), and with logits (N_test, K) and labels (N_test,) its ROC and calibration figures
    (bins and temperature from the clinical record)."""
    calibration = (clinical or {}).get("calibration") or {}
    return {"class_names": list(summary.class_names), "num_classes": len(summary.class_names),
            "confusion": np.asarray(summary.confusion_matrix, dtype=np.int64),
            "scores": {k: list(getattr(summary, k)) for k in ("precision", "recall", "f1", "support")},
            "logits": None if logits is None else np.asarray(logits, dtype=np.float32),
            "labels": None if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1),
            "bins": calibration.get("bins", 15), "temperature": calibration.get("temperature")}
