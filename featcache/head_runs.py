"""head-train one floor above its solvers: route the options to a solver, load the cache, fit, write the run.

The solvers fit arrays and return what they fitted; none reads a cache file, creates a run directory or
prints: featcache.head (the trained head, SGD/Adam), featcache.stream (the same head with the train rows
read from the file block by block), featcache.sweep (a grid of heads in one program), featcache.ridge
(closed-form ridge), featcache.lbfgs (logistic regression over a C grid), featcache.knn (cosine k-NN),
featcache.fewshot (either probe on few-shot draws). This module does the rest, once for all of them:

    head_train      the library function of `featcache head-train`, api.train_head, api.train_grid and
                    api.train_ridge: checks which options combine, then calls one of
    train_head / train_grid / train_ridge / train_lbfgs / train_knn / train_fewshot
                    load the splits (load_splits), fit, write the run (write_head_run)
    write_head_run  the run directory of any solver's fit: head.npz (when the fit is a linear head),
                    history.csv (when it has epochs), its figures, metrics.json last

A new solver adds its fit function on its own layer, a train_<solver> here (load_splits -> fit ->
write_head_run), its name in SOLVERS and its branch in head_train.

Everything below featcache.config and featcache.errors is imported inside the functions: `featcache --help`
imports this module for the --solver choices and must start neither numpy nor jax.
"""

from __future__ import annotations

import contextvars
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from featcache.config import TrainConfig
from featcache.errors import UserError
from featcache.files import shell_quoted

if TYPE_CHECKING:
    import numpy as np
    from featcache.metrics import EpochRecord, RunSummary
    from featcache.runs import HeadWeights, RunResult

SOLVERS = ("sgd", "ridge", "lbfgs", "knn")  # sgd: the trained head (--optimizer sgd|adam|adamw); ridge: closed-form
# ridge; lbfgs: logistic regression by L-BFGS over a C grid; knn: cosine k-NN (no linear head)
FEWSHOT_SOLVERS = ("lbfgs", "knn")  # the solvers --shots draws for
DEFAULT_DRAWS = 5  # few-shot draws per K when --draws is not given
SOLVER_ALIASES = {"optax": "sgd"}  # earlier names, still accepted
DEFAULT_SOLVER = "sgd"

# The figure worker (featcache.figure_worker) of the head-train under way: head_train starts it before loading
# and fitting, write_head_run hands it the run's figures and waits for them before metrics.json.
_FIGURES: contextvars.ContextVar = contextvars.ContextVar("featcache_head_figures", default=None)


def solver_name(solver: str) -> str:
    """The solver's name in SOLVERS (an alias resolved to its name), or a UserError listing them."""
    name = SOLVER_ALIASES.get(solver, solver)
    if name not in SOLVERS:
        raise UserError(f"Unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}.")
    return name


