"""The Python API: one function per command (re-exported as featcache.extract, featcache.train_head, ...).

Each function builds the command's config from its keyword arguments (`config_from`) and calls the
library function the command calls, so both get the same checks. Each imports what it needs inside
its body, so importing the API starts neither torch nor jax; see featcache/__init__.py for an example
session.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

__all__ = ["extract", "load_features", "train_head", "finetune", "report", "compare", "export", "load_model", "predict",
           "train_grid", "train_ridge", "finetune_seeds", "shift_check", "run_demo", "run_study"]


def config_from(cls, options: dict, **given):
    """cls(**given, **the entries of `options` named like its fields); those entries leave `options`.

    The CLI and the API build every config this way: one keyword argument or click option, one field.
    """
    return cls(**given, **_split_kwargs(cls, options))


def _split_kwargs(cls, kwargs: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def _data_config(data: str | Path, kwargs: dict):
    from featcache.config import DataConfig

    return config_from(DataConfig, kwargs, root=str(data))


def _quiet(_: str) -> None:
    """The API's log: silent (the functions return what the commands print)."""


def extract(*, model: str, data: str | Path, progress: bool = False, **options) -> Path:
    """Extract (or find) the cache of `model` over the dataset `data` ("demo" or a folder).

    Options are the fields of ExtractConfig and DataConfig (weights, image_size, dtype, cache_dir,
    batch_size, val_fraction, ...). Returns the path of the complete cache file.
    """
    from featcache.config import ExtractConfig
    from featcache.extraction import extract as _extract

    config = config_from(ExtractConfig, options, model=model, data=_data_config(data, options))
    _reject_unknown(options)
    return _extract(config, progress=progress, log=_quiet)


def load_features(path: str | Path, split: str):
    """(features (N, D), labels (N,), meta) of one split of a complete cache file."""
    from featcache.cache import load_features as _load

    return _load(path, split)


def train_head(*, cache: str | Path, solver: str = "sgd", cs=None, ks=None, temperature: float | None = None,
               shots=None, draws: int | None = None, run_name: str | None = None, progress: bool = False,
               stream: bool | None = None, stream_memory_mib: int | None = None, **options):
    """Train a head (JAX) on a cache file with one solver; options are TrainConfig fields. Returns a RunResult.

    solver: "sgd" (the trained head), "ridge", "lbfgs" (logistic regression over the C grid cs, None = 32
    values 1e-6 ... 1e6, C selected on val; head.npz exportable) or "knn" (cosine k-NN over the k values ks,
    votes exp(sim / temperature), k selected on val; no head.npz).
    shots: few-shot K values with solver "lbfgs" or "knn": `draws` (None = 5) draws of K train rows per class,
    seeded by options["seed"]; returns a list, one RunResult per K (mean ± 95 % interval over draws in
    extra["fewshot"]).
    stream=True reads the train rows from the file block by block (caches larger than memory; the same
    results; sgd and knn); None streams only when loading would not fit in the memory available.
    Options that do not combine are the command's one-sentence UserErrors.
    """
    from featcache.config import TrainConfig
    from featcache.head_runs import head_train

    config = TrainConfig(**_split_kwargs(TrainConfig, options))
    _reject_unknown(options)
    return head_train(cache=cache, config=config, solver=solver, cs=cs, ks=ks, temperature=temperature,
                      shots=shots, draws=draws, run_name=run_name, progress=progress, stream=stream,
                      stream_memory_mib=stream_memory_mib)


def finetune(*, model: str, data: str | Path, resume: str | Path | None = None, progress: bool = False,
             **options):
    """Fine-tune `model` (or train only its head with freeze_backbone=True) in PyTorch. Returns a RunResult.

    Options are the fields of FinetuneConfig, DataConfig and TrainConfig; resume: a stopped run directory.
    """
    (run,) = finetune_seeds(model=model, data=data, seeds=1, resume=resume, progress=progress, **options)
    return run


def report(runs, *, format: str = "table", figure: str | Path | None = None) -> str:
    """Runs (RunResult objects or run directories) side by side; returns the text that `featcache report` prints."""
    from featcache.reporting import compare_runs

    return compare_runs(runs, format=format, figure=figure)


def compare(run_a: str | Path, run_b: str | Path, *, figure: str | Path | None = None, **options):
    """Paired bootstrap of two runs' test metrics on their shared test images; options: CompareConfig fields
    (bootstrap, seed). Returns a paired.Comparison (.table() is what `featcache compare` prints)."""
    from featcache.paired import compare_paired
    from featcache.config import CompareConfig

    config = config_from(CompareConfig, options, figure=None if figure is None else str(figure))
    _reject_unknown(options)
    return compare_paired(run_a, run_b, config=config)


def export(run_dir: str | Path, *, out: str | Path | None = None, format: str = "exported",
           weights: str | None = None, cache: str | Path | None = None, data_root: str | Path | None = None,
           atol: float = 1e-4):
    """Export a finished run as one torch module (cut backbone + linear head), checked before it is written.

    format "exported" (torch.export .pt2), "torchscript" or "state-dict"; out None = RUN_DIR/model.pt2. weights: the file a head run's cache
    was extracted from, when it was a file. Returns an ExportResult (path, max_abs_diff, ...).
    """
    from featcache.exporting import export as _export

    return _export(run_dir, out=out, format=format, weights=weights, cache=cache, data_root=data_root,
                   atol=atol, log=lambda _: None)


def load_model(path: str | Path):
    """A model written by `featcache export`: images (N, 3, S, S) -> logits, with .class_names and .transform."""
    from featcache.exporting import load_model as _load

    return _load(path)


