"""The backbone registry: one name -> a network cut at its pre-logits, its eval transform, its weights' identity.

Three sources, one module each, chosen by the model name:

* `torchvision_source`: the torchvision classifiers of BACKBONES (`resnet18`, ...);
* `timm_source`: `timm/<name>` (timm's zoo, pretrained tags, `hf-hub:` repos), with the
  `lite0_package` weights source for `timm/tf_efficientnet_lite0 --weights lite0-package`;
* `file_source`: your own backbone file (`.pt2` from torch.export, TorchScript `.pt`).

Importing this package imports neither torch, torchvision nor timm (the CLI reads BACKBONES for
`--help`); `describe_weights` (what the cache key needs) imports none of them for a timm model or a file.
"""

from __future__ import annotations

import difflib
from typing import Any

from featcache.backbones import file_source, timm_source
from featcache.backbones.common import (IMAGENET_CROP, IMAGENET_MEAN, IMAGENET_RESIZE, IMAGENET_STD, INIT_SEED,
                                        Backbone, BackboneSpec, make_finetune_net, make_train_transform,
                                        make_transform, pick_device)
from featcache.backbones.torchvision_source import BACKBONES, describe_registry, eval_transform_desc
from featcache.backbones import torchvision_source
from featcache.errors import UserError

__all__ = [
    "BACKBONES", "IMAGENET_CROP", "IMAGENET_MEAN", "IMAGENET_RESIZE", "IMAGENET_STD", "INIT_SEED", "Backbone",
    "BackboneSpec", "build_backbone", "check_finetunable", "check_model", "describe_registry", "describe_weights", "eval_transform_desc",
    "get_spec", "is_backbone_file", "key_transform_is_deferred", "make_finetune_net", "make_train_transform", "make_transform", "pick_device",
    "source_of",
]

is_backbone_file = file_source.is_backbone_file


def source_of(model: str):
    """The source module that builds `model`: timm_source, file_source or torchvision_source."""
    if timm_source.is_timm(model):
        return timm_source
    if model not in BACKBONES and file_source.is_backbone_file(model):
        return file_source
    return torchvision_source


def check_model(model: str) -> None:
    """UserError for a --model that names nothing featcache can build (no torch, no timm import)."""
    if model == timm_source.PREFIX:
        raise UserError("--model timm/ needs a model name, e.g. timm/resnet18; list them with featcache models "
                        "--timm 'resnet*'.")
    if source_of(model) is torchvision_source and model not in BACKBONES:
        close = difflib.get_close_matches(model, list(BACKBONES), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"Unknown model {model!r}; {hint}choose one of: {', '.join(sorted(BACKBONES))}, "
                        "a timm model as timm/<name> (featcache models --timm PATTERN), or a backbone file (.pt2).")


def check_finetunable(model: str, *, frozen: bool) -> None:
    """UserError when `finetune` would train a backbone file (only its frozen loop runs on one)."""
    check_model(model)
    if source_of(model) is file_source and not frozen:
        raise UserError(f"{model} is a backbone file, which featcache uses frozen only; run featcache extract and "
                        "head-train on it (or finetune --freeze-backbone), or fine-tune a torchvision or timm/ model.")


def get_spec(name: str) -> BackboneSpec:
    """The torchvision registry entry of `name`; UserError if there is none (timm and files: see check_model)."""
    check_model(name)
    return torchvision_source.get_spec(name)


def describe_weights(model: str, *, weights: str = "imagenet",
                     image_size: int | None = None) -> tuple[str, str, dict[str, Any]]:
    """(weights_tag, weights_id, transform for the cache key) of a build, without building or downloading anything.

    A timm model's transform entry is a placeholder (timm_source.DEFERRED): the resolved transform
    is stored in the cache when it is extracted.
    """
    check_model(model)
    return source_of(model).describe_weights(model, weights=weights, image_size=image_size)


def build_backbone(model: str, *, weights: str = "imagenet", image_size: int | None = None) -> Backbone:
    """Build `model` cut at its pre-logits with its weights and eval transform; `net` in eval mode on the CPU.

    Args:
        model: a torchvision name of BACKBONES, `timm/<name>`, or the path of a backbone file.
        weights: "imagenet" (the model's pretrained weights; a file's own), "none" (seeded random init),
            "lite0-package" (timm/tf_efficientnet_lite0 only) or the path of a weights file.
        image_size: crop size of the eval transform; None = the model's native size.

    Raises:
        UserError: unknown model, bad image_size, weights that cannot be fetched or read or do not fit.
    """
    check_model(model)
    return source_of(model).build_backbone(model, weights=weights, image_size=image_size)


def key_transform_is_deferred(transform: dict) -> bool:
    """Is this key transform a placeholder, the real one known only once the backbone is built (timm)?"""
    return transform.get("transform") == timm_source.DEFERRED
