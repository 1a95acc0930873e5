"""The linear probe: multinomial logistic regression by full-batch L-BFGS, a whole grid of L2 strengths C
fitted as ONE jit-compiled program (the protocol of CLIP's, dinov2's and UNI's linear probes).

N = train rows, D = feature dim, C = classes, K = logits (1 for two classes, else C), L = values in the
C grid, P = independent problems (few-shot draws) fitted side by side.

Objective for one C: scikit-learn's LogisticRegression(C=C, solver="lbfgs") (multinomial for C > 2),
divided by N as scikit-learn divides it internally, so the same tolerance means the same thing:

    f_C(W, b) = (1/N) sum_i loss(W x_i + b, y_i) + ||W||^2 / (2 C N)

loss = BCE on one logit for two classes (class 1 positive), softmax cross-entropy on C logits
otherwise (head.masked_loss, the loss of every featcache head); the bias b is not penalised.

Solver: optax.lbfgs (memory 10, scipy's default) with optax's zoom line search (at most 50 steps,
scikit-learn's maxls; first guess 1), from W = 0, b = 0, one lax.while_loop per C. A C stops at the
first of: max |grad f_C| <= tol (scipy's pgtol, what scikit-learn's `tol` sets; default 1e-4 as
there) -- `converged`; STALL_ITERS iterations in a row that lower f_C by no more than float32
resolves (FTOL relative, as scipy's ftol) -- `stalled`; max_iter iterations. Everything is float32.

The grid: ONE program runs every C (lax.map over the grid), `parallel` of them side by side (vmapped),
the groups one after another. Side by side, every C of a group does the work of the group's slowest
C (finished ones stand still), and the line search's lax.cond, vmapped, copies its operands -- the
train features -- once per C. On a CPU one C at a time is fastest (benchmarks/probe_bench.py: 2.6 s
against 82 s side by side for 32 C on 1,259 x 512 features); on an accelerator the group runs in
parallel (default_parallel). Either way each C's result is that C's own fit (the same program over a
one-value grid gives the same numbers; side by side, the same up to float32 rounding).

Selection: the C with the best val accuracy; ties go to the lower val loss, then to the smaller C
(metrics.select_epoch's rule over the grid sorted ascending). The result is the fit on train at that
C -- no refit on train + val; test data never takes part in the choice.

Never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from featcache import metrics
from featcache.errors import UserError
from featcache.head import masked_loss, predictions
from featcache.metrics import EpochRecord, RunSummary
from featcache.plan import num_outputs_for
from featcache.standardize import standardization

DEFAULT_CS = tuple(float(c) for c in np.logspace(-6, 6, 32))  # dinov2's / CLIP's sweep range
DEFAULT_TOL = 1e-4  # max |gradient| of the N-scaled objective: scikit-learn's default tol (scipy's pgtol)
DEFAULT_MAX_ITER = 1000  # CLIP's max_iter
MEMORY_SIZE = 10  # L-BFGS history: scipy's maxcor default, what scikit-learn uses
LINESEARCH_STEPS = 50  # zoom line-search steps per iteration: scikit-learn's maxls
FTOL = 4 * float(np.finfo(np.float32).eps)  # a decrease below FTOL * max(|f|, 1) is float32 rounding ...
STALL_ITERS = 3  # ... and STALL_ITERS such iterations in a row stop the C

Arrays = tuple[np.ndarray, np.ndarray]  # features (N, D), labels (N,)


def check_cs(cs: Sequence[float]) -> np.ndarray:
    """(L,) float64 C grid, sorted ascending without repeats; UserError unless every value is positive and finite."""
    c = np.asarray(list(cs), dtype=np.float64).reshape(-1)
    if c.size == 0 or not np.isfinite(c).all() or (c <= 0).any():
        bad = next((v for v in c if not (math.isfinite(v) and v > 0)), None)
        got = "an empty grid" if bad is None else f"{bad:g}"
        raise UserError(f"The C values of the L-BFGS grid must be positive finite numbers, got {got}; "
                        "give e.g. 0.01,1,100.")
    return np.unique(c)


# --------------------------------------------------------------------------- the compiled program

def _objective(params: dict, x: jax.Array, y: jax.Array, mask: jax.Array, c: jax.Array) -> jax.Array:
    """f_C of the module docstring; x (N, D) float32, y (N,) int32, mask (N,) float32 (0 = padding row)."""
    logits = jnp.dot(x, params["w"].T, precision=jax.lax.Precision.HIGHEST) + params["b"]  # (N, K)
    return masked_loss(logits, y, mask) + 0.5 * jnp.sum(params["w"] ** 2) / (c * jnp.sum(mask))


def _max_abs(tree) -> jax.Array:
    return jnp.max(jnp.stack([jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(tree)]))


def _solve(x, y, mask, c, *, num_outputs: int, tol: float, max_iter: int):
    """L-BFGS on f_C for one C from zeros: (params {"w": (K, D), "b": (K,)}, iterations, max |grad|, stalled)."""
    fun = partial(_objective, x=x, y=y, mask=mask, c=c)
    opt = optax.lbfgs(memory_size=MEMORY_SIZE, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=LINESEARCH_STEPS, initial_guess_strategy="one"))
    params = {"w": jnp.zeros((num_outputs, x.shape[1]), x.dtype), "b": jnp.zeros((num_outputs,), x.dtype)}

    def step(carry):  # value and grad at params ride in the carry (the line search computed them)
        params, state, value, grad, it, flat = carry
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        new, new_grad = otu.tree_get(state, "value"), otu.tree_get(state, "grad")
        no_decrease = value - new <= FTOL * jnp.maximum(jnp.abs(new), 1.0)
        return (optax.apply_updates(params, updates), state, new, new_grad, it + 1,
                jnp.where(no_decrease, flat + 1, 0))

    def keep_going(carry):
        _, _, _, grad, it, flat = carry
        return (it < max_iter) & (_max_abs(grad) > tol) & (flat < STALL_ITERS)

    zero = jnp.zeros((), jnp.int32)
    value, grad = jax.value_and_grad(fun)(params)
    carry = jax.lax.while_loop(keep_going, step, (params, opt.init(params), value, grad, zero, zero))
    params, _, _, grad, it, flat = carry
    return params, it, _max_abs(grad), flat >= STALL_ITERS


def _split_stats(params: dict, x: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean loss, correct rows) of every C: params with leading axis L; one C at a time (memory: N x K)."""
    def one(p):
        logits = jnp.dot(x, p["w"].T, precision=jax.lax.Precision.HIGHEST) + p["b"]  # (N, K)
        correct = jnp.sum((predictions(logits) == y) * (mask > 0))
        return masked_loss(logits, y, mask), correct
    return jax.lax.map(one, params)


