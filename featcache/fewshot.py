"""Few-shot probes: K train rows per class drawn R times, a probe fitted on each draw, mean and 95 %
interval over the draws (big_vision's few-shot evaluator, CLIP_benchmark's fewshot_k, UNI's SimpleShot).

C = classes, R = draws per K, S = the shot counts asked for (K values), P = S * R problems, M = the
largest K times C (train rows of the largest draw).

Draws come from the train split only, never from val or test (CLIP_benchmark#125 leaked val rows
into its draws). Draw d of K shots is seeded by (seed, K, d) alone, so it does not depend on the
other K values or on how many draws are asked for; it is stored as train row indices (the caller
turns them into paths). Every problem of every K runs in ONE compiled program: the L-BFGS probe
vmaps the C grid fit over the P problems (each padded to M rows, padding masked out of the loss);
the k-NN probe searches the P train sets side by side, k clipped to K * C.

Each draw selects its own C (or k) on the whole val split, by the rule of the full-data probe;
standardization (L-BFGS, optional) uses the mean and std of the whole train split's features
(train only, labels unused). The interval is metrics.mean_interval (t-interval over the draws).

Never imports torch.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from featcache import knn, lbfgs, metrics
from featcache.errors import UserError
from featcache.metrics import EpochRecord, Interval, RunSummary, mean_interval
from featcache.plan import num_outputs_for
from featcache.standardize import standardization

Arrays = tuple[np.ndarray, np.ndarray]  # features (N, D), labels (N,)


def check_shots(shots: Sequence[int], draws: int) -> tuple[int, ...]:
    """Sorted distinct shot counts; UserError for a count or a number of draws below 1."""
    values = sorted({int(k) for k in shots})
    if not values or values[0] < 1:
        raise UserError(f"Shots must be at least 1 per class, got {values[0] if values else 'none'}; give e.g. 1,5,10.")
    if draws < 1:
        raise UserError(f"Draws must be at least 1, got {draws}.")
    return tuple(values)


def draw_shots(labels: np.ndarray, *, shots: int, draws: int, seed: int, num_classes: int,
               class_names: Sequence[str] | None = None) -> np.ndarray:
    """(draws, shots * C) int64 train row indices: per draw, `shots` distinct rows of each class, class by class,
    rows ascending within a class. UserError when a class has fewer than `shots` train rows."""
    y = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y, minlength=num_classes)
    smallest = int(np.argmin(counts))
    if counts[smallest] < shots:
        name = class_names[smallest] if class_names is not None else str(smallest)
        raise UserError(f"{shots} shots per class is more than class {name!r} has in train ({counts[smallest]} "
                        f"rows); give at most {counts[smallest]} shots.")
    members = [np.flatnonzero(y == c) for c in range(num_classes)]
    out = np.empty((draws, shots * num_classes), dtype=np.int64)
    for d in range(draws):
        rng = np.random.default_rng([seed, shots, d])
        out[d] = np.concatenate([np.sort(rng.choice(rows, size=shots, replace=False)) for rows in members])
    return out


@dataclass(frozen=True)
class ShotResult:
    """One K: every draw's rows, choice and scores, and the intervals over the draws."""

    shots: int
    rows: np.ndarray  # (R, shots * C) int64 train row indices of each draw
    selected: np.ndarray  # (R,) the C (lbfgs) or k (knn) each draw selected on val
    val_acc: np.ndarray  # (R,) at the selected C / k
    summaries: list[RunSummary]  # (R,) test scores of each draw's probe
    test_scores: np.ndarray  # (R, N_test, K) float each draw's test logits (lbfgs) or vote scores (knn)
    test_acc: Interval  # mean and 95 % t-interval over the draws
    balanced_accuracy: Interval

    def to_dict(self) -> dict:
        """JSON-safe (rows left out: the caller stores them as paths)."""
        return {"shots": self.shots, "draws": len(self.rows), "selected": self.selected.tolist(),
                "val_acc": self.val_acc.tolist(), "test_acc": self.test_acc.to_dict(),
                "balanced_accuracy": self.balanced_accuracy.to_dict(),
                "test_acc_per_draw": [s.test_acc for s in self.summaries]}


@dataclass(frozen=True)
class FewShotFit:
    """Every K of a few-shot evaluation with one solver."""

    solver: str  # "lbfgs" or "knn"
    seed: int
    results: list[ShotResult]  # one per K, ascending
    timings: dict  # compile_s / fit_s (lbfgs) or search_s (knn), seconds

    def to_dict(self) -> dict:
        return {"solver": self.solver, "seed": self.seed, "results": [r.to_dict() for r in self.results],
                "timings": self.timings}


def _result(shots: int, rows: np.ndarray, selected: np.ndarray, val_acc: np.ndarray,
            summaries: list[RunSummary], test_scores: list[np.ndarray]) -> ShotResult:
    return ShotResult(shots=shots, rows=rows, selected=selected, val_acc=val_acc, summaries=summaries,
                      test_scores=np.stack(test_scores),
                      test_acc=mean_interval([s.test_acc for s in summaries]),
                      balanced_accuracy=mean_interval([s.balanced_accuracy for s in summaries]))


