"""Do two sets of cached features (train vs test, or two datasets) come from the same distribution? (numpy only)

Side A is the reference (train, or the first cache), side B the one checked against it (test, or
the second cache). Features are z-scored with the pooled mean and std of both sides first.

* Domain classifier: a linear ridge classifier on the label "row is from B", k-fold
  cross-validated (folds stratified by side), scored by ROC-AUC on each held-out fold and
  averaged over the folds: 0.5 = the sides cannot be told apart, 1 = fully separable. Its ridge
  strength is l2_scale times the mean eigenvalue of the fold's scatter matrix Xc'Xc (fixed, so the
  permutation test below stays exact). Permutation p-value: the same folds and fits with the side
  labels shuffled P times, p = (1 + #{AUC_perm >= AUC}) / (1 + P). Every fit of a fold shares one
  solve of its Gram matrix, so P permutations cost one matrix product each.
* Per-class mean distance: for each class present on both sides, the distance between its mean
  feature vector on A and on B, beside the distance sampling noise alone gives on average,
  sqrt(tr S_A / n_A + tr S_B / n_B) (S = the class's covariance on that side), their ratio
  (about 1 without shift) and the distance from the class's A mean to the nearest other class's
  A mean (how far apart the classes are, for scale).
* Most foreign rows: the B rows with the highest out-of-fold domain score, each with its nearest
  A rows (Euclidean, in the z-scored space) and their image paths, beside the median distance
  of a B row to its nearest A row.

N = rows, D = feature dim, P = permutations, k = folds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from featcache import metrics
from featcache.errors import UserError
from featcache.standardize import standardization

@dataclass(frozen=True)
class Side:
    """One side of the comparison: features, labels, class names and image paths of its rows."""

    name: str
    features: np.ndarray  # (N, D)
    labels: np.ndarray  # (N,) int, indices into class_names
    class_names: list[str]
    paths: list[str]  # (N,), relative to the dataset root


@dataclass(frozen=True)
class ShiftReport:
    """What `featcache shift` prints (to_dict: what --json writes)."""

    a: str
    b: str
    n_a: int
    n_b: int
    dim: int
    auc: float  # mean over folds of the held-out ROC-AUC
    fold_aucs: list[float]
    p_value: float
    permutations: int
    folds: int
    classes: list[dict]  # per class: class, n_a, n_b, distance, chance, ratio, nearest_other_class
    foreign: list[dict]  # per foreign B row: path, score, neighbours [{path, distance}]
    typical_nearest: float  # median over B rows of the distance to the nearest A row
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def shifted(self) -> bool:
        """The domain classifier beats chance at the 5 % level."""
        return self.p_value < 0.05

    def verdict(self) -> str:
        """One sentence: is there a detectable shift, with AUC and p-value."""
        stats = f"cross-validated AUC {self.auc:.3f}, permutation p = {self.p_value:.3g} ({self.permutations} permutations)"
        if self.shifted:
            return (f"Shift detected: a linear classifier tells {self.b} from {self.a} better than chance ({stats}).")
        return f"No detectable shift: {self.b} and {self.a} look alike to a linear classifier ({stats})."

    def to_dict(self) -> dict:
        return {**asdict(self), "shifted": self.shifted, "verdict": self.verdict()}


def _folds(side: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) fold index of each row, stratified by side: each side's rows in random order, dealt round-robin."""
    fold = np.empty(len(side), dtype=np.int64)
    for s in (0, 1):
        rows = np.flatnonzero(side == s)
        fold[rng.permutation(rows)] = np.arange(len(rows)) % k
    return fold