def head_train(*, cache: str | Path, config: TrainConfig, solver: str = DEFAULT_SOLVER,
               lrs: Sequence[float] | None = None, weight_decays: Sequence[float] | None = None,
               seeds: int | Sequence[int] = 1, grid: bool = False, l2s: Sequence[float] | None = None,
               cs: Sequence[float] | None = None, ks: Sequence[int] | None = None,
               temperature: float | None = None, shots: Sequence[int] | None = None, draws: int | None = None,
               stream: bool | None = None, stream_memory_mib: int | None = None, run_name: str | None = None,
               progress: bool = True) -> RunResult | list[RunResult]:
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
        cs: lbfgs's C grid (None = lbfgs.DEFAULT_CS, 32 values 1e-6 ... 1e6); only with solver "lbfgs".
        ks: knn's k values (None = knn.DEFAULT_KS clipped to the train rows); only with solver "knn".
        temperature: knn's vote temperature T (None = knn.TEMPERATURE, 0.07); only with solver "knn".
        shots: few-shot K values (rows per class per draw), solver "lbfgs" or "knn": one run per K.
        draws: few-shot draws per K (None = DEFAULT_DRAWS); only with shots.
        stream: True = read the train rows from the file block by block, False = load every split,
            None = stream only when loading would not fit in memory; one sgd head and knn stream.
        stream_memory_mib: memory for the streamed blocks (None = stream.block_memory_mib).
        run_name: the run directory's name; None = `<time>-head-<model>`.
        progress: one line per phase on stderr (and a progress bar when streaming).

    Returns:
        The RunResult of the run written; with shots, one RunResult per K (a list, K ascending). Options
        that do not combine are one-sentence UserErrors, raised before the cache is read.
    """
    solver = solver_name(solver)
    lrs = [config.lr] if lrs is None else [float(v) for v in lrs]
    weight_decays = [config.weight_decay] if weight_decays is None else [float(v) for v in weight_decays]
    seed_list = (list(range(config.seed, config.seed + seeds)) if isinstance(seeds, int)
                 else [int(s) for s in seeds])
    grid = grid or (len(lrs), len(weight_decays), len(seed_list)) != (1, 1, 1)  # an empty list: the grid says so
    check_combination(solver=solver, grid=grid, stream=stream, l2s=l2s, cs=cs, ks=ks, temperature=temperature,
                      shots=shots, draws=draws)
    from featcache.runs import check_report_options
    check_report_options(config)  # --class-weight, --operating-point, --bootstrap: before any loading
    from featcache.figure_worker import FigureWorker

    # matplotlib loads in a child while this process fits; a process that has it loaded already (a notebook, a
    # study, the tests) draws here: the child's 0.8 s import would buy nothing.
    with (FigureWorker.here() if "matplotlib" in sys.modules else FigureWorker.start()) as figures:
        token = _FIGURES.set(figures)
        if solver != "ridge":  # ridge is numpy only
            from featcache.head import enable_compilation_cache

            enable_compilation_cache(compilation_cache_dir(cache))
        try:
            return _dispatch(cache=cache, config=config, solver=solver, lrs=lrs, weight_decays=weight_decays,
                             seed_list=seed_list, grid=grid, l2s=l2s, cs=cs, ks=ks, temperature=temperature,
                             shots=shots, draws=draws, stream=stream, stream_memory_mib=stream_memory_mib,
                             run_name=run_name, progress=progress)
        finally:
            _FIGURES.reset(token)


def compilation_cache_dir(cache: str | Path) -> Path:
    """Where head-train keeps JAX's compiled programs: `.jax-programs` beside the cache file (in its dataset's
    folder of the cache dir); keyed by program and shapes, so one folder serves every cache of that dataset."""
    return Path(cache).resolve().parent / ".jax-programs"


def _dispatch(*, cache, config: TrainConfig, solver: str, lrs: list, weight_decays: list, seed_list: list,
              grid: bool, l2s, cs, ks, temperature, shots, draws, stream, stream_memory_mib, run_name, progress):
    """head_train's solver call, its options checked."""
    if shots is not None:
        return train_fewshot(cache=cache, config=config, solver=solver, shots=shots,
                             draws=DEFAULT_DRAWS if draws is None else draws, cs=cs, ks=ks, temperature=temperature,
                             run_name=run_name, progress=progress)
    if solver == "lbfgs":
        return train_lbfgs(cache=cache, config=config, cs=cs, run_name=run_name, progress=progress)
    if solver == "knn":
        return train_knn(cache=cache, config=config, ks=ks, temperature=temperature, stream=stream,
                         stream_memory_mib=stream_memory_mib, run_name=run_name, progress=progress)
    if solver == "ridge":
        return train_ridge(cache=cache, config=config, l2s=l2s, run_name=run_name, progress=progress)
    if grid:
        return train_grid(cache=cache, config=config, lrs=lrs, weight_decays=weight_decays, seeds=seed_list,
                          run_name=run_name, progress=progress)
    config = dataclasses.replace(config, lr=lrs[0], weight_decay=weight_decays[0], seed=seed_list[0])
    return train_head(cache=cache, config=config, run_name=run_name, progress=progress, stream=stream,
                      stream_memory_mib=stream_memory_mib)