def _problems(y_train: np.ndarray, shots: tuple[int, ...], *, draws: int, seed: int, num_classes: int,
              class_names) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Per K the (R, K * C) draws; all P problems as rows (P, M) padded with row 0 and mask (P, M)."""
    per_k = [draw_shots(y_train, shots=k, draws=draws, seed=seed, num_classes=num_classes, class_names=class_names)
             for k in shots]
    width = max(r.shape[1] for r in per_k)
    rows = np.zeros((len(shots) * draws, width), dtype=np.int64)
    mask = np.zeros((len(shots) * draws, width), dtype=bool)
    for i, r in enumerate(per_k):
        rows[i * draws:(i + 1) * draws, :r.shape[1]] = r
        mask[i * draws:(i + 1) * draws, :r.shape[1]] = True
    return per_k, rows, mask


def _summary(history: list[EpochRecord], scores: np.ndarray, y_test: np.ndarray, names: list[str],
             seconds: float) -> RunSummary:
    return metrics.summarize(history, 0, test_logits=scores, test_labels=y_test, class_names=names,
                             train_seconds=seconds, diverged=False)


def _lbfgs_problems(xs: np.ndarray, ys: np.ndarray, mask: np.ndarray, val: Arrays, x_test: np.ndarray,
                    cs: np.ndarray, *, num_classes: int, tol: float, max_iter: int, parallel: int | None
                    ) -> tuple[list[tuple[float, EpochRecord, np.ndarray]], dict]:
    """Fit the C grid on P problems xs (P, M, D) / ys (P, M) / mask (P, M) in one program, select C per problem
    on val: per problem (selected C, its EpochRecord, test logits (N_test, K)), and the program's timings."""
    lbfgs.check_solver_settings(tol, max_iter)
    x_val, y_val = val
    if parallel is None:  # the P problems sit side by side already: P * M rows per C
        parallel = lbfgs.default_parallel(len(cs), rows=xs.shape[0] * xs.shape[1], dim=xs.shape[2])
    args = (jnp.asarray(xs), jnp.asarray(ys, jnp.int32), jnp.asarray(mask, jnp.float32), jnp.asarray(x_val),
            jnp.asarray(y_val, jnp.int32), jnp.asarray(cs, jnp.float32))
    out, compile_s, fit_s = lbfgs.compiled_call(lbfgs.problems_program, *args, num_outputs=num_outputs_for(num_classes),
                                                tol=float(tol), max_iter=int(max_iter), parallel=max(1, int(parallel)))
    x_test_device = jnp.asarray(x_test)
    problems = []
    for p in range(len(xs)):
        path = lbfgs.path_from_outputs({key: value[p] for key, value in out.items()}, cs, tol=tol,
                                       n_train=int(mask[p].sum()), n_val=len(y_val), timings={})
        i = path.select()
        logits = np.asarray(lbfgs.linear_logits(x_test_device, jnp.asarray(path.weights[i]),
                                                jnp.asarray(path.biases[i])))
        problems.append((float(path.cs[i]), path.records()[i], logits))
    return problems, {"compile_s": compile_s, "fit_s": fit_s, "parallel": parallel}


def fewshot_lbfgs(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, shots: Sequence[int], draws: int,
                  seed: int = 0, cs: Sequence[float] = lbfgs.DEFAULT_CS, standardize: bool = False,
                  tol: float = lbfgs.DEFAULT_TOL, max_iter: int = lbfgs.DEFAULT_MAX_ITER,
                  parallel: int | None = None, class_names: Sequence[str] | None = None) -> FewShotFit:
    """The L-BFGS probe on `draws` draws of every K in `shots`, all in one program; C selected per draw on val.

    Args:
        train, val, test: (features (N, D), labels (N,)).
        num_classes: C >= 2.
        shots: K values (rows per class per draw).
        draws: R draws per K.
        seed: seeds the draws (module docstring).
        cs: the C grid; one value = a fixed C.
        standardize, tol, max_iter, parallel: as lbfgs.fit_lbfgs / lbfgs.lbfgs_path.
        class_names: C names for summaries and messages.

    Returns:
        FewShotFit with solver "lbfgs"; ShotResult.selected holds each draw's C.
    """
    t0 = time.perf_counter()
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    shots = check_shots(shots, draws)
    c = lbfgs.check_cs(cs)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = lbfgs.check_splits((train, val, test), num_classes)
    per_k, rows, mask = _problems(y_train, shots, draws=draws, seed=seed, num_classes=num_classes, class_names=names)
    if standardize:
        mean, std = standardization(x_train)
        x_train, x_val, x_test = ((x - mean) / std for x in (x_train, x_val, x_test))
    problems, timings = _lbfgs_problems(x_train[rows], y_train[rows], mask, (x_val, y_val), x_test, c,
                                        num_classes=num_classes, tol=tol, max_iter=max_iter, parallel=parallel)
    seconds = time.perf_counter() - t0
    results = []
    for s, (k, r) in enumerate(zip(shots, per_k)):
        mine = problems[s * draws:(s + 1) * draws]
        summaries = [_summary([dataclasses.replace(rec, epoch=1, seconds=seconds)], logits, y_test, names, seconds)
                     for _, rec, logits in mine]
        results.append(_result(k, r, np.array([m[0] for m in mine]), np.array([m[1].val_acc for m in mine]),
                               summaries, [m[2] for m in mine]))
    return FewShotFit(solver="lbfgs", seed=seed, results=results, timings={**timings, "seconds": seconds})