def _heldout_scores(x: np.ndarray, targets: np.ndarray, train: np.ndarray, test: np.ndarray,
                    l2_scale: float) -> np.ndarray:
    """Ridge scores (len(test), T) of the held-out rows for every target column of targets (N, T) at once."""
    xt = x[train]
    x_mean = xt.mean(axis=0)
    xc, xv = xt - x_mean, x[test] - x_mean  # (n_T, D), (n_V, D)
    n, d = xc.shape
    # targets need no centring: Xc' 1 = 0, so the constant part of a target column drops out of W
    if d <= n:
        gram = xc.T @ xc  # (D, D)
        l2 = l2_scale * np.trace(gram) / d
        return xv @ np.linalg.solve(gram + l2 * np.eye(d), xc.T @ targets[train])
    gram = xc @ xc.T  # (n_T, n_T); same mean eigenvalue scale: trace / D
    l2 = l2_scale * np.trace(gram) / d
    return (xv @ xc.T) @ np.linalg.solve(gram + l2 * np.eye(n), targets[train])


def _nearest(query: np.ndarray, ref: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Indices (M, k) and Euclidean distances (M, k) of the k nearest ref rows of each query row."""
    ref_sq = (ref ** 2).sum(axis=1)
    idx, dist = [], []
    for start in range(0, len(query), chunk):
        q = query[start:start + chunk]
        d2 = np.maximum((q ** 2).sum(axis=1)[:, None] - 2 * q @ ref.T + ref_sq[None], 0.0)  # (m, N_ref)
        part = np.argpartition(d2, min(k, d2.shape[1] - 1), axis=1)[:, :k]
        order = np.take_along_axis(d2, part, axis=1).argsort(axis=1)
        top = np.take_along_axis(part, order, axis=1)
        idx.append(top)
        dist.append(np.sqrt(np.take_along_axis(d2, top, axis=1)))
    return np.concatenate(idx), np.concatenate(dist)


def _class_rows(a: Side, b: Side, za: np.ndarray, zb: np.ndarray) -> tuple[list[dict], list[str]]:
    """Per-class mean distances (z-scored space) for the classes both sides have."""
    shared = [c for c in a.class_names if c in b.class_names]
    means_a = {c: za[a.labels == i].mean(axis=0) for i, c in enumerate(a.class_names) if (a.labels == i).any()}
    rows = []
    for c in shared:
        ra, rb = za[a.labels == a.class_names.index(c)], zb[b.labels == b.class_names.index(c)]
        if len(ra) == 0 or len(rb) == 0:
            continue
        distance = float(np.linalg.norm(ra.mean(axis=0) - rb.mean(axis=0)))
        if len(ra) > 1 and len(rb) > 1:
            chance = math.sqrt(ra.var(axis=0, ddof=1).sum() / len(ra) + rb.var(axis=0, ddof=1).sum() / len(rb))
        else:
            chance = float("nan")
        others = [float(np.linalg.norm(means_a[c] - m)) for o, m in means_a.items() if o != c]
        rows.append({"class": c, "n_a": int(len(ra)), "n_b": int(len(rb)), "distance": distance, "chance": chance,
                     "ratio": distance / chance if chance > 0 else float("nan"),
                     "nearest_other_class": min(others) if others else float("nan")})
    only = sorted(set(a.class_names) ^ set(b.class_names))
    notes = [f"classes on one side only (no distance): {', '.join(only)}"] if only else []
    return rows, notes


def check_shift(a: Side, b: Side, *, folds: int = 5, permutations: int = 200, seed: int = 0, l2_scale: float = 1.0,
                top: int = 5, neighbours: int = 3, max_rows: int | None = 5000) -> ShiftReport:
    """Compare side B against side A (see the module docstring).

    Args:
        a, b: the two sides (same feature dimension).
        folds: k of the cross-validation (each side needs at least k rows).
        permutations: P shuffles of the side labels for the p-value (0: no test, p = nan).
        seed: seed of the subsampling, the folds and the permutations.
        l2_scale: ridge strength of the domain classifier in units of the mean scatter eigenvalue.
        top: how many of the most foreign B rows to list.
        neighbours: nearest A rows listed for each.
        max_rows: at most this many rows per side (a seeded random subset, noted), None = all.

    Returns:
        ShiftReport.
    """
    t0 = time.perf_counter()
    if a.features.shape[1] != b.features.shape[1]:
        raise UserError(f"{a.name} has {a.features.shape[1]} features per row and {b.name} "
                        f"{b.features.shape[1]}; compare features of the same backbone.")
    if folds < 2:
        raise UserError("--folds must be at least 2.")
    rng = np.random.default_rng(seed)
    (a, b), notes = _subsampled((a, b), folds=folds, max_rows=max_rows, rng=rng)

    x = np.concatenate([a.features, b.features]).astype(np.float64)  # (N, D)
    mean, std = standardization(x)
    z = (x - mean) / std
    side = np.r_[np.zeros(len(a.labels), np.int64), np.ones(len(b.labels), np.int64)]
    aucs, oof = _domain_aucs(z, side, folds=folds, permutations=permutations, l2_scale=l2_scale, rng=rng)
    mean_auc = np.nanmean(aucs, axis=0)  # (1 + P,)
    auc = float(mean_auc[0])
    p_value = float((1 + np.sum(mean_auc[1:] >= auc)) / (1 + permutations)) if permutations else float("nan")

    za, zb = z[side == 0], z[side == 1]
    classes, class_notes = _class_rows(a, b, za, zb)
    nn_idx, nn_dist = _nearest(zb, za, neighbours)
    order = np.argsort(-oof[side == 1], kind="stable")[:top]
    foreign = [{"path": b.paths[i], "score": float(oof[side == 1][i]),
                "neighbours": [{"path": a.paths[j], "distance": float(dd)} for j, dd in zip(nn_idx[i], nn_dist[i])]}
               for i in order]
    return ShiftReport(a=a.name, b=b.name, n_a=len(a.labels), n_b=len(b.labels), dim=int(x.shape[1]), auc=auc,
                       fold_aucs=[float(v) for v in aucs[:, 0]], p_value=p_value, permutations=permutations,
                       folds=folds, classes=classes, foreign=foreign, typical_nearest=float(np.median(nn_dist[:, 0])),
                       seconds=time.perf_counter() - t0, notes=notes + class_notes)


def _subsampled(sides: Sequence[Side], *, folds: int, max_rows: int | None, rng: np.random.Generator
                ) -> tuple[list[Side], list[str]]:
    """The sides, each cut to a seeded random max_rows of its rows when larger (noted); a side with fewer rows
    than folds is a UserError."""
    out, notes = [], []
    for s in sides:
        if len(s.labels) < folds:
            raise UserError(f"{s.name} has {len(s.labels)} rows, fewer than the {folds} folds; "
                            "lower --folds or use a larger split.")
        if max_rows is not None and len(s.labels) > max_rows:
            keep = np.sort(rng.choice(len(s.labels), size=max_rows, replace=False))
            notes.append(f"{s.name}: a random {max_rows} of its {len(s.labels)} rows")
            s = Side(name=s.name, features=s.features[keep], labels=s.labels[keep], class_names=s.class_names,
                     paths=[s.paths[i] for i in keep])
        out.append(s)
    return out, notes


def _domain_aucs(z: np.ndarray, side: np.ndarray, *, folds: int, permutations: int, l2_scale: float,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The domain classifier, cross-validated: held-out ROC-AUC (folds, 1 + P) of the true side labels (column 0)
    and of P shuffles of them, and the out-of-fold score (N,) of each row under the true labels.

    z (N, D) z-scored rows of both sides; side (N,) 0 = A, 1 = B.
    """
    fold = _folds(side, folds, rng)
    targets = np.stack([side] + [rng.permutation(side) for _ in range(permutations)], axis=1).astype(np.float64)
    aucs = np.full((folds, 1 + permutations), np.nan)
    oof = np.empty(len(side))
    for f in range(folds):
        train, test = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        scores = _heldout_scores(z, targets, train, test, l2_scale)  # (n_V, 1 + P)
        oof[test] = scores[:, 0]
        for j in range(1 + permutations):
            auc = metrics.roc_auc(scores[:, j], targets[test, j])
            aucs[f, j] = np.nan if auc is None else auc
    return aucs, oof


def _side(path: str | Path, splits: Sequence[str], name: str) -> tuple[Side, dict]:
    from featcache.cache import load_features, load_paths, read_meta

    meta = read_meta(path)
    missing = [s for s in splits if s not in meta["splits"]]
    if missing:
        raise UserError(f"{path} has no split {missing[0]!r} (it has {', '.join(meta['splits'])}).")
    parts = [load_features(path, s)[:2] for s in splits]
    paths = [p for s in splits for p in load_paths(path, s)]
    return Side(name=name, features=np.concatenate([p[0] for p in parts]), labels=np.concatenate([p[1] for p in parts]),
                class_names=list(meta["class_names"]), paths=paths), meta


def check_cache(cache: str | Path, **options) -> ShiftReport:
    """Train split (A) against test split (B) of one cache file; options as check_shift."""
    a, _ = _side(cache, ["train"], "train")
    b, _ = _side(cache, ["test"], "test")
    return check_shift(a, b, **options)


def check_between(cache_a: str | Path, cache_b: str | Path, *, split: str = "all", **options) -> ShiftReport:
    """Cache A against cache B (same backbone, weights and transform); split "all" pools every split of each."""
    from featcache.cache import SPLITS

    splits = list(SPLITS) if split == "all" else [split]
    a, meta_a = _side(cache_a, splits, Path(cache_a).name)
    b, meta_b = _side(cache_b, splits, Path(cache_b).name)
    for key in ("model", "weights", "weights_sha256", "transform", "feature_dim"):
        if meta_a.get(key) != meta_b.get(key):
            raise UserError(f"{a.name} and {b.name} differ in {key} ({meta_a.get(key)} vs {meta_b.get(key)}); "
                            "their features are not comparable. Extract both datasets with the same model, weights "
                            "and image size.")
    return check_shift(a, b, **options)


def print_report(report: ShiftReport, *, json_path: str | Path | None = None) -> None:
    """Print the shift check as tables (and write its JSON when json_path is given)."""
    from featcache.reporting import print_table

    print_table([{"A (reference)": f"{report.a} ({report.n_a} rows)", "B (checked)": f"{report.b} ({report.n_b} rows)",
                  "D": report.dim, "domain AUC": report.auc,
                  "fold AUCs": " ".join(f"{v:.3f}" for v in report.fold_aucs), "p-value": report.p_value,
                  "seconds": report.seconds}], title="Domain classifier: B vs A (linear, cross-validated)")
    if report.classes:
        print_table([{"class": r["class"], "n A": r["n_a"], "n B": r["n_b"], "mean distance": r["distance"],
                      "by chance": r["chance"], "ratio": r["ratio"], "to nearest other class": r["nearest_other_class"]}
                     for r in report.classes],
                    title="Per-class mean-feature distance, B vs A (z-scored features; ratio ~1 = no shift)")
    if report.foreign:
        print_table([{"B row (most foreign first)": r["path"], "score": r["score"],
                      "nearest A rows (distance)": "\n".join(f"{n['path']} ({n['distance']:.2f})"
                                                             for n in r["neighbours"])}
                     for r in report.foreign],
                    title=f"Most foreign B rows and their nearest A rows (median nearest distance of a B row: "
                          f"{report.typical_nearest:.2f})")
    for note in report.notes:
        print(f"note: {note}")
    print(report.verdict())
    if json_path is not None:
        Path(json_path).write_text(json.dumps(_finite(report.to_dict()), indent=2, allow_nan=False))


def _finite(o):
    """o with every non-finite float replaced by None (strict JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o
