"""featcache: cache a backbone's features once, train heads on the cache in JAX, compare with fine-tuning.

The Python API mirrors the commands; these are plain functions re-exported from featcache.api.
Importing featcache imports neither torch nor jax; each function imports what it needs, so the
JAX side never loads torch and the other way round.

    >>> import featcache
    >>> path = featcache.extract(model="resnet18", data="demo", weights="none", image_size=64)
    >>> x, y, meta = featcache.load_features(path, "train")
    >>> run = featcache.train_head(cache=path, epochs=30)
    >>> run.summary.test_acc
"""

from __future__ import annotations

from featcache.api import (compare, export, extract, finetune, finetune_seeds, load_features, load_model, predict, report,
                           run_demo, shift_check, train_grid, train_head, train_ridge)
from featcache.api import run_study

__all__ = ["extract", "load_features", "train_head", "train_grid", "train_ridge", "finetune", "finetune_seeds",
           "report", "compare", "export", "load_model", "predict", "shift_check", "run_demo", "run_study"]