def _knn_draw(labels: np.ndarray, sims: np.ndarray, *, ks: tuple[int, ...], y_val: np.ndarray, y_test: np.ndarray,
              num_classes: int, temperature: float | None, names: list[str], seconds: float
              ) -> tuple[int, float, RunSummary, np.ndarray]:
    """One draw's k-NN probe from its neighbours (val rows, then test rows): (selected k, its val acc, test summary,
    test scores (N_test, K)).

    labels / sims (Q, k_max): classes and similarities of each query's nearest rows of the draw, nearest first.
    """
    acc = knn.score_ks(labels, sims, [y_val, y_test], ks=ks, num_classes=num_classes, temperature=temperature)
    i = knn.select_k(acc[:, 0])
    test = slice(len(y_val), None)
    shares = list(knn.vote_shares(labels[test], sims[test], ks=ks[:i + 1], num_classes=num_classes,
                                  temperature=temperature))[-1]
    nan = float("nan")
    record = EpochRecord(epoch=1, lr=nan, train_loss=nan, train_acc=nan, val_loss=nan, val_acc=float(acc[i, 0]),
                         seconds=seconds)
    scores = knn.head_scores(shares, num_classes)
    summary = _summary([record], scores, y_test, names, seconds)
    return ks[i], float(acc[i, 0]), dataclasses.replace(summary, test_loss=nan), scores


def _search_draws(x_train: np.ndarray, rows: np.ndarray, mask: np.ndarray, queries: np.ndarray, k: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest rows of every problem's train set for each query, one program: sims (P, Q, k) and positions
    into each problem's rows (P, Q, k)."""
    block = knn.query_block_rows(len(queries), rows.size)  # P sets side by side: P * M similarities per query
    sets = knn.normalize_rows(x_train[rows].reshape(-1, x_train.shape[1])).reshape(rows.shape + (-1,))
    sims, pos = knn.search_sets(knn.query_blocks(queries, block), jnp.asarray(sets), jnp.asarray(mask), k=k)
    sims = np.asarray(sims).reshape(len(rows), -1, k)[:, :len(queries)]
    return sims, np.asarray(pos).reshape(len(rows), -1, k)[:, :len(queries)].astype(np.int64)


def fewshot_knn(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, shots: Sequence[int], draws: int,
                seed: int = 0, ks: Sequence[int] | None = None, temperature: float | None = knn.TEMPERATURE,
                class_names: Sequence[str] | None = None) -> FewShotFit:
    """The k-NN probe on `draws` draws of every K in `shots`, all train sets searched in one program; k (clipped
    to K * C) selected per draw on val.

    Args:
        train, val, test: (features (N, D), labels (N,)).
        num_classes: C >= 2.
        shots, draws, seed: as fewshot_lbfgs.
        ks: k values (None = knn.DEFAULT_KS); a k above K * C becomes K * C for that K.
        temperature: vote weights exp(sim / T); None = uniform votes.
        class_names: C names for summaries and messages.

    Returns:
        FewShotFit with solver "knn"; ShotResult.selected holds each draw's k.
    """
    t0 = time.perf_counter()
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    shots = check_shots(shots, draws)
    knn.check_temperature(temperature)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = lbfgs.check_splits((train, val, test), num_classes)
    ks_for = {k: knn.check_ks([min(v, k * num_classes) for v in (ks or knn.DEFAULT_KS)], k * num_classes)
              for k in shots}
    per_k, rows, mask = _problems(y_train, shots, draws=draws, seed=seed, num_classes=num_classes, class_names=names)
    sims, pos = _search_draws(x_train, rows, mask, np.concatenate([x_val, x_test]),
                              max(v[-1] for v in ks_for.values()))
    search_s = time.perf_counter() - t0
    results = []
    for s, (k, r) in enumerate(zip(shots, per_k)):
        draws_out = [_knn_draw(y_train[rows[p]][pos[p]], sims[p], ks=ks_for[k], y_val=y_val, y_test=y_test,
                               num_classes=num_classes, temperature=temperature, names=names, seconds=search_s)
                     for p in range(s * draws, (s + 1) * draws)]
        results.append(_result(k, r, np.array([d[0] for d in draws_out]), np.array([d[1] for d in draws_out]),
                               [d[2] for d in draws_out], [d[3] for d in draws_out]))
    return FewShotFit(solver="knn", seed=seed, results=results,
                      timings={"search_s": search_s, "seconds": time.perf_counter() - t0})
