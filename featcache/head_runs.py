"""head-train one floor above its solvers: route the options to a solver, load the cache, fit, write the run.

The solvers fit arrays and return what they fitted; none reads a cache file, creates a run directory or
prints: featcache.head (the trained head, SGD/Adam), featcache.stream (the same head with the train rows
read from the file block by block), featcache.sweep (a grid of heads in one program), featcache.ridge
(closed-form ridge). This module does the rest, once for all of them:

    head_train      the library function of `featcache head-train`, api.train_head, api.train_grid and
                    api.train_ridge: checks which options combine, then calls one of
    train_head / train_grid / train_ridge
                    load the splits (load_splits), fit, write the run (write_head_run)
    write_head_run  the run directory of any solver's fit: head.npz (when the fit is a linear head),
                    history.csv (when it has epochs), its figures, metrics.json last

A new solver adds its fit function on its own layer, a train_<solver> here (load_splits -> fit ->
write_head_run), its name in SOLVERS and its branch in head_train.

Everything below featcache.config and featcache.errors is imported inside the functions: `featcache --help`
imports this module for the --solver choices and must start neither numpy nor jax.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from featcache.config import TrainConfig
from featcache.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from featcache.metrics import EpochRecord, RunSummary
    from featcache.runs import HeadWeights, RunResult

SOLVERS = ("sgd", "ridge")  # sgd: the trained head (--optimizer sgd|adam|adamw); ridge: closed-form ridge
SOLVER_ALIASES = {"optax": "sgd"}  # earlier names, still accepted
DEFAULT_SOLVER = "sgd"

Figure = Callable[[Path], object]  # draws one PNG at the path it is given


def solver_name(solver: str) -> str:
    """The solver's name in SOLVERS (an alias resolved to its name), or a UserError listing them."""
    name = SOLVER_ALIASES.get(solver, solver)
    if name not in SOLVERS:
        raise UserError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    return name


def head_train(*, cache: str | Path, config: TrainConfig, solver: str = DEFAULT_SOLVER,
               lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None,
               seeds: int | Sequence[int] = 1, grid: bool = False, l2s: Sequence[float] | None = None,
               stream: bool | None = None, stream_memory_mib: int | None = None, run_name: str | None = None,
               progress: bool = True) -> RunResult:
    """Fit head-train's solver on a cache and write its run directory: what `featcache head-train` does.

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: the training settings; the run directory goes under config.runs_dir.
        solver: "sgd" (the trained head, config.optimizer sgd|adam|adamw; "optax" is its old name) or "ridge".
        lrs, weight_decays: learning rates and weight decays; None = [config.lr], [config.weight_decay].
        seeds: a count K (config.seed, config.seed + 1, ...) or the seeds themselves.
        grid: True = always train_grid, the grid's run (extra["grid"]), even of one lr, weight decay and seed.
            Otherwise more than one of any trains the grid (train_grid), one of each one head (train_head).
        l2s: ridge's L2 strengths (None = ridge.DEFAULT_L2S); only with solver "ridge".
        stream: True = read the train rows from the file block by block, False = load every split,
            None = stream only when loading would not fit in memory; only one sgd head streams.
        stream_memory_mib: memory for the streamed blocks (None = stream.block_memory_mib).
        run_name: the run directory's name; None = `<time>-head-<model>`.
        progress: one line per phase on stderr (and a progress bar when streaming).

    Returns:
        The RunResult of the run written. Options that do not combine are one-sentence UserErrors,
        raised before the cache is read.
    """
    solver = solver_name(solver)
    lrs = [config.lr] if lrs is None else [float(v) for v in lrs]
    weight_decays = [config.weight_decay] if weight_decays is None else [float(v) for v in weight_decays]
    seed_list = (list(range(config.seed, config.seed + seeds)) if isinstance(seeds, int)
                 else [int(s) for s in seeds])
    grid = grid or (len(lrs), len(weight_decays), len(seed_list)) != (1, 1, 1)  # an empty list: the grid says so
    check_combination(solver=solver, grid=grid, stream=stream, l2s=l2s)
    from featcache.runs import check_report_options

    check_report_options(config)
    if solver == "ridge":
        return train_ridge(cache=cache, config=config, l2s=l2s, run_name=run_name, progress=progress)
    if grid:
        return train_grid(cache=cache, config=config, lrs=lrs, weight_decays=weight_decays, seeds=seed_list,
                          run_name=run_name, progress=progress)
    config = dataclasses.replace(config, lr=lrs[0], weight_decay=weight_decays[0], seed=seed_list[0])
    return train_head(cache=cache, config=config, run_name=run_name, progress=progress, stream=stream,
                      stream_memory_mib=stream_memory_mib)


