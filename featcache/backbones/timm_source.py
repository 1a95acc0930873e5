"""The timm source: `timm/<name>` (any timm model, a pretrained tag, or `hf-hub:<org>/<repo>`) cut at its pre-logits.

Penultimate features are what timm defines as pre-logits: the model with its classifier reset to
nothing (`reset_classifier(0)`), i.e. the input of the classifier of the full model. The eval
transform comes from the model's pretrained config (timm's `resolve_data_config`: input size,
crop_pct, interpolation, mean, std). Weights: "imagenet" = the model's own pretrained weights (timm and
huggingface_hub fetch them into their usual cache), "none" = a seeded random init, "lite0-package" (only
`tf_efficientnet_lite0`) = the weights of the pip package, PATH = a state_dict or safetensors file.

The cache key is computed without importing timm or torch (`describe_weights`): model name, timm's
version and the weights' identity; the transform timm resolves is stored in the cache when it is
extracted.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import math
import os
from typing import TYPE_CHECKING, Any

from featcache.backbones import lite0_package
from featcache.backbones.common import (INIT_SEED, Backbone, BackboneSpec, first_line, make_transform, sha256_of,
                                        state_dict_problems)
from featcache.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFIX = "timm/"
LIST_LIMIT = 60  # `featcache models --timm PATTERN` lists at most this many names
# What the cache key holds in place of the transform: timm resolves it from the pretrained config at extraction.
DEFERRED = "resolved from timm's pretrained config at extraction"
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def is_timm(model: str) -> bool:
    """Does `model` name a timm model (`timm/<name>`)?"""
    return model.startswith(PREFIX)


def timm_version() -> str:
    """timm's installed version, without importing it; UserError if it is not installed."""
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("timm/ models need the package timm, which is not installed; pip install timm.") from None


def describe_weights(model: str, *, weights: str, image_size: int | None) -> tuple[str, str, dict[str, Any]]:
    """(weights_tag, weights_id, key transform) of `model` without importing timm or torch (see the module doc)."""
    name = model[len(PREFIX):]
    if not name:
        raise UserError("--model timm/ needs a model name, e.g. timm/resnet18; list them with featcache models "
                        "--timm 'resnet*'.")
    version = timm_version()
    key_transform = {"source": "timm", "transform": DEFERRED, "image_size": image_size}
    if weights == "imagenet":
        return f"imagenet:{model}", f"timm-{version}:pretrained:{name}", key_transform
    if weights == "none":
        torch_version = importlib.metadata.version("torch")
        return "none", f"init-seed:{INIT_SEED}:torch-{torch_version}:timm-{version}", key_transform
    if weights == lite0_package.WEIGHTS:
        if name != lite0_package.ARCHITECTURE:
            raise UserError(f"--weights {weights} holds EfficientNet-Lite0 weights; use it with --model "
                            f"timm/{lite0_package.ARCHITECTURE}, not {model}.")
        tag, sha = lite0_package.describe()
        return tag, f"{sha}:timm-{version}", key_transform
    if not os.path.isfile(weights):
        raise UserError(f"Weights file {weights} does not exist; pass --weights imagenet, --weights none, or the "
                        "path to a state_dict (torch.save) or .safetensors file of the timm model.")
    return f"file:{os.path.basename(weights)}", f"{sha256_of(weights)}:timm-{version}", key_transform


def build_backbone(model: str, *, weights: str = "imagenet", image_size: int | None = None) -> Backbone:
    """Build `timm/<name>` cut at its pre-logits with its eval transform (see the module doc).

    Raises:
        UserError: unknown name (close names suggested), weights that cannot be fetched or do not fit.
    """
    tag, _, _ = describe_weights(model, weights=weights, image_size=image_size)  # validates
    name = model[len(PREFIX):]
    check_name(name)
    full = _full_model(name, weights=weights)
    desc = transform_desc(full, image_size=image_size, model=model)
    classifier = full.pretrained_cfg.get("classifier") or ""
    sha = _weights_sha256(full, weights)
    feature_dim = int(getattr(full, "head_hidden_size", None) or full.num_features)
    full.reset_classifier(0)  # forward() now returns the pre-logits (N, D)
    spec = BackboneSpec(name=model, feature_dim=feature_dim, head_slot=str(classifier),
                        input_size=int(full.pretrained_cfg.get("input_size", (3, 224, 224))[-1]), min_size=1,
                        fixed_size=bool(full.pretrained_cfg.get("fixed_input_size")),
                        weights_enum=str(full.pretrained_cfg.get("tag") or ""))
    return Backbone(spec=spec, net=full.eval(), weights_tag=tag, weights_sha256=sha,
                    transform=make_transform(desc), transform_desc=desc)