def _grid(x, y, mask, x_val, y_val, cs, *, num_outputs: int, tol: float, max_iter: int, parallel: int) -> dict:
    """Fit every C of `cs` (L,) on rows x (N, D) / y (N,) / mask (N,) and score train and val.

    `parallel` C values are fitted side by side (vmapped), the groups one after another (lax.map).
    Returns a dict of device arrays: w (L, K, D), b (L, K), iterations (L,), grad_max (L,), stalled (L,),
    train_loss / val_loss (L,) float32 means, train_correct / val_correct (L,) int.
    """
    solve = partial(_solve, x, y, mask, num_outputs=num_outputs, tol=tol, max_iter=max_iter)
    params, it, gmax, stalled = jax.lax.map(solve, cs, batch_size=parallel if parallel > 1 else None)
    train_loss, train_correct = _split_stats(params, x, y, mask)
    val_loss, val_correct = _split_stats(params, x_val, y_val, jnp.ones(y_val.shape, x.dtype))
    return {"w": params["w"], "b": params["b"], "iterations": it, "grad_max": gmax, "stalled": stalled,
            "train_loss": train_loss, "train_correct": train_correct, "val_loss": val_loss, "val_correct": val_correct}


_STATIC = ("num_outputs", "tol", "max_iter", "parallel")
grid_program = jax.jit(_grid, static_argnames=_STATIC)


@partial(jax.jit, static_argnames=_STATIC)
def problems_program(xs, ys, masks, x_val, y_val, cs, *, num_outputs: int, tol: float, max_iter: int,
                     parallel: int) -> dict:
    """grid_program for P problems side by side (few-shot draws, vmapped): problem p trains on rows xs[p] (M, D),
    labels ys[p] (M,), masks[p] (M,) 0 on padding rows. Returns grid_program's dict with a leading P axis."""
    def one(x, y, mask):
        return _grid(x, y, mask, x_val, y_val, cs, num_outputs=num_outputs, tol=tol, max_iter=max_iter,
                     parallel=parallel)
    return jax.vmap(one)(xs, ys, masks)