def check_combination(*, solver: str, grid: bool, stream: bool | None, l2s: Sequence[float] | None) -> None:
    """A one-sentence UserError when head-train's options do not combine.

    solver: a name in SOLVERS; grid: more than one lr, weight decay or seed asked for (or the grid's run);
    stream and l2s: as given to head_train.
    """
    if stream and (grid or solver != "sgd"):
        raise UserError("--stream trains one head with --solver sgd (the grid and ridge load the cache whole); "
                        "drop --stream, or the --lr/--weight-decay lists, --seeds and --solver ridge.")
    if l2s is not None and solver != "ridge":
        raise UserError("--l2 sets the strengths of --solver ridge; add --solver ridge or drop --l2.")
    if solver == "ridge" and grid:
        raise UserError("--solver ridge is deterministic and searches --l2; drop the --lr/--weight-decay lists "
                        "and --seeds.")


# --------------------------------------------------------------------------- one solver each


def train_head(*, cache: str | Path, config: TrainConfig, run_name: str | None = None, progress: bool = True,
               stream: bool | None = None, stream_memory_mib: int | None = None) -> RunResult:
    """Train the linear head on a feature cache and write its run directory.

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: training settings; the run directory goes under config.runs_dir.
        run_name: the run directory's name; None = `<time>-head-<model>`.
        progress: one line per phase on stderr (and a progress bar when streaming).
        stream: True = read the train rows from the file block by block in plan order
            (featcache.stream), never loading the features whole; False = load every split;
            None = stream only when loading would not fit in the memory available now.
        stream_memory_mib: memory for the streamed blocks; None = stream.block_memory_mib (1024 MiB or
            a quarter of the memory available).

    Returns:
        The RunResult (summary, history, run_dir, config, timings load_s/compile_s/train_s, and
        read_s/wait_s when streamed). A diverged training (metrics.divergence_reason: NaN/inf loss,
        or a train-loss jump) still writes its run, with summary.diverged set.
    """
    from featcache.cache import read_meta
    from featcache.plan import check_config
    from featcache.plots import plot_curves
    from featcache.runs import CURVES_FILE

    check_config(config)
    meta = read_meta(cache)
    stream, memory_mib = _streaming(meta, stream=stream, memory_mib=stream_memory_mib, progress=progress)
    if stream:
        fit, extra = _fit_streamed(cache, meta, config=config, memory_mib=memory_mib, progress=progress)
        timings = dict(fit.timings)
        waited = (f" (reading took {timings['read_s']:.2f} s in a thread beside it; training waited "
                  f"{timings['wait_s']:.2f} s for it)")
    else:
        from featcache.head import fit_head

        data = load_splits(cache, meta=meta, progress=progress)
        fit = fit_head(*data.arrays, num_classes=len(data.class_names), config=config, class_names=data.class_names)
        timings, extra, waited = {"load_s": data.load_s, **fit.timings}, {}, ""
    _say(progress, f"Compiled in {fit.timings['compile_s']:.2f} s; trained {config.epochs} epochs "
                   f"in {fit.timings['train_s']:.3f} s{waited}")
    curves = {CURVES_FILE: lambda path: plot_curves(fit.history, path, title=run_title(meta), selected=fit.selected)}
    return write_head_run(cache=cache, meta=meta, config=config, summary=fit.summary, timings=timings,
                          history=fit.history, head=fit.head_weights, figures=curves, extra=extra,
                          run_name=run_name, progress=progress, test_logits=fit.test_logits,
                          splits=None if stream else data)


def _streaming(meta: dict, *, stream: bool | None, memory_mib: int | None, progress: bool) -> tuple[bool, int]:
    """(whether train_head streams, MiB for its blocks): stream None = only when the features would not fit in
    the memory available (said on stderr); memory_mib None = stream.block_memory_mib of what is available."""
    from featcache import stream as streaming
    from featcache.environment import memory_available

    available = memory_available() if stream is None or (stream and memory_mib is None) else None
    if stream is None:
        stream = streaming.needs_streaming(meta, available)
        if stream:
            _say(progress, f"The features need about {streaming.in_memory_bytes(meta) / 2**30:.1f} GiB in memory, more "
                           f"than the {available / 2**30:.1f} GiB available: streaming them from "
                           "the file (--no-stream loads them anyway).")
    return stream, memory_mib or streaming.block_memory_mib(available)