def predict(model, images, *, batch_size: int = 64, num_workers: int = -1, device: str = "cpu",
            weights: str | None = None, progress: bool = False, precision: str = "auto"):
    """Classify image files/folders with an exported model (module, file or run directory).

    Returns Predictions: .rows (path, predicted class, probability per class), .failed (path, reason)
    of unreadable images, .class_names, .logits. Use num_workers=0 in a process that has loaded JAX.
    """
    from featcache.prediction import predict as _predict

    return _predict(model, images, batch_size=batch_size, num_workers=num_workers, device=device,
                    weights=weights, progress=progress, precision=precision)


def train_grid(*, cache: str | Path, lrs, weight_decays=(0.0,), seeds=1, run_name: str | None = None,
               progress: bool = False, **options):
    """Train every (lr, weight decay, seed) head on a cache as ONE vmapped program and select on val.

    seeds: a count K (seeds seed, seed+1, ..., from options["seed"], default 0) or a list of seeds.
    Options are the other TrainConfig fields. Returns the RunResult of the selected (lr, wd) with the
    first seed; extra["grid"] holds every cell (mean ± 95 % CI over seeds), extra["seed_stats"] the
    selected cell's intervals.
    """
    from featcache.config import TrainConfig
    from featcache.head_runs import head_train

    config = TrainConfig(**_split_kwargs(TrainConfig, options))
    _reject_unknown(options)
    return head_train(cache=cache, config=config, lrs=list(lrs), weight_decays=list(weight_decays), seeds=seeds,
                      grid=True, run_name=run_name, progress=progress)


def train_ridge(*, cache: str | Path, l2s=None, run_name: str | None = None, progress: bool = False, **options):
    """Closed-form ridge head on a cache over the L2 strengths l2s (None: 2^-10 ... 2^20), λ selected on val.

    Options: standardize, runs_dir (TrainConfig fields). Returns a RunResult (mode "head",
    extra["solver"] = "ridge", extra["ridge"] = the whole path).
    """
    from featcache.config import TrainConfig
    from featcache.head_runs import head_train

    config = TrainConfig(**_split_kwargs(TrainConfig, options))
    _reject_unknown(options)
    return head_train(cache=cache, config=config, solver="ridge", l2s=l2s, run_name=run_name, progress=progress)


def finetune_seeds(*, model: str, data: str | Path, seeds: int, resume: str | Path | None = None,
                   progress: bool = False, **options) -> list:
    """`finetune` with seeds seed, seed+1, ..., seed+K-1 in turn (one run each); returns their RunResults.

    report(runs) then shows their mean ± 95 % CI; featcache.metrics.mean_interval computes it.
    resume continues one stopped run, so only with seeds=1.
    """
    from featcache.config import FinetuneConfig, TrainConfig
    from featcache.finetuning import finetune_seeds as _finetune_seeds

    train = config_from(TrainConfig, options)
    config = config_from(FinetuneConfig, options, model=model, data=_data_config(data, options))
    _reject_unknown(options)
    return _finetune_seeds(config, train, seeds=seeds, resume=resume, progress=progress, log=_quiet)


def shift_check(*, cache: str | Path | None = None, between=None, split: str = "all", **options):
    """Shift check on cached features: cache's test vs train, or between=(A.h5, B.h5) (B vs A).

    Options: folds, permutations, seed, l2_scale, top, neighbours, max_rows (featcache.shift.check_shift).
    Returns a ShiftReport (.auc, .p_value, .classes, .foreign, .verdict(), .to_dict()). `featcache shift`
    calls this function too (the routing and its check live here, once).
    """
    from featcache.errors import UserError
    from featcache.shift import check_between, check_cache

    if (cache is None) == (between is None):
        raise UserError("Give --cache FILE (train vs test) or --between A.h5 B.h5 (two datasets), not both.")
    if cache is not None:
        return check_cache(cache, **options)
    return check_between(*between, split=split, **options)


def run_demo(*, verbose: bool = False, **options):
    """Run `featcache demo`: a small study on the demo data (extract, head-train, the frozen loop, fine-tune,
    report.md/report.html), then export the best cached head and predict the demo test images.

    Options: models, image_size, epochs, finetune_epochs, lr, seeds, cache_dir, runs_dir (the keywords of
    featcache.demo_run.run_demo, with its defaults). verbose: print what the command prints. (Not named
    `demo`: featcache.demo is the module of the demo dataset.) Returns a DemoResult (.study, .head,
    .model_path, .predicted_acc, .report_html).
    """
    from featcache.demo_run import run_demo as _run_demo

    return _run_demo(**options, progress=verbose, log=print if verbose else _quiet)


def run_study(*, plan_file: str | Path | None = None, force: bool = False, report_only: bool = False,
          verbose: bool = False, **options):
    """Run `featcache study` (not named `study`: featcache.study is the package): the plan's runs not yet finished (cheap first), then the study's report.

    Options are the fields of featcache.study.plan.StudyPlan (data, out, models, modes, solvers, seeds, epochs,
    ...; lists as lists or tuples); plan_file: a plan TOML (options override its keys). verbose: print what
    the command prints. Returns a StudyResult (.report = report.json's content, .report_html, .trained).
    """
    from featcache.study.plan import StudyPlan, plan_from
    from featcache.study.runner import run_study as _run_study

    given = {k: tuple(v) if isinstance(v, list) else v for k, v in _split_kwargs(StudyPlan, options).items()}
    _reject_unknown(options)
    plan = plan_from(given, plan_file=plan_file)
    return _run_study(plan, force=force, report_only=report_only, progress=verbose,
                      log=print if verbose else _quiet)


def _reject_unknown(options: dict) -> None:
    if options:
        raise TypeError(f"unknown option(s): {', '.join(sorted(options))}")