def default_parallel(num_cs: int, *, rows: int, dim: int) -> int:
    """C values fitted side by side: 1 on a CPU (the cores are busy with one fit already, and vmapping
    optax's line search copies the features once per C: its lax.cond broadcasts every operand); on an
    accelerator as many as keep those copies within a quarter of its memory (4 GiB when unknown)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return 1
    stats = device.memory_stats() or {}
    budget = stats.get("bytes_limit", 16 * 2 ** 30) // 4
    return int(max(1, min(num_cs, budget // max(1, rows * dim * 4 * 3))))


@jax.jit
def linear_logits(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """(N, K) logits of rows x (N, D) under weight (K, D), bias (K,)."""
    return jnp.dot(x, w.T, precision=jax.lax.Precision.HIGHEST) + b


def compiled_call(program, *args, **static) -> tuple[dict, float, float]:
    """Run a jitted program: (outputs as numpy, compile seconds (about 0 when already compiled), run seconds)."""
    t0 = time.perf_counter()
    executable = program.lower(*args, **static).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(executable(*args))
    t2 = time.perf_counter()
    return jax.tree.map(np.asarray, out), t1 - t0, t2 - t1


# --------------------------------------------------------------------------- the C grid on one split

@dataclass(frozen=True)
class LbfgsPath:
    """Heads for every C of a grid, fitted on one set of train rows, scored on train and val."""

    cs: np.ndarray  # (L,) float64 ascending
    weights: np.ndarray  # (L, K, D) float32, nn.Linear layout
    biases: np.ndarray  # (L, K) float32
    iterations: np.ndarray  # (L,) int
    grad_max: np.ndarray  # (L,) max |grad f_C| at the end
    converged: np.ndarray  # (L,) bool: grad_max <= tol
    stalled: np.ndarray  # (L,) bool: stopped on a decrease float32 cannot resolve
    train_loss: np.ndarray  # (L,) float64
    train_acc: np.ndarray  # (L,)
    val_loss: np.ndarray  # (L,)
    val_acc: np.ndarray  # (L,)
    timings: dict  # compile_s, fit_s of the one program

    def records(self) -> list[EpochRecord]:
        """One EpochRecord per C (epoch = position in the grid from 1; lr and seconds nan)."""
        nan = float("nan")
        return [EpochRecord(epoch=i + 1, lr=nan, train_loss=float(self.train_loss[i]),
                            train_acc=float(self.train_acc[i]), val_loss=float(self.val_loss[i]),
                            val_acc=float(self.val_acc[i]), seconds=nan) for i in range(len(self.cs))]

    def select(self) -> int:
        """Index of the selected C: best val acc, then lower val loss, then smaller C."""
        return metrics.select_epoch(self.records())


def path_from_outputs(out: dict, cs: np.ndarray, *, tol: float, n_train: int, n_val: int, timings: dict) -> LbfgsPath:
    """The LbfgsPath of one problem from grid_program's outputs (as numpy); n_train / n_val: rows scored."""
    return LbfgsPath(cs=cs, weights=out["w"], biases=out["b"], iterations=out["iterations"].astype(np.int64),
                     grad_max=out["grad_max"].astype(np.float64), converged=out["grad_max"] <= tol,
                     stalled=out["stalled"].astype(bool), train_loss=out["train_loss"].astype(np.float64),
                     train_acc=out["train_correct"] / n_train, val_loss=out["val_loss"].astype(np.float64),
                     val_acc=out["val_correct"] / n_val, timings=timings)


def lbfgs_path(train: Arrays, val: Arrays, *, num_classes: int, cs: Sequence[float] = DEFAULT_CS,
               tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER, parallel: int | None = None) -> LbfgsPath:
    """Fit the objective for every C of `cs` on train and score train and val, as one compiled program.

    Args:
        train, val: (features (N, D) float, labels (N,) int in [0, num_classes)); used as given (no standardization).
        num_classes: C >= 2 (K = 1 logit for two classes).
        cs: the C grid (> 0); sorted ascending in the result.
        tol: gradient tolerance (max |grad| of the N-scaled objective).
        max_iter: L-BFGS iterations at most, per C.
        parallel: C values fitted side by side in the program; None = default_parallel.

    Returns:
        LbfgsPath; timings["compile_s"] is about 0 when a program of these shapes was compiled before.
    """
    c = check_cs(cs)
    check_solver_settings(tol, max_iter)
    (x, y), (x_val, y_val) = train, val
    args = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32), jnp.ones(len(y), jnp.float32),
            jnp.asarray(x_val, jnp.float32), jnp.asarray(y_val, jnp.int32), jnp.asarray(c, jnp.float32))
    parallel = default_parallel(len(c), rows=len(y), dim=args[0].shape[1]) if parallel is None else int(parallel)
    out, compile_s, fit_s = compiled_call(grid_program, *args, num_outputs=num_outputs_for(num_classes),
                                          tol=float(tol), max_iter=int(max_iter), parallel=max(1, parallel))
    return path_from_outputs(out, c, tol=tol, n_train=len(y), n_val=len(y_val),
                      timings={"compile_s": compile_s, "fit_s": fit_s, "parallel": parallel})


def check_solver_settings(tol: float, max_iter: int) -> None:
    """UserError for a negative or non-finite gradient tolerance or fewer than one iteration."""
    if not (math.isfinite(tol) and tol >= 0):
        raise UserError(f"The L-BFGS gradient tolerance must be zero or positive, got {tol:g}.")
    if max_iter < 1:
        raise UserError(f"The L-BFGS iterations must be at least 1, got {max_iter}.")