def _fit_streamed(cache: str | Path, meta: dict, *, config: TrainConfig, memory_mib: int, progress: bool):
    """(HeadFit, extra {"stream": the stream info}) of stream.fit_streamed on the cache, in blocks within memory_mib."""
    from featcache.cache import FeatureReader
    from featcache.stream import block_rows_for, fit_streamed

    block_rows = block_rows_for(feature_dim=int(meta["feature_dim"]), batch_size=config.batch_size,
                                memory_mib=memory_mib)
    with FeatureReader(cache) as reader:
        fit, info = fit_streamed(reader, config=config, block_rows=block_rows, progress=progress,
                                 say=lambda message: _say(progress, message))
    return fit, {"stream": info}


def train_grid(*, cache: str | Path, config: TrainConfig, lrs: Sequence[float], weight_decays: Sequence[float],
               seeds: Sequence[int], run_name: str | None = None, progress: bool = True) -> RunResult:
    """Train a grid of heads on a feature cache in one program (sweep.fit_grid) and write ONE run directory.

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: training settings; its lr, weight_decay and seed are replaced by the grid's.
        lrs, weight_decays, seeds: the grid axes (each value once).
        run_name: the run directory's name; None = `<time>-head-<model>`.
        progress: one line per phase on stderr.

    Returns:
        The RunResult of the selected (lr, wd) pair trained with seeds[0]: its config, history,
        summary (training_time = the whole grid's compile + train seconds) and head.npz;
        extra["grid"] holds every cell (GridFit.to_dict) and extra["seed_stats"] the selected pair's
        intervals over seeds. curves.png shows the selected pair, mean and min-max band over seeds.
    """
    from featcache.plots import plot_seed_curves
    from featcache.runs import CURVES_FILE
    from featcache.sweep import fit_grid, seed_stats

    data = load_splits(cache, progress=progress)
    grid = fit_grid(*data.arrays, num_classes=len(data.class_names), config=config, lrs=lrs,
                    weight_decays=weight_decays, seeds=seeds, class_names=data.class_names)
    cell = grid.selected_cell
    saved = cell.fits[0]  # the selected pair's first seed
    _say(progress, f"Compiled {grid.num_heads} heads ({len(grid.lrs)} lr x {len(grid.weight_decays)} wd x "
                   f"{len(grid.seeds)} seeds) in {grid.timings['compile_s']:.2f} s; trained {config.epochs} epochs "
                   f"in {grid.timings['train_s']:.3f} s; selected lr {cell.lr:g}, wd {cell.weight_decay:g}")
    title = f"{run_title(data.meta)}, lr {cell.lr:g}, wd {cell.weight_decay:g}, {len(grid.seeds)} seeds"
    curves = {CURVES_FILE: lambda path: plot_seed_curves([f.history for f in cell.fits], path, title=title)}
    chosen = dataclasses.replace(config, lr=cell.lr, weight_decay=cell.weight_decay, seed=grid.seeds[0])
    return write_head_run(cache=cache, meta=data.meta, config=chosen, summary=saved.summary,
                          timings={"load_s": data.load_s, **grid.timings}, history=saved.history,
                          head=saved.head_weights, figures=curves,
                          extra={"grid": grid.to_dict(), "seed_stats": seed_stats(cell.fits)},
                          run_name=run_name, progress=progress, test_logits=saved.test_logits, splits=data)


def train_ridge(*, cache: str | Path, config: TrainConfig, l2s: Sequence[float] | None = None,
                run_name: str | None = None, progress: bool = True) -> RunResult:
    """Fit the ridge head on a feature cache (ridge.fit_ridge) and write its run directory (extra["solver"] = "ridge").

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: standardize and runs_dir are read (the trained head's settings do not apply and are stored as given).
        l2s: the L2 strengths λ searched; None = ridge.DEFAULT_L2S.
        run_name: the run directory's name; None = `<time>-head-<model>`.
        progress: one line per phase on stderr.

    Returns:
        The RunResult; extra["ridge"] holds the whole path (RidgeFit.to_dict) and curves.png shows
        train and val accuracy against λ.
    """
    from featcache.plots import plot_accuracy_path
    from featcache.ridge import DEFAULT_L2S, fit_ridge, l2_is_on_edge
    from featcache.runs import CURVES_FILE

    data = load_splits(cache, progress=progress)
    fit = fit_ridge(*data.arrays, num_classes=len(data.class_names), l2s=DEFAULT_L2S if l2s is None else l2s,
                    standardize=config.standardize, class_names=data.class_names)
    _say(progress, f"Ridge: {len(fit.l2s)} L2 strengths from one eigendecomposition in {fit.seconds:.3f} s; "
                   f"selected l2 {fit.l2:g} (val acc {fit.val_acc[fit.selected]:.4f})")
    if l2_is_on_edge(fit):
        _say(progress, "Note: the selected l2 is at the edge of the grid; widen --l2.")
    curves = {CURVES_FILE: lambda path: plot_accuracy_path(
        fit.l2s, {"train acc": fit.train_acc, "val acc": fit.val_acc}, path, run_title(data.meta, "ridge head"),
        name="l2", description="the L2 strength", axis_label="l2 (ridge strength)", selected=fit.selected)}
    return write_head_run(cache=cache, meta=data.meta, config=config, summary=fit.summary,
                          timings={"load_s": data.load_s, "train_s": fit.seconds}, history=fit.history,
                          head=fit.head_weights, figures=curves, solver="ridge", extra={"ridge": fit.to_dict()},
                          run_name=run_name, progress=progress, splits=data)