def check_name(name: str) -> None:
    """UserError for a name timm does not know, suggesting close names (hf-hub: names are left to timm)."""
    import timm

    if name.startswith(("hf-hub:", "hf_hub:")):
        return
    arch, _, tag = name.partition(".")
    known = timm.list_pretrained() if tag else timm.list_models()
    if name in known or (not tag and timm.is_model(arch)):
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join('timm/' + c for c in close)}? " if close else ""
    raise UserError(f"timm has no model {name!r}; {hint}list the names with featcache models --timm "
                    f"'{arch[:4]}*'.")


def transform_desc(full: nn.Module, *, image_size: int | None, model: str) -> dict[str, Any]:
    """The eval transform of a timm model from its pretrained config; `image_size` overrides the crop."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=full)
    native = int(cfg["input_size"][-1])
    crop = int(image_size or native)
    if crop != native and full.pretrained_cfg.get("fixed_input_size"):
        raise UserError(f"{model} only accepts --image-size {native} (its input size is fixed); drop --image-size "
                        f"or pass {native}.")
    interpolation = cfg.get("interpolation", "bilinear")
    return {
        "resize": int(math.floor(crop / float(cfg.get("crop_pct") or 1.0))), "crop": crop,
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bilinear",
        "mean": [float(m) for m in cfg["mean"]], "std": [float(s) for s in cfg["std"]],
    }


def list_models(pattern: str) -> list[dict[str, Any]]:
    """`featcache models --timm PATTERN`: timm names matching `pattern` (fnmatch) with their feature width.

    The widths come from a build on the meta device (no weights allocated). At most LIST_LIMIT names.
    """
    import timm
    import torch

    names = timm.list_pretrained(pattern) or timm.list_models(pattern)
    rows = []
    for name in names[:LIST_LIMIT]:
        arch = name.partition(".")[0]
        try:
            with torch.device("meta"):
                net = timm.create_model(arch, pretrained=False)
            width = int(getattr(net, "head_hidden_size", None) or net.num_features)
        except Exception:  # a model that cannot be built on the meta device: its width stays unknown
            width = None
        cfg = timm.models.get_pretrained_cfg(name)
        rows.append({"name": PREFIX + name, "feature_dim": width,
                     "input_size": cfg.input_size[-1] if cfg is not None else None})
    return rows


def _full_model(name: str, *, weights: str) -> nn.Module:
    """The full timm model (classifier included) with the requested weights."""
    import timm
    import torch

    if weights == "imagenet":
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as exc:  # no network and not cached, an unknown tag, an unreadable file
            raise UserError(f"Could not load the pretrained weights of timm/{name} ({first_line(exc)}); connect "
                            "to the network once (timm caches them), or pass --weights PATH or --weights none.") \
                from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        full = timm.create_model(name, pretrained=False)
    if weights == lite0_package.WEIGHTS:
        lite0_package.load_into(full)
    elif weights != "none":
        _load_file(full, weights, name)
    return full


def _load_file(full: nn.Module, path: str, name: str) -> None:
    """Load a state_dict / safetensors file into the full model; its classifier (any number of classes) is skipped."""
    state = _read_weights(path, name)
    heads = _classifier_prefixes(full)
    body = {k: v for k, v in state.items() if not k.startswith(heads)}
    expected = {k: v for k, v in full.state_dict().items() if not k.startswith(heads)}
    problems = state_dict_problems(body, expected)
    if problems:
        raise UserError(f"{path} does not fit timm/{name}: {', '.join(problems)}; pass a file saved with "
                        f"torch.save(timm.create_model({name!r}).state_dict(), PATH).")
    full.load_state_dict(body, strict=False)


def _classifier_prefixes(full: nn.Module) -> tuple[str, ...]:
    classifier = full.pretrained_cfg.get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(n + "." for n in names)


def _read_weights(path: str, name: str) -> dict[str, torch.Tensor]:
    import torch

    how = f"save one with torch.save(timm.create_model({name!r}).state_dict(), PATH)"
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file
        raise UserError(f"{path} is not a state_dict of timm/{name}: it could not be loaded ({first_line(exc)}); "
                        f"{how}.") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state_dict of timm/{name}: it holds a {type(state).__name__}; {how}.")
    return state


def _weights_sha256(full: nn.Module, weights: str) -> str:
    """SHA-256 of the weights file: the local file, the package's .pth, or the hub file in the HF cache ("" if none)."""
    if weights == "none":
        return ""
    if weights == lite0_package.WEIGHTS:
        return lite0_package.describe()[1]
    if weights != "imagenet":
        return sha256_of(weights)
    repo = full.pretrained_cfg.get("hf_hub_id")
    if not repo:
        return ""
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return sha256_of(found)
    except ImportError:
        return ""
    return ""