def check_combination(*, solver: str, grid: bool, stream: bool | None, l2s: Sequence[float] | None,
                      cs: Sequence[float] | None = None, ks: Sequence[int] | None = None,
                      temperature: float | None = None, shots: Sequence[int] | None = None,
                      draws: int | None = None) -> None:
    """A one-sentence UserError when head-train's options do not combine.

    solver: a name in SOLVERS; grid: more than one lr, weight decay or seed asked for (or the grid's run);
    the others as given to head_train.
    """
    if stream and (grid or solver not in ("sgd", "knn") or shots is not None):
        raise UserError("--stream trains one head with --solver sgd or searches --solver knn's neighbours block by "
                        "block (the grid, ridge, lbfgs and --shots load the cache whole); drop --stream, or the "
                        "--lr/--weight-decay lists, --seeds and --shots, or use --solver sgd or knn.")
    for given, option, owner, what in ((l2s, "--l2", "ridge", "the strengths"), (cs, "--C", "lbfgs", "the C grid"),
                                       (ks, "--k", "knn", "the k values"), (temperature, "--temperature", "knn",
                                                                           "the vote temperature")):
        if given is not None and solver != owner:
            raise UserError(f"{option} sets {what} of --solver {owner}; add --solver {owner} or drop {option}.")
    if shots is not None and solver not in FEWSHOT_SOLVERS:
        raise UserError(f"--shots draws few-shot train sets for --solver lbfgs or knn, not {solver}; "
                        "add --solver lbfgs or --solver knn, or drop --shots.")
    if draws is not None and shots is None:
        raise UserError("--draws sets how many few-shot draws each --shots K gets; add --shots or drop --draws.")
    if solver != "sgd" and grid:
        searched = {"ridge": "--l2", "lbfgs": "--C", "knn": "--k"}[solver]
        raise UserError(f"--solver {solver} is deterministic and searches {searched}; drop the --lr/--weight-decay "
                        "lists and --seeds.")


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
        ended = time.time()  # wall clock: the program's run is the "batches" of featcache bench's fixed cost
        timings, extra, waited = {"load_s": data.load_s, **fit.timings, "first_batch_at": ended - fit.timings["train_s"],
                                  "last_batch_at": ended}, {}, ""
    _say(progress, f"compile {fit.timings['compile_s']:.2f} s + train {fit.timings['train_s']:.3f} s "
                   f"({config.epochs} epochs) = training time {fit.summary.training_time:.2f} s{waited}")
    curves = {"curves": {"kind": "epochs", "history": list(fit.history), "selected": fit.selected}}
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
    from featcache.runs import settings_text
    from featcache.sweep import fit_grid, grid_edge_note, seed_stats

    data = load_splits(cache, progress=progress)
    grid = fit_grid(*data.arrays, num_classes=len(data.class_names), config=config, lrs=lrs,
                    weight_decays=weight_decays, seeds=seeds, class_names=data.class_names)
    cell = grid.selected_cell
    saved = cell.fits[0]  # the selected pair's first seed
    _say(progress, f"Compiled {grid.num_heads} heads ({len(grid.lrs)} lr x {len(grid.weight_decays)} wd x "
                   f"{len(grid.seeds)} seeds) in {grid.timings['compile_s']:.2f} s; trained {config.epochs} epochs "
                   f"in {grid.timings['train_s']:.3f} s; selected lr {cell.lr:g}, wd {cell.weight_decay:g}")
    chosen = dataclasses.replace(config, lr=cell.lr, weight_decay=cell.weight_decay, seed=grid.seeds[0])
    if note := grid_edge_note(grid):
        _say(progress, f"Note: {note}")
    title = run_title(data.meta, config=chosen, settings=f"selected {settings_text(chosen)}, {len(grid.seeds)} seeds")
    curves = {"curves": {"kind": "seeds", "histories": [list(f.history) for f in cell.fits]},
              "grid": grid.to_dict(), "title": title}
    return write_head_run(cache=cache, meta=data.meta, config=chosen, summary=saved.summary,
                          timings={"load_s": data.load_s, **grid.timings}, history=saved.history,
                          head=saved.head_weights, figures=curves,
                          extra={"grid": {**grid.to_dict(), **({"note": note} if note else {})},
                                 "seed_stats": seed_stats(cell.fits)},
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
    from featcache.ridge import DEFAULT_L2S, fit_ridge, l2_is_on_edge

    data = load_splits(cache, progress=progress)
    fit = fit_ridge(*data.arrays, num_classes=len(data.class_names), l2s=DEFAULT_L2S if l2s is None else l2s,
                    standardize=config.standardize, class_names=data.class_names)
    _say(progress, f"Ridge: {len(fit.l2s)} L2 strengths from one eigendecomposition in {fit.seconds:.3f} s; "
                   f"selected l2 {fit.l2:g} (val acc {fit.val_acc[fit.selected]:.4f})")
    if l2_is_on_edge(fit):
        _say(progress, "Note: the selected l2 is at the edge of the grid; widen --l2.")
    curves = {"curves": {"kind": "path", "values": list(fit.l2s), "curves": {"train acc": list(fit.train_acc),
                                                                          "val acc": list(fit.val_acc)},
                         "name": "l2", "description": "the L2 strength", "axis_label": "l2 (ridge strength)",
                         "selected": fit.selected},
              "title": run_title(data.meta, "ridge head", settings=_probe_settings(config))}
    return write_head_run(cache=cache, meta=data.meta, config=config, summary=fit.summary,
                          timings={"load_s": data.load_s, "train_s": fit.seconds}, history=fit.history,
                          head=fit.head_weights, figures=curves, solver="ridge", extra={"ridge": fit.to_dict()},
                          run_name=run_name, progress=progress, splits=data)


def train_lbfgs(*, cache: str | Path, config: TrainConfig, cs: Sequence[float] | None = None,
                run_name: str | None = None, progress: bool = True) -> RunResult:
    """Fit the L-BFGS logistic-regression probe over a C grid (lbfgs.fit_lbfgs, one program), select C on val,
    write its run directory (extra["solver"] = "lbfgs", extra["lbfgs"] = the whole grid, head.npz at the chosen C).

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: standardize and runs_dir are read (the trained head's settings do not apply and are stored as given).
        cs: the C grid (> 0); None = lbfgs.DEFAULT_CS (32 values log-spaced over 1e-6 ... 1e6).
        run_name, progress: as train_head.

    Returns:
        The RunResult; curves.png shows train and val accuracy against C, extra["lbfgs"]["note"] says when the
        chosen C lies on the edge of the grid.
    """
    from featcache.lbfgs import DEFAULT_CS, fit_lbfgs
    from featcache.runs import HeadWeights

    data = load_splits(cache, progress=progress)
    fit = fit_lbfgs(*data.arrays, num_classes=len(data.class_names), cs=DEFAULT_CS if cs is None else cs,
                    standardize=config.standardize, class_names=data.class_names)
    _say(progress, f"L-BFGS: {len(fit.cs)} C values in one program, compiled in {fit.timings['compile_s']:.2f} s, "
                   f"fitted in {fit.timings['fit_s']:.3f} s; selected C {fit.c:g} "
                   f"(val acc {fit.path.val_acc[fit.selected]:.4f})")
    record = fit.to_dict()
    if fit.on_edge():
        record["note"] = "The selected C lies on the edge of the grid; widen --C."
        _say(progress, f"Note: {record['note']}")
    curves = {"curves": {"kind": "path", "values": list(fit.cs),
                         "curves": {"train acc": list(fit.path.train_acc), "val acc": list(fit.path.val_acc)},
                         "name": "C", "description": "the inverse L2 strength C",
                         "axis_label": "C (inverse L2 strength)", "selected": fit.selected},
              "title": run_title(data.meta, "L-BFGS probe", settings=_probe_settings(config))}
    head = HeadWeights(weight=fit.weight, bias=fit.bias, mean=fit.mean, std=fit.std)
    return write_head_run(cache=cache, meta=data.meta, config=config, summary=fit.summary,
                          timings={"load_s": data.load_s, "compile_s": fit.timings["compile_s"],
                                   "train_s": fit.timings["fit_s"]}, history=fit.history, head=head,
                          figures=curves, solver="lbfgs", extra={"lbfgs": record}, run_name=run_name,
                          progress=progress)


def train_knn(*, cache: str | Path, config: TrainConfig, ks: Sequence[int] | None = None,
              temperature: float | None = None, stream: bool | None = None, stream_memory_mib: int | None = None,
              run_name: str | None = None, progress: bool = True) -> RunResult:
    """The cosine k-NN probe (knn.fit_knn), k selected on val; its run directory has no head.npz (not a linear
    layer: export refuses it). extra["solver"] = "knn-k<chosen k>", extra["knn"] = every k's scores.

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: runs_dir is read (the rest is stored as given).
        ks: the k values; None = knn.DEFAULT_KS clipped to the train rows.
        temperature: T of the votes exp(sim / T); None = knn.TEMPERATURE (0.07).
        stream: True = read the train rows from the file block by block (knn.reader_blocks; caches larger than
            memory), False = load every split, None = stream only when loading would not fit in memory.
        stream_memory_mib: memory for a train block (None = stream.block_memory_mib).
        run_name, progress: as train_head.
    """
    from featcache import knn
    from featcache.cache import read_meta

    meta = read_meta(cache)
    stream, memory_mib = _streaming(meta, stream=stream, memory_mib=stream_memory_mib, progress=progress)
    temperature = knn.TEMPERATURE if temperature is None else float(temperature)
    options = dict(num_classes=len(meta["class_names"]), ks=ks, temperature=temperature,
                   class_names=[str(c) for c in meta["class_names"]])
    if stream:
        fit, load_s = _knn_streamed(cache, meta, memory_mib=memory_mib, options=options, progress=progress)
    else:
        data = load_splits(cache, meta=meta, progress=progress)
        fit, load_s = knn.fit_knn(*data.arrays, **options), data.load_s
    _say(progress, f"k-NN: {len(fit.ks)} k values from one search in {fit.timings['search_s']:.3f} s"
                   f"{' (train rows streamed)' if stream else ''}; selected k {fit.k} "
                   f"(val acc {fit.val_acc[fit.selected]:.4f})")
    from featcache.metrics import edge_note

    note = edge_note("k", fit.ks, fit.selected, option="--k")
    if note:
        _say(progress, f"Note: {note}")
    return write_head_run(cache=cache, meta=meta, config=config, summary=fit.summary,
                          timings={"load_s": load_s, "train_s": fit.timings["seconds"]}, history=fit.history,
                          solver=f"knn-k{fit.k}", extra={"knn": {**fit.to_dict(), "streamed": bool(stream),
                                                                 **({"note": note} if note else {})}},
                          run_name=run_name, progress=progress)


def _knn_streamed(cache: str | Path, meta: dict, *, memory_mib: int, options: dict, progress: bool):
    """(KnnFit, load seconds) with val and test loaded and the train rows read block by block within memory_mib."""
    from featcache.cache import FeatureReader, load_features
    from featcache.knn import fit_knn, reader_blocks

    t0 = time.perf_counter()
    val, test = (load_features(cache, split)[:2] for split in ("val", "test"))
    load_s = time.perf_counter() - t0
    rows = _knn_block_rows(memory_mib, int(meta["feature_dim"]))
    _say(progress, f"Reading the train rows from {cache} in blocks of {rows} rows")
    with FeatureReader(cache) as reader:
        rows = min(rows, reader.rows("train"))
        fit = fit_knn((reader_blocks(reader, "train", rows), reader.labels("train")), val, test,
                      train_block_rows=rows, **options)
    return fit, load_s


def _knn_block_rows(memory_mib: int, dim: int) -> int:
    """Train rows per block read for k-NN: float32 rows of `dim` within memory_mib (at least one)."""
    return max(1, memory_mib * 2 ** 20 // (4 * dim))


def train_fewshot(*, cache: str | Path, config: TrainConfig, solver: str, shots: Sequence[int], draws: int,
                  cs: Sequence[float] | None = None, ks: Sequence[int] | None = None,
                  temperature: float | None = None, run_name: str | None = None,
                  progress: bool = True) -> list[RunResult]:
    """Few-shot probes: `draws` stratified draws of K train rows per class for every K of `shots`, the solver
    ("lbfgs" or "knn") fitted on every draw in one program (fewshot.fewshot_lbfgs / fewshot_knn); one run
    directory per K (extra["solver"] = "<K>-shot-<solver>", no head.npz).

    Args:
        cache: a complete cache file written by `featcache extract`.
        config: seed (of the draws), standardize (lbfgs) and runs_dir are read.
        solver: "lbfgs" or "knn".
        shots, draws: the K values and the draws per K.
        cs, ks, temperature: the solver's grid, as train_lbfgs / train_knn.
        run_name: the run directory's name (with `-<K>shot` appended when several K); None = `<time>-head-<model>`.
        progress: one line per phase on stderr.

    Returns:
        One RunResult per K, ascending. Its summary pools the draws' test predictions (accuracy and balanced
        accuracy = their means over draws; the confusion matrix sums the draws'); extra["fewshot"] holds the
        mean ± 95 % t-interval over draws, each draw's choice and scores and its train rows as image paths.
    """
    from featcache import fewshot
    from featcache.cache import load_paths

    data = load_splits(cache, progress=progress)
    common = dict(num_classes=len(data.class_names), shots=shots, draws=draws, seed=config.seed,
                  class_names=data.class_names)
    if solver == "lbfgs":
        from featcache.lbfgs import DEFAULT_CS

        fit = fewshot.fewshot_lbfgs(*data.arrays, cs=DEFAULT_CS if cs is None else cs,
                                    standardize=config.standardize, **common)
    else:
        from featcache.knn import TEMPERATURE

        fit = fewshot.fewshot_knn(*data.arrays, ks=ks, temperature=TEMPERATURE if temperature is None
                                  else float(temperature), **common)
    paths = load_paths(cache, "train")
    _say(progress, f"Few-shot {solver}: {len(fit.results)} K x {draws} draws in one program in "
                   f"{fit.timings['seconds']:.2f} s")
    results = []
    for shot in fit.results:
        name = run_name if run_name is None or len(fit.results) == 1 else f"{run_name}-{shot.shots}shot"
        record = {**shot.to_dict(), "solver": solver, "seed": fit.seed,
                  "train_paths": [[paths[i] for i in draw] for draw in shot.rows.tolist()]}
        _say(progress, f"{shot.shots}-shot {solver}: test acc {shot.test_acc.mean:.4f} ± "
                       f"{shot.test_acc.half_width:.4f} (95 % interval over {draws} draws)")
        results.append(write_head_run(
            cache=cache, meta=data.meta, config=config, summary=_pooled_summary(shot, data, fit.timings["seconds"]),
            timings={"load_s": data.load_s, "train_s": fit.timings["seconds"]}, solver=f"{shot.shots}-shot-{solver}",
            extra={"fewshot": record}, run_name=name, progress=progress))
    return results


def _pooled_summary(shot, data: CacheSplits, seconds: float) -> RunSummary:
    """The run summary of one K: every draw's test predictions pooled (accuracies = means over the draws)."""
    import numpy as np

    from featcache.metrics import EpochRecord, summarize

    nan = float("nan")
    record = EpochRecord(epoch=1, lr=nan, train_loss=nan, train_acc=nan, val_loss=nan,
                         val_acc=float(np.mean(shot.val_acc)), seconds=seconds)
    y_test = np.asarray(data.test[1])
    scores = shot.test_scores.reshape(-1, shot.test_scores.shape[-1])  # (R * N_test, K)
    summary = summarize([record], 0, test_logits=scores, test_labels=np.tile(y_test, len(shot.rows)),
                        class_names=data.class_names, train_seconds=seconds, diverged=False)
    return dataclasses.replace(summary, test_loss=float(np.mean([s.test_loss for s in shot.summaries])))


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


def run_title(meta: Mapping, what: str = "head", *, config: TrainConfig | None = None,
              settings: str | None = None) -> str:
    """The title of a head run's figures: `<model> <what> on <dataset>, <crop> px` and, on a second line,
    `settings` (default: the trained head's settings of `config`, runs.settings_text)."""
    from featcache.runs import settings_text

    size = (meta.get("transform") or {}).get("crop") if isinstance(meta.get("transform"), Mapping) else None
    title = f"{meta['model']} {what} on {meta.get('dataset_name') or '?'}" + (f", {size} px" if size else "")
    settings = settings if settings is not None else (settings_text(config) if config is not None else None)
    return f"{title}\n{settings}" if settings else title


def _probe_settings(config: TrainConfig) -> str:
    return "features standardized" if config.standardize else "raw features"


def write_head_run(*, cache: str | Path, meta: Mapping, config: TrainConfig, summary: RunSummary,
                   timings: Mapping[str, float], history: Sequence[EpochRecord] = (),
                   head: HeadWeights | None = None, figures: Mapping | None = None,
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
        figures: the solver's entries of plots.draw_run_figures' spec ("curves", "grid", and "title" to replace
            run_title's); the test figures (confusion, ROC, calibration) and the chance line are added here.
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
    from featcache.environment import library_versions

    run_dir = runs.new_run_dir(runs_dir=config.runs_dir, mode="head", model=meta["model"], name=run_name)
    if head is not None:
        runs.save_head(run_dir / runs.HEAD_FILE, weight=head.weight, bias=head.bias,
                       class_names=list(summary.class_names), mean=head.mean, std=head.std)
    if history:
        runs.write_history_csv(run_dir / runs.HISTORY_FILE, history)
    clinical, scored = (_write_clinical(run_dir, cache=cache, meta=meta, config=config, head=head, logits=test_logits,
                                        splits=splits) if head is not None else (None, {}))
    drawer = _draw_figures(run_dir, meta=meta, config=config, summary=summary, solver=solver, figures=figures,
                           scored=scored, clinical=clinical)
    reference = underfit_check(summary, splits=splits, config=config) if solver is None and splits else None
    drawer.wait()  # every figure is written before metrics.json marks the run finished
    record = {**({"solver": solver} if solver else {}), **_cache_record(meta), **(extra or {}),
              **({"clinical": clinical} if clinical is not None else {}),
              **({"reference": reference} if reference else {})}
    result = runs.finish_run(run_dir, mode="head", model=meta["model"], config=config, summary=summary,
                             history=history, timings=timings, versions=library_versions(),
                             cache_key=meta.get("key"), cache_path=str(cache), extra=record)
    if result.diverged:
        _say(progress, f"Warning: {diverged_message(result)}")
    elif reference and reference.get("warning"):
        _say(progress, f"Warning: {reference['warning']}")
    _say(progress, f"Run written to {shell_quoted(run_dir)}")
    return result


def head_logits(head: HeadWeights, features) -> "np.ndarray":
    """(N, K) float64 logits of head.npz's head on features (N, D): ((x - mean) / std) @ weight.T + bias, the
    z-scoring in float32 as standardize.prepare_splits does it."""
    import numpy as np

    x = np.asarray(features, dtype=np.float32)
    if head.mean is not None:
        x = (x - head.mean) / head.std
    return x.astype(np.float64) @ np.asarray(head.weight, np.float64).T + np.asarray(head.bias, np.float64)


def _cache_record(meta: Mapping) -> dict:
    """The cache's fields a head run stores in extra: weights, dataset, feature dim, dtype, crop size, rows."""
    from featcache.cache import SPLITS

    return {"weights": meta.get("weights"), "dataset_name": meta.get("dataset_name"),
            "feature_dim": meta.get("feature_dim"), "cache_dtype": meta.get("dtype"),
            "image_size": (meta.get("transform") or {}).get("crop"),
            "rows": {split: int(meta["splits"].get(split, 0)) for split in SPLITS}}


def _draw_figures(run_dir: Path, *, meta: Mapping, config: TrainConfig, summary: RunSummary, solver: str | None,
                  figures: Mapping | None, scored: Mapping, clinical: Mapping | None):
    """Every figure of a head run, through plots.draw_run_figures (one picklable spec): the solver's `figures`
    entries (curves, grid, title), the test confusion matrix and, with logits, ROC and calibration. They are sent
    to the figure worker head_train started (else drawn here); returns that FigureWorker, which the caller waits
    for before metrics.json."""
    from featcache.metrics import chance_accuracy
    from featcache.plots import draw_run_figures
    from featcache.runs import test_figures

    title = run_title(meta, config=config) if solver is None else run_title(meta, solver,
                                                                             settings=_probe_settings(config))
    spec = {"title": title, "chance": chance_accuracy(summary.support), **(figures or {}),
            "test": test_figures(summary, logits=scored.get("logits"), labels=scored.get("labels"),
                                 clinical=clinical)}
    drawer = _FIGURES.get() or _here()
    drawer.call(draw_run_figures, run_dir, spec)
    return drawer


def _here():
    from featcache.figure_worker import FigureWorker

    return FigureWorker.here()


# A head whose train accuracy stays this far below closed-form ridge's on the same features underfits.
UNDERFIT_MARGIN = 0.05


def underfit_check(summary: RunSummary, *, splits: CacheSplits, config: TrainConfig) -> dict | None:
    """The closed-form ridge reference on the same cache (ridge.fit_ridge over its default L2 grid, milliseconds)
    and, when the trained head's train accuracy is more than UNDERFIT_MARGIN below ridge's, a warning that
    points to --lr or a sweep (the defaults are the study's and stay). None for a diverged head."""
    import math

    from featcache.ridge import DEFAULT_L2S, fit_ridge

    if summary.diverged or not math.isfinite(summary.train_acc):
        return None
    fit = fit_ridge(*splits.arrays, num_classes=len(splits.class_names), l2s=DEFAULT_L2S,
                    standardize=config.standardize, class_names=splits.class_names)
    record = {"solver": "ridge", "l2": fit.l2, "train_acc": float(fit.train_acc[fit.selected]),
              "val_acc": float(fit.val_acc[fit.selected]), "seconds": fit.seconds, "margin": UNDERFIT_MARGIN}
    if record["train_acc"] - summary.train_acc > UNDERFIT_MARGIN:
        record["warning"] = (
            f"the head's train acc {summary.train_acc:.3f} is far below the {record['train_acc']:.3f} (val "
            f"{record['val_acc']:.3f}) that closed-form ridge reaches on the same features: it underfits at "
            f"{config.optimizer} lr {config.lr:g} for {config.epochs} epochs. Try a larger --lr (e.g. "
            f"--lr {config.lr * 10:g}), a sweep (--lr {config.lr:g},{config.lr * 10:g},{config.lr * 100:g}) or "
            "--solver ridge / lbfgs.")
    return record


def _write_clinical(run_dir: Path, *, cache: str | Path, meta: Mapping, config: TrainConfig, head: HeadWeights,
                    logits, splits: CacheSplits | None) -> tuple[dict, dict]:
    """runs.write_clinical of a head run: val and test rows (and train labels) from `splits`, or read again
    from the cache when the fit did not load it (streamed). Returns (the clinical record, {"logits" (N_test, K),
    "labels" (N_test,)} for the figures)."""
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
    test_logits = head_logits(head, x_test) if logits is None else logits
    record = write_clinical(
        run_dir, val_logits=head_logits(head, x_val), val_labels=y_val, test_logits=test_logits, test_labels=y_test,
        test_paths=load_paths(cache, "test"), num_classes=len(meta["class_names"]), config=config,
        train_labels=y_train)
    return record, {"logits": test_logits, "labels": y_test}


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