# --------------------------------------------------------------------------- the probe on train / val / test

@dataclass(frozen=True)
class LbfgsFit:
    """The C grid scored on train and val, the C selected on val and its head scored on test."""

    path: LbfgsPath
    selected: int  # index into path.cs
    weight: np.ndarray  # (K, D) float32 at the selected C, nn.Linear layout (applies to standardized rows)
    bias: np.ndarray  # (K,) float32
    mean: np.ndarray | None  # (D,) with standardize, else None
    std: np.ndarray | None
    test_logits: np.ndarray  # (N_test, K) float32
    summary: RunSummary
    history: list[EpochRecord]  # one record: the selected C (lr nan)
    timings: dict  # compile_s, fit_s (the one program), seconds (whole call)

    @property
    def c(self) -> float:
        return float(self.path.cs[self.selected])

    @property
    def cs(self) -> np.ndarray:
        return self.path.cs

    def on_edge(self) -> bool:
        """True when the selected C is the smallest or largest of the grid (widen the grid)."""
        from featcache.metrics import on_grid_edge

        return on_grid_edge(self.selected, len(self.path.cs))

    def to_dict(self) -> dict:
        """The whole grid, JSON-safe, as metrics.json would store it (extra["lbfgs"])."""
        p = self.path
        return {"cs": p.cs.tolist(), "selected_c": self.c, "selected": self.selected,
                "rule": "best val acc; ties: lower val loss, then smaller C; fit on train only",
                "train_loss": p.train_loss.tolist(), "train_acc": p.train_acc.tolist(),
                "val_loss": p.val_loss.tolist(), "val_acc": p.val_acc.tolist(),
                "iterations": p.iterations.tolist(), "converged": p.converged.tolist(),
                "stalled": p.stalled.tolist(), "grad_max": p.grad_max.tolist(), "timings": self.timings}


def check_splits(splits: Sequence[Arrays], num_classes: int) -> list[Arrays]:
    """(float32 features, int64 labels) of train, val, test; UserError for an empty split or labels out of range."""
    out = [(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)) for x, y in splits]
    num_outputs_for(num_classes)  # UserError below two classes
    dim = out[0][0].shape[1] if out[0][0].ndim == 2 else None
    for split, (x, y) in zip(("train", "val", "test"), out):
        if len(y) == 0:
            raise UserError(f"The {split} split is empty; the probe needs train, val and test rows.")
        if x.ndim != 2 or x.shape[0] != len(y) or x.shape[1] != dim:
            raise ValueError(f"{split}: features {x.shape} do not match labels {y.shape} / train dim")
        if y.min() < 0 or y.max() >= num_classes:
            raise UserError(f"The {split} labels fall outside the {num_classes} classes; the cache is "
                            "inconsistent, extract it again.")
    return out


def fit_lbfgs(train: Arrays, val: Arrays, test: Arrays, *, num_classes: int, cs: Sequence[float] = DEFAULT_CS,
              standardize: bool = False, tol: float = DEFAULT_TOL, max_iter: int = DEFAULT_MAX_ITER,
              class_names: Sequence[str] | None = None) -> LbfgsFit:
    """The linear probe: fit every C on train (one program), select C on val, score test with it.

    Args:
        train, val, test: (features (N, D), labels (N,) int in [0, num_classes)).
        num_classes: C >= 2.
        cs: the C grid (> 0), default 32 values log-spaced over 1e-6 ... 1e6.
        standardize: z-score every split with the train mean/std first (featcache.standardize).
        tol, max_iter: stopping rule of each C (module docstring).
        class_names: C names for the summary.

    Returns:
        LbfgsFit (summary.training_time = seconds of the whole call, compile included).
    """
    t0 = time.perf_counter()
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(c) for c in class_names]
    splits = check_splits((train, val, test), num_classes)
    mean = std = None
    if standardize:
        mean, std = standardization(splits[0][0])
        splits = [((x - mean) / std, y) for x, y in splits]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits
    path = lbfgs_path((x_train, y_train), (x_val, y_val), num_classes=num_classes, cs=cs, tol=tol,
                      max_iter=max_iter)
    selected = path.select()
    weight, bias = path.weights[selected], path.biases[selected]
    test_logits = np.asarray(linear_logits(jnp.asarray(x_test), jnp.asarray(weight), jnp.asarray(bias)))
    seconds = time.perf_counter() - t0
    history = [dataclasses.replace(path.records()[selected], epoch=1, seconds=seconds)]
    summary = metrics.summarize(history, 0, test_logits=test_logits, test_labels=y_test, class_names=names,
                                train_seconds=seconds, diverged=False)
    return LbfgsFit(path=path, selected=selected, weight=weight, bias=bias, mean=mean, std=std,
                    test_logits=test_logits, summary=summary, history=history,
                    timings={**path.timings, "seconds": seconds})