# --------------------------------------------------------------------------- what every solver shares


@dataclass(frozen=True)
class CacheSplits:
    """A cache's three splits in memory, as the solvers take them: (features (N, D) float32|float16, labels (N,))."""

    path: str
    meta: dict  # cache.read_meta: model, class_names, feature_dim, key, splits (rows per split), ...
    train: tuple  # (features (N, D), labels (N,) int64)
    val: tuple  # (features (Nv, D), labels (Nv,))
    test: tuple  # (features (Nt, D), labels (Nt,))
    load_s: float  # seconds the loading took

    @property
    def arrays(self) -> tuple[tuple, tuple, tuple]:
        """(train, val, test), the first three arguments of every fit function."""
        return self.train, self.val, self.test

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.meta["class_names"]]


def load_splits(cache: str | Path, *, meta: dict | None = None, progress: bool = True) -> CacheSplits:
    """Load the train, val and test splits of a cache (cache.load_features) and say so on stderr.

    meta: the cache's metadata when already read (cache.read_meta); None = the one load_features returns.
    """
    from featcache.cache import SPLITS
    from featcache.cache import load_splits as load_cache_splits

    t0 = time.perf_counter()
    read, loaded = load_cache_splits(cache)  # one open of the file for meta and every split
    load_s = time.perf_counter() - t0
    meta = read if meta is None else meta
    sizes = ", ".join(f"{len(loaded[split][1])} {split}" for split in SPLITS)
    _say(progress, f"Loaded {sizes} rows of {meta['feature_dim']} {meta['model']} features in {load_s:.2f} s")
    train, val, test = (loaded[split][:2] for split in SPLITS)
    return CacheSplits(path=str(cache), meta=meta, train=train, val=val, test=test, load_s=load_s)


def run_title(meta: Mapping, what: str = "head") -> str:
    """The title of a head run's figures: `<model> <what> (<dataset>)`."""
    return f"{meta['model']} {what} ({meta.get('dataset_name', '')})"


