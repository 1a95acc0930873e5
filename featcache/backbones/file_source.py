"""The file source: your own backbone as a file, `--model path/to/backbone.pt2` (torch.export) or a TorchScript `.pt`.

The file maps a normalized image batch (N, 3, S, S) to features (N, D), with a dynamic batch
dimension. Its preprocessing comes from the extra file `featcache.json` in the archive (both formats
take `extra_files`): `input_size`, `resize`, `interpolation`, `mean`, `std` (or the `transform` that
`featcache export` writes); without it, the ImageNet preset. The file carries its own weights
(`--weights` stays at its default), its SHA-256 identifies them. Frozen modes only: `finetune` of a
backbone file is refused.

`describe_weights` reads the archive with zipfile (no torch): a cache hit never imports torch.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from typing import TYPE_CHECKING, Any

from featcache.backbones.common import (IMAGENET_CROP, IMAGENET_MEAN, IMAGENET_RESIZE, IMAGENET_STD, Backbone,
                                        BackboneSpec, first_line, make_transform, sha256_of)
from featcache.errors import UserError

if TYPE_CHECKING:
    from torch import nn

SUFFIXES = (".pt2", ".pt", ".pth", ".ts", ".torchscript")
META_FILE = "featcache.json"
WEIGHTS_TAG = "backbone-file"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
FILE_WEIGHTS = ("imagenet", WEIGHTS_TAG)  # the --weights values a backbone file accepts (its own weights)


def is_backbone_file(model: str) -> bool:
    """Does `model` name a backbone file (a path with a known suffix, or any existing file)?"""
    return model.endswith(SUFFIXES) or os.sep in model or os.path.isfile(model)


def describe_weights(model: str, *, weights: str, image_size: int | None) -> tuple[str, str, dict[str, Any]]:
    """(weights tag, weights id = the file's SHA-256, transform description) without importing torch."""
    if not os.path.isfile(model):
        raise UserError(f"Backbone file {model} does not exist; pass a torch.export .pt2 or TorchScript file "
                        "(see docs/backbones.md), a torchvision name (featcache models) or timm/<name>.")
    if weights not in FILE_WEIGHTS:
        raise UserError(f"{model} is a backbone file and carries its own weights; drop --weights {weights}.")
    desc, _ = transform_desc(model, image_size=image_size)
    return WEIGHTS_TAG, sha256_of(model), desc


def read_meta(path: str) -> dict[str, Any] | None:
    """The JSON of the archive's extra file featcache.json, or None when it has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + META_FILE)]
            if not names:
                return None
            return json.loads(archive.read(names[0]))
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a torch.export .pt2 or TorchScript file (not a zip archive); save one "
                        "with torch.export.save or torch.jit.save.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: its {META_FILE} is not JSON ({first_line(exc)}); write it with "
                        "json.dumps.") from exc


def transform_desc(path: str, *, image_size: int | None) -> tuple[dict[str, Any], bool]:
    """(eval transform description, whether it came from the file) of a backbone file."""
    meta = read_meta(path)
    if meta is None:
        crop = int(image_size or IMAGENET_CROP)
        return {"resize": round(crop * IMAGENET_RESIZE / IMAGENET_CROP), "crop": crop, "interpolation": "bilinear",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, False
    given = dict(meta.get("transform") or meta)  # `featcache export` writes {"transform": {...}, ...}
    try:
        crop = int(given.get("crop") or given["input_size"])
        desc = {"resize": int(given.get("resize") or crop), "crop": crop,
                "interpolation": str(given.get("interpolation", "bilinear")),
                "mean": [float(m) for m in given.get("mean", IMAGENET_MEAN)],
                "std": [float(s) for s in given.get("std", IMAGENET_STD)]}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: its {META_FILE} lacks a valid input_size ({first_line(exc)}); write "
                        '{"input_size": S, "resize": R, "interpolation": "bilinear", "mean": [...], "std": [...]}.') \
            from exc
    if desc["interpolation"] not in INTERPOLATIONS or len(desc["mean"]) != 3 or len(desc["std"]) != 3:
        raise UserError(f"{path}: its {META_FILE} needs interpolation one of {', '.join(INTERPOLATIONS)} and three "
                        "mean and std values.")
    if image_size is not None and image_size != crop:
        raise UserError(f"{path} takes {crop} px images (its {META_FILE}); drop --image-size or pass {crop}.")
    return desc, True


def build_backbone(model: str, *, weights: str = "imagenet", image_size: int | None = None) -> Backbone:
    """Load a backbone file, check that it maps (2, 3, S, S) to (2, D), and give its transform.

    Raises:
        UserError: missing or unreadable file, bad featcache.json, output not (N, D).
    """
    _, sha, desc = describe_weights(model, weights=weights, image_size=image_size)
    _, from_file = transform_desc(model, image_size=image_size)
    notes = () if from_file else (f"{model} has no {META_FILE}: its images get the ImageNet preset "
                                  f"(resize {desc['resize']}, crop {desc['crop']}, ImageNet mean and std).",)
    net = wrap_program(load_program(model))
    feature_dim = _feature_dim(net, model, desc["crop"])
    spec = BackboneSpec(name=model, feature_dim=feature_dim, head_slot="", input_size=desc["crop"],
                        min_size=desc["crop"], fixed_size=True, weights_enum="", finetunable=False)
    return Backbone(spec=spec, net=net, weights_tag=WEIGHTS_TAG, weights_sha256=sha,
                    transform=make_transform(desc), transform_desc=desc, notes=notes)


def is_torchscript(path: str) -> bool:
    """A TorchScript archive (code/ and constants.pkl) rather than a torch.export one."""
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def load_program(path: str) -> nn.Module:
    """The module of a torch.export `.pt2` (ExportedProgram.module()) or a TorchScript file, on the CPU."""
    import torch

    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                return torch.jit.load(path, map_location="cpu")
        with open(path, "rb") as f:  # a file object: any file name (torch warns about a path not ending in .pt2)
            return torch.export.load(f).module()
    except (zipfile.BadZipFile, OSError):
        raise UserError(f"{path} is not a torch.export .pt2 or TorchScript file; save one with torch.export.save "
                        "or torch.jit.save.") from None
    except Exception as exc:  # a corrupt or foreign archive
        raise UserError(f"{path} could not be loaded as a torch.export or TorchScript program ({first_line(exc)}); "
                        "save it again with torch.export.save.") from exc


def wrap_program(program: nn.Module) -> nn.Module:
    """`program` inside an nn.Module whose train()/eval() do not reach it (torch.export's module refuses them).

    The program runs as it was saved (in eval mode); `.to(device)` and the state_dict pass through.
    """
    from torch import nn

    class ProgramModule(nn.Module):
        def __init__(self, program: nn.Module):
            super().__init__()
            self.program = program

        def train(self, mode: bool = True):
            self.training = mode
            return self

        def forward(self, images):
            return self.program(images)

    return ProgramModule(program)


def _feature_dim(net: nn.Module, path: str, size: int) -> int:
    """D of a program's output on a (2, 3, size, size) batch; UserError unless it is a (2, D) tensor."""
    import torch

    try:
        with torch.inference_mode():
            out = net(torch.zeros(2, 3, size, size))
    except Exception as exc:  # the program does not take such a batch
        raise UserError(f"{path} does not run on a (2, 3, {size}, {size}) image batch ({first_line(exc)}); export it "
                        "with a dynamic batch dimension and the input_size of its featcache.json.") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        what = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}")
        raise UserError(f"{path} maps a (2, 3, {size}, {size}) image batch to {what}, not features (N, D); make its "
                        "forward return one feature vector per image (flatten or pool it).")
    return int(out.shape[1])
