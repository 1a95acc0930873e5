"""featcache: cache a backbone's features once, train heads on the cache in JAX, compare with fine-tuning.

The Python API mirrors the commands. Importing featcache imports neither torch nor jax; each
function imports what it needs, so the JAX side never loads torch and the other way round.

    >>> import featcache
    >>> path = featcache.extract(model="resnet18", data="demo", weights="none", image_size=64)
    >>> x, y, meta = featcache.load_features(path, "train")
    >>> run = featcache.train_head(cache=path, epochs=30)
    >>> run.summary.test_acc

`featcache.extract`, `featcache.finetune`, `featcache.report`, `featcache.export` and
`featcache.predict` are also the submodules of those names; they are callable (see
featcache.api.make_module_callable).
"""

from __future__ import annotations

import importlib

from featcache.api import load_features, load_model, train_head

__all__ = ["extract", "load_features", "train_head", "finetune", "report", "export", "load_model", "predict"]


def __getattr__(name: str):
    # The first access imports the submodule, which makes itself callable as the API function.
    if name in ("extract", "finetune", "report", "export", "predict"):
        return importlib.import_module(f"featcache.{name}")
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
