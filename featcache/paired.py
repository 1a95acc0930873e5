"""`featcache compare RUN_A RUN_B`: is run A better than run B on the same test images?

The runs' test rows (test_logits.npz) are matched by image path; the test metrics of
metrics.clinical_metric_functions (each run at its own threshold chosen on its own val) are
bootstrapped PAIRED: every resample draws the same rows for both runs (metrics.paired_bootstrap,
stratified, seeded), and the difference A - B gets its 95 % percentile interval and the fraction
of resamples in which A is better. Orchestration: numpy and the core only (the figure through plots).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import metrics, runs
from featcache.config import CompareConfig
from featcache.errors import UserError


@dataclass(frozen=True)
class Comparison:
    """Two runs' paired test metrics: value of each run on all rows and the paired difference A - B."""

    run_a: str
    run_b: str
    rows: int  # shared test images
    num_classes: int
    resamples: int
    seed: int
    values_a: dict[str, float | None]
    values_b: dict[str, float | None]
    differences: dict[str, metrics.PairedDifference]

    def to_dict(self) -> dict:
        """JSON-safe: what `featcache compare --format json` prints."""
        return {"run_a": self.run_a, "run_b": self.run_b, "rows": self.rows, "num_classes": self.num_classes,
                "resamples": self.resamples, "seed": self.seed, "stratified": True, "confidence": 0.95,
                "values_a": self.values_a, "values_b": self.values_b,
                "differences": {k: v.to_dict() for k, v in self.differences.items()}}

    def table(self) -> str:
        """The plain-text table `featcache compare` prints."""
        def num(x, signed=False):
            return "-" if x is None else (f"{x:+.4f}" if signed else f"{x:.4f}")

        lines = [f"Paired comparison on {self.rows} shared test images, {self.num_classes} classes, "
                 f"{self.resamples} stratified bootstrap resamples (seed {self.seed}); same rows drawn for A and B.",
                 f"A: {self.run_a}", f"B: {self.run_b}",
                 f"{'metric':<18} {'A':>8} {'B':>8} {'A - B':>8}  {'95 % interval':<20} {'A wins':>7}"]
        for name, d in self.differences.items():
            interval = "-" if d.low is None else f"[{num(d.low, True)}, {num(d.high, True)}]"
            wins = "-" if d.a_wins is None else f"{d.a_wins:.3f}"
            lines.append(f"{name:<18} {num(self.values_a[name]):>8} {num(self.values_b[name]):>8} "
                         f"{num(d.point, True):>8}  {interval:<20} {wins:>7}")
        lines.append("A wins: fraction of resamples with A - B > 0 (ties count for neither); intervals are "
                     "percentiles of the paired differences.")
        return "\n".join(lines) + "\n"


def matched_rows(a: runs.ScoredRows, b: runs.ScoredRows, *, names: tuple[str, str]) -> np.ndarray:
    """(N,) int64: for each of A's test rows the row of B with the same image path; a UserError when the two
    runs were not tested on the same images (or give one image different labels)."""
    only_a, only_b = set(a.paths) - set(b.paths), set(b.paths) - set(a.paths)
    if only_a or only_b or len(set(a.paths)) != len(a.paths) or len(a.paths) != len(b.paths):
        example = sorted(only_a or only_b or [""])[0]
        raise UserError(f"{names[0]} and {names[1]} were not tested on the same images ({len(only_a)} only in A, "
                        f"{len(only_b)} only in B{', e.g. ' + example if example else ''}); a paired comparison "
                        f"needs one test set, so compare runs of the same dataset and split.")
    where = {p: i for i, p in enumerate(b.paths)}
    order = np.array([where[p] for p in a.paths], dtype=np.int64)
    if not np.array_equal(a.labels, b.labels[order]):
        raise UserError(f"{names[0]} and {names[1]} give the same test images different labels; "
                        f"compare runs of the same dataset.")
    return order


def _threshold(run: runs.RunResult) -> float | None:
    """The run's operating-point threshold chosen on its val (extra["clinical"]), None without one."""
    point = (run.extra.get("clinical") or {}).get("operating_point") or {}
    return point.get("threshold")


def compare_paired(run_a: str | Path, run_b: str | Path, *, config: CompareConfig = CompareConfig()) -> Comparison:
    """The paired bootstrap of two runs' test metrics on their shared test images (what `featcache compare` does).

    Args:
        run_a, run_b: finished run directories, each with its test_logits.npz.
        config: resamples and seed of the bootstrap, and the figure (both runs' ROC curves) to draw.

    Returns:
        The Comparison. Runs with different test images or different classes: a one-sentence UserError.
        With two classes the operating-point metrics are each run's at its own val-chosen threshold
        (left out when either run has none).
    """
    if config.bootstrap < 1:
        raise UserError(f"--bootstrap must be a positive number of resamples, got {config.bootstrap}.")
    loaded = [runs.load_run(r) for r in (run_a, run_b)]
    names = (str(run_a), str(run_b))
    if loaded[0].class_names != loaded[1].class_names:
        raise UserError(f"{names[0]} and {names[1]} have different classes ({', '.join(loaded[0].class_names)} vs "
                        f"{', '.join(loaded[1].class_names)}); compare runs of the same dataset.")
    a, b = (runs.load_test_logits(r) for r in (run_a, run_b))
    order = matched_rows(a, b, names=names)
    c = len(loaded[0].class_names)
    thresholds = [_threshold(r) for r in loaded]
    if None in thresholds:
        thresholds = [None, None]
    fns_a, fns_b = (metrics.clinical_metric_functions(num_classes=c, threshold=t) for t in thresholds)
    y, x_a, x_b = a.labels, a.logits, b.logits[order]
    differences = metrics.paired_bootstrap(fns_a, labels=y, scores_a=x_a, scores_b=x_b, metrics_b=fns_b,
                                           resamples=config.bootstrap, seed=config.seed)
    if config.figure:
        from featcache.plots import plot_roc

        labels = [f"{k} {r.model}/{r.mode}" for k, r in zip("AB", loaded)]
        plot_roc({labels[0]: (x_a, y), labels[1]: (x_b, y)}, config.figure, "ROC on the shared test images",
                 num_classes=c)
    return Comparison(run_a=names[0], run_b=names[1], rows=len(y), num_classes=c, resamples=config.bootstrap,
                      seed=config.seed, values_a={k: f(y, x_a) for k, f in fns_a.items()},
                      values_b={k: f(y, x_b) for k, f in fns_b.items()}, differences=differences)
