"""The Python API: one function per command (re-exported as featcache.extract, featcache.train_head, ...).

The API mirrors the commands. Importing featcache imports neither torch nor jax; each
function imports what it needs, so the JAX side never loads torch and the other way round.

    >>> import featcache
    >>> path = featcache.extract(model="resnet18", data="demo", weights="none", image_size=64)
    >>> x, y, meta = featcache.load_features(path, "train")
    >>> run = featcache.train_head(cache=path, epochs=30)
    >>> run.summary.test_acc
"""

from __future__ import annotations

import types
from dataclasses import fields
from pathlib import Path
from typing import Callable

__all__ = ["extract", "load_features", "train_head", "finetune", "report", "make_module_callable"]


def _split_kwargs(cls, kwargs: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def _data_config(data: str, kwargs: dict):
    from featcache.config import DataConfig

    return DataConfig(root=str(data), **_split_kwargs(DataConfig, kwargs))


def extract(*, model: str, data: str | Path, progress: bool = False, **options) -> Path:
    """Extract (or find) the cache of `model` over the dataset `data` ("demo" or a folder).

    Options are the fields of ExtractConfig and DataConfig (weights, image_size, dtype, cache_dir,
    batch_size, val_fraction, ...). Returns the path of the complete cache file.
    """
    from featcache.config import ExtractConfig
    from featcache.extract import extract as _extract

    data_config = _data_config(data, options)
    config = ExtractConfig(model=model, data=data_config, **_split_kwargs(ExtractConfig, options))
    _reject_unknown(options)
    return _extract(config, progress=progress, log=lambda _: None)


def load_features(path: str | Path, split: str):
    """(features (N, D), labels (N,), meta) of one split of a complete cache file."""
    from featcache.cache import load_features as _load

    return _load(path, split)


def train_head(*, cache: str | Path, run_name: str | None = None, progress: bool = False, **options):
    """Train the linear head (JAX) on a cache file; options are TrainConfig fields. Returns a RunResult."""
    from featcache.config import TrainConfig
    from featcache.head import train_head as _train

    config = TrainConfig(**_split_kwargs(TrainConfig, options))
    _reject_unknown(options)
    return _train(cache=cache, config=config, run_name=run_name, progress=progress)


def finetune(*, model: str, data: str | Path, resume: str | Path | None = None, progress: bool = False,
             **options):
    """Fine-tune `model` (or train only its head with freeze_backbone=True) in PyTorch. Returns a RunResult.

    Options are the fields of FinetuneConfig, DataConfig and TrainConfig.
    """
    from featcache.config import FinetuneConfig, TrainConfig
    from featcache.finetune import finetune as _finetune

    data_config = _data_config(data, options)
    train = TrainConfig(**_split_kwargs(TrainConfig, options))
    config = FinetuneConfig(model=model, data=data_config, **_split_kwargs(FinetuneConfig, options))
    _reject_unknown(options)
    return _finetune(config, train, resume=resume, progress=progress, log=lambda _: None)


def report(runs, *, format: str = "table", figure: str | Path | None = None) -> str:
    """Runs (RunResult objects or run directories) side by side; returns the text that `featcache report` prints."""
    from featcache.report import compare_runs

    return compare_runs(runs, format=format, figure=figure)


def _reject_unknown(options: dict) -> None:
    if options:
        raise TypeError(f"unknown option(s): {', '.join(sorted(options))}")


def make_module_callable(module: types.ModuleType, function: Callable) -> None:
    """Make `module(...)` call `function(...)`.

    featcache.extract, featcache.finetune and featcache.report are both submodules (DESIGN.md's
    layout) and API functions; importing a submodule sets the package attribute to the module,
    so the module itself must be callable for `featcache.extract(...)` to work in any import order.
    """
    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return function(*args, **kwargs)

    CallableModule.__call__.__doc__ = function.__doc__
    module.__class__ = CallableModule