def write_head_run(*, cache: str | Path, meta: Mapping, config: TrainConfig, summary: RunSummary,
                   timings: Mapping[str, float], history: Sequence[EpochRecord] = (),
                   head: HeadWeights | None = None, figures: Mapping[str, Figure] | None = None,
                   solver: str | None = None, extra: Mapping | None = None, run_name: str | None = None,
                   progress: bool = True, test_logits=None, splits: CacheSplits | None = None) -> RunResult:
    """Write the run directory (mode "head") of one solver's fit on a cache; metrics.json last marks it finished.

    With a linear head: runs.write_clinical (extra["clinical"], test_logits.npz, roc.png, calibration.png) of its
    val/test logits; test_logits (N_test, K): the fit's own, None = head on the cache's test rows; splits: if loaded.

    Args:
        cache: the cache file the fit read, recorded with its key.
        meta: the cache's metadata (cache.read_meta): model, weights, dataset_name, feature_dim, dtype, key and
            splits (rows per split) go into the run.
        config: the settings stored in metrics.json (those of the saved head).
        summary: the run's summary (metrics.summarize); summary.diverged marks a diverged run (a warning).
        timings: seconds: load_s, compile_s, train_s, ...
        history: one EpochRecord per epoch -> history.csv and metrics.json; empty = no history.csv
            (a solver without epochs).
        head: the linear head -> head.npz (what export and predict read); None = no head.npz (a solver whose
            result is not a linear layer, e.g. k-NN).
        figures: file name in the run directory -> function that draws that PNG at the path given
            (runs.CURVES_FILE: the curves).
        solver: stored as extra["solver"], which report shows as mode head/<solver>; None = the trained
            SGD/Adam head (mode "head").
        extra: the solver's own JSON-safe record (the grid, the ridge path, the stream info, ...), stored after
            the cache's fields (weights, dataset_name, feature_dim, cache_dtype, rows).
        run_name: the run directory's name; None = `<time>-head-<model>`.
        progress: one line on stderr (and a warning for a diverged run).

    Returns:
        The RunResult, as runs.load_run reads it back.
    """
    from featcache import runs
    from featcache.cache import SPLITS
    from featcache.environment import library_versions

    run_dir = runs.new_run_dir(runs_dir=config.runs_dir, mode="head", model=meta["model"], name=run_name)
    class_names = list(summary.class_names)
    if head is not None:
        runs.save_head(run_dir / runs.HEAD_FILE, weight=head.weight, bias=head.bias, class_names=class_names,
                       mean=head.mean, std=head.std)
    if history:
        runs.write_history_csv(run_dir / runs.HISTORY_FILE, history)
    for name, draw in (figures or {}).items():
        draw(run_dir / name)
    clinical = head and _write_clinical(run_dir, cache=cache, meta=meta, config=config, head=head, logits=test_logits,
                                        splits=splits)
    record = {**({"solver": solver} if solver else {}),
              "weights": meta.get("weights"), "dataset_name": meta.get("dataset_name"),
              "feature_dim": meta.get("feature_dim"), "cache_dtype": meta.get("dtype"),
              "rows": {split: int(meta["splits"].get(split, 0)) for split in SPLITS}, **(extra or {}),
              **({"clinical": clinical} if clinical is not None else {})}
    result = runs.finish_run(run_dir, mode="head", model=meta["model"], config=config, summary=summary,
                             history=history, timings=timings, versions=library_versions(),
                             cache_key=meta.get("key"), cache_path=str(cache), extra=record)
    if result.diverged:
        _say(progress, f"Warning: {diverged_message(result)}")
    _say(progress, f"Run written to {run_dir}")
    return result


def head_logits(head: HeadWeights, features) -> "np.ndarray":
    """(N, K) float64 logits of head.npz's head on features (N, D): ((x - mean) / std) @ weight.T + bias, the
    z-scoring in float32 as standardize.prepare_splits does it."""
    import numpy as np

    x = np.asarray(features, dtype=np.float32)
    if head.mean is not None:
        x = (x - head.mean) / head.std
    return x.astype(np.float64) @ np.asarray(head.weight, np.float64).T + np.asarray(head.bias, np.float64)


def _write_clinical(run_dir: Path, *, cache: str | Path, meta: Mapping, config: TrainConfig, head: HeadWeights,
                    logits, splits: CacheSplits | None) -> dict:
    """runs.write_clinical of a head run: val and test rows (and train labels) from `splits`, or read again
    from the cache when the fit did not load it (streamed)."""
    from featcache.cache import FeatureReader, load_paths
    from featcache.cache import load_splits as load_cache_splits
    from featcache.runs import write_clinical

    if splits is None:
        _, loaded = load_cache_splits(cache, splits=("val", "test"))
        with FeatureReader(cache) as reader:
            y_train = reader.labels("train")
    else:
        loaded, y_train = {"val": splits.val, "test": splits.test}, splits.train[1]
    (x_val, y_val), (x_test, y_test) = loaded["val"], loaded["test"]
    return write_clinical(
        run_dir, val_logits=head_logits(head, x_val), val_labels=y_val,
        test_logits=head_logits(head, x_test) if logits is None else logits, test_labels=y_test,
        test_paths=load_paths(cache, "test"), num_classes=len(meta["class_names"]), config=config,
        train_labels=y_train, title=run_title(meta))


def divergence_reason(history: Sequence[EpochRecord], *, num_classes: int) -> str:
    """The divergence guard's reason (metrics.divergence_reason) at the first diverged epoch of a history
    (metrics.first_divergence: one pass)."""
    from featcache import metrics

    return metrics.first_divergence(history, num_classes=num_classes) or "loss NaN/inf"


def diverged_message(result: RunResult) -> str:
    """What a diverged head run tells the user: the reason, the remedy and where the run is."""
    reason = divergence_reason(result.history, num_classes=len(result.class_names))
    return f"Training diverged ({reason}); lower --lr. The run {result.run_dir} is kept and marked diverged."


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)
