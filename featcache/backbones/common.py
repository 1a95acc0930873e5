"""What every backbone source shares: the Backbone a build returns, its spec, transforms, devices, file hashes.

No torch import at module level (the CLI imports the registry for `--help`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from featcache.errors import UserError

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from torch import nn

# The preset torchvision uses for ImageNet classification; the eval transform without pretrained weights.
IMAGENET_RESIZE = 256
IMAGENET_CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INIT_SEED = 0  # weights="none": every build of a model starts from the same random init


@dataclass(frozen=True)
class BackboneSpec:
    """What featcache knows about one backbone before building it (torchvision: the registry; timm, file: built)."""

    name: str
    feature_dim: int  # D: width of the penultimate features
    head_slot: str  # dotted path of the final classifier layer in the full model ("" for a backbone file)
    input_size: int  # native crop size
    min_size: int  # smallest square input the cut network accepts (measured, torchvision 0.29)
    fixed_size: bool  # True: only input_size is accepted (ViT position embeddings)
    weights_enum: str  # what --weights imagenet means (torchvision's DEFAULT weights; timm: the pretrained tag)
    finetunable: bool = True  # False: a backbone file (frozen modes only: `finetune` refuses it)


@dataclass
class Backbone:
    """A built backbone: the cut network, where its weights came from, and its eval transform."""

    spec: BackboneSpec
    net: nn.Module  # images (N, 3, H, W) float32 -> features (N, D) float32; eval mode
    weights_tag: str  # "imagenet:<id>" | "none" | "file:<basename>" | "lite0-package:<version>" | "backbone-file"
    weights_sha256: str  # sha256 of the weights file; "" for "none"
    transform: Callable[[Image.Image], torch.Tensor]  # RGB PIL image -> (3, crop, crop) float32
    transform_desc: dict[str, Any]  # JSON-able description of `transform`; part of the cache key (torchvision, file)
    notes: tuple[str, ...] = ()  # what the user should know about this build (extract prints them)


def make_transform(desc: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Eval transform from its description: Resize, CenterCrop, ToTensor, Normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(desc["resize"], interpolation=T.InterpolationMode(desc["interpolation"]), antialias=True),
            T.CenterCrop(desc["crop"]),
            T.ToTensor(),
            T.Normalize(desc["mean"], desc["std"]),
        ]
    )


def make_train_transform(desc: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """--augment train transform from the eval description: RandomResizedCrop, RandomHorizontalFlip, same Normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(desc["crop"], interpolation=T.InterpolationMode(desc["interpolation"]), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(desc["mean"], desc["std"]),
        ]
    )


def make_finetune_net(backbone: Backbone, num_outputs: int) -> nn.Sequential:
    """`.backbone` (the cut net) then `.head` = nn.Linear(D, num_outputs); finetune sets the head init from the plan."""
    from torch import nn

    head = nn.Linear(backbone.spec.feature_dim, num_outputs)
    return nn.Sequential(OrderedDict(backbone=backbone.net, head=head))  # (N, 3, H, W) -> (N, D) -> (N, outputs)


def pick_device(device: str) -> torch.device:
    """torch.device for --device "cpu", "cuda", "cuda:N" or "auto" (cuda when available)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError("CUDA is not available on this machine; use --device cpu.")
        picked = torch.device(device)
        if picked.index is not None and picked.index >= torch.cuda.device_count():
            last = torch.cuda.device_count() - 1
            raise UserError(f"There is no {device} on this machine; pass --device cuda:0 to cuda:{last}.")
        return picked
    raise UserError(f"Unknown device {device!r}; use --device cpu, cuda or auto.")


def state_dict_problems(got: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """What keeps `got` (a state_dict) from loading into a network whose state_dict is `expected`; [] if nothing.

    Each entry names the first offending key: missing, unexpected, or of another shape.
    """
    problems = []
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong_shape = sorted(k for k in expected.keys() & got.keys() if tuple(expected[k].shape) != tuple(got[k].shape))
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong_shape:
        k = wrong_shape[0]
        shapes = f"{tuple(got[k].shape)} vs {tuple(expected[k].shape)}"
        problems.append(f"{len(wrong_shape)} shape mismatches (e.g. {k}: {shapes})")
    return problems


def sha256_of(path: str) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(exc: BaseException) -> str:
    """A short reason for a user message: the exception's first line, at most 200 characters."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
