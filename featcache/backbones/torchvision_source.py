"""The torchvision source: name -> torchvision classifier cut at its penultimate layer, eval transform, weights.

Importing this module imports neither torch nor torchvision (the CLI reads BACKBONES for `--help`);
every function that needs them imports them itself.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import os
import pickle
import urllib.parse
from typing import TYPE_CHECKING, Any

from featcache.backbones.common import (IMAGENET_CROP, IMAGENET_MEAN, IMAGENET_RESIZE, IMAGENET_STD, INIT_SEED,
                                        Backbone, BackboneSpec, first_line, make_transform, sha256_of,
                                        state_dict_problems)
from featcache.errors import UserError

if TYPE_CHECKING:
    import torch
    import torchvision
    from torch import nn

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        #             name                 D     head_slot       input min  fixed  weights_enum
        BackboneSpec("resnet18",           512,  "fc",           224, 1,   False, "ResNet18_Weights.IMAGENET1K_V1"),
        BackboneSpec("resnet34",           512,  "fc",           224, 1,   False, "ResNet34_Weights.IMAGENET1K_V1"),
        BackboneSpec("resnet50",           2048, "fc",           224, 1,   False, "ResNet50_Weights.IMAGENET1K_V2"),
        BackboneSpec("googlenet",          1024, "fc",           224, 15,  False, "GoogLeNet_Weights.IMAGENET1K_V1"),
        BackboneSpec("alexnet",            4096, "classifier.6", 224, 63,  False, "AlexNet_Weights.IMAGENET1K_V1"),
        BackboneSpec("vgg16",              4096, "classifier.6", 224, 32,  False, "VGG16_Weights.IMAGENET1K_V1"),
        BackboneSpec("squeezenet1_0",      512,  "classifier",   224, 21,  False, "SqueezeNet1_0_Weights.IMAGENET1K_V1"),
        BackboneSpec("mobilenet_v2",       1280, "classifier.1", 224, 1,   False, "MobileNet_V2_Weights.IMAGENET1K_V2"),
        BackboneSpec("mobilenet_v3_large", 1280, "classifier.3", 224, 1,   False, "MobileNet_V3_Large_Weights.IMAGENET1K_V2"),
        BackboneSpec("densenet121",        1024, "classifier",   224, 29,  False, "DenseNet121_Weights.IMAGENET1K_V1"),
        BackboneSpec("efficientnet_b0",    1280, "classifier.1", 224, 1,   False, "EfficientNet_B0_Weights.IMAGENET1K_V1"),
        BackboneSpec("convnext_tiny",      768,  "classifier.2", 224, 32,  False, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"),
        BackboneSpec("convnext_small",     768,  "classifier.2", 224, 32,  False, "ConvNeXt_Small_Weights.IMAGENET1K_V1"),
        BackboneSpec("vit_b_16",           768,  "heads.head",   224, 224, True,  "ViT_B_16_Weights.IMAGENET1K_V1"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    """The registry entry of `name`; UserError if there is none."""
    if name not in BACKBONES:
        raise UserError(f"Unknown model {name!r}; choose one of: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


def describe_registry() -> list[dict[str, Any]]:
    """One row per model (name, feature_dim, default_weights, input_size, min_size), for `featcache models`."""
    return [
        {
            "name": spec.name,
            "feature_dim": spec.feature_dim,
            "default_weights": spec.weights_enum,
            "input_size": spec.input_size,
            "min_size": spec.min_size,
        }
        for spec in BACKBONES.values()
    ]


def build_backbone(name: str, *, weights: str = "imagenet", image_size: int | None = None) -> Backbone:
    """Build `name` cut at its penultimate layer, with weights "imagenet", "none" (seeded init) or a state_dict PATH.

    Args:
        name: a key of BACKBONES.
        weights: "imagenet" (torchvision's DEFAULT weights, downloaded once into the torch hub cache),
            "none" (random init, identical on every call), or a path to `torch.save(model.state_dict())`
            of the full torchvision model (its classifier head may have any number of classes).
        image_size: crop size of the eval transform; None = the model's native size.

    Returns:
        The Backbone; `net` is in eval mode on the CPU.

    Raises:
        UserError: unknown name, bad image_size, weights that cannot be downloaded or read.
    """
    import torchvision

    spec = get_spec(name)
    weights_tag, weights_id, desc = describe_weights(name, weights=weights, image_size=image_size)  # validates
    if weights == "imagenet":
        tv_weights = torchvision.models.get_weight(spec.weights_enum)
        checkpoint = _fetch_imagenet_checkpoint(spec, tv_weights)
        try:
            net = _cut(_build_full_model(spec, tv_weights), spec)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
            raise UserError(
                f"The cached ImageNet weights file {checkpoint} could not be read ({first_line(exc)}); "
                "delete it and run again to download it anew."
            ) from exc
        weights_sha256 = sha256_of(checkpoint)
    elif weights == "none":
        net = _cut(_build_full_model(spec, None), spec)
        weights_sha256 = ""
    else:
        state = _read_state_dict(weights, spec)
        net = _cut(_build_full_model(spec, None), spec)
        _load_body(net, state, spec, weights)
        weights_sha256 = weights_id
    return Backbone(
        spec=spec,
        net=net.eval(),
        weights_tag=weights_tag,
        weights_sha256=weights_sha256,
        transform=make_transform(desc),
        transform_desc=desc,
    )


def describe_weights(
    name: str, *, weights: str = "imagenet", image_size: int | None = None
) -> tuple[str, str, dict[str, Any]]:
    """(weights_tag, weights_id, transform_desc) of a build, without building or downloading anything.

    weights_id identifies the weights for the cache key: the checkpoint URL for "imagenet" (its name
    carries torchvision's hash prefix), "init-seed:<INIT_SEED>:torch-<version>" for "none", the file's sha256 for a PATH.
    """
    spec = get_spec(name)
    desc = eval_transform_desc(spec, pretrained=weights == "imagenet", image_size=image_size)
    if weights == "imagenet":
        import torchvision

        return f"imagenet:{spec.weights_enum}", torchvision.models.get_weight(spec.weights_enum).url, desc
    if weights == "none":
        # Random init is deterministic for a seed but may change between torch releases.
        return "none", f"init-seed:{INIT_SEED}:torch-{importlib.metadata.version('torch')}", desc
    if not os.path.isfile(weights):
        raise UserError(
            f"Weights file {weights} does not exist; pass --weights imagenet, --weights none, "
            "or the path to a file saved with torch.save(model.state_dict(), PATH)."
        )
    return f"file:{os.path.basename(weights)}", sha256_of(weights), desc


def eval_transform_desc(spec: BackboneSpec, *, pretrained: bool, image_size: int | None) -> dict[str, Any]:
    """The eval transform of `spec` as a JSON-able dict: the pretrained weights' preset, else the ImageNet one.

    `image_size` overrides the crop; the resize keeps the preset's resize/crop ratio.
    """
    if pretrained:
        import torchvision

        preset = torchvision.models.get_weight(spec.weights_enum).transforms()
        resize, crop = preset.resize_size[0], preset.crop_size[0]
        interpolation = preset.interpolation.value
        mean, std = [float(m) for m in preset.mean], [float(s) for s in preset.std]
    else:
        resize, crop, interpolation = IMAGENET_RESIZE, IMAGENET_CROP, "bilinear"
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    if image_size is not None and image_size != crop:
        if spec.fixed_size:
            raise UserError(
                f"{spec.name} only accepts --image-size {spec.input_size} (its position embeddings are fixed); "
                f"drop --image-size or pass {spec.input_size}."
            )
        if image_size < spec.min_size:
            raise UserError(
                f"--image-size {image_size} is too small for {spec.name}; "
                f"pass at least {spec.min_size} (its smallest accepted input)."
            )
        resize, crop = round(image_size * resize / crop), image_size
    return {"resize": int(resize), "crop": int(crop), "interpolation": interpolation, "mean": mean, "std": std}


def _build_full_model(spec: BackboneSpec, tv_weights: torchvision.models.WeightsEnum | None) -> nn.Module:
    """The unmodified torchvision model; without weights, its init comes from INIT_SEED (global RNG untouched)."""
    import torch
    import torchvision

    kwargs: dict[str, Any] = {}
    if spec.name == "googlenet":
        # Without aux heads GoogLeNet returns a tensor. With weights, torchvision loads them into a model with
        # aux heads, then drops the heads unless aux_logits=True was asked (passing False raises), and sets
        # transform_input=True; without weights, transform_input stays False.
        kwargs = {} if tv_weights is not None else {"aux_logits": False, "init_weights": True}
    if tv_weights is not None:
        return torchvision.models.get_model(spec.name, weights=tv_weights, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return torchvision.models.get_model(spec.name, weights=None, **kwargs)


def _cut(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Replace the head slot so that the model returns the input of its final Linear, (N, D)."""
    import torchvision
    from torch import nn

    if isinstance(model, torchvision.models.SqueezeNet):
        # Its classifier is Dropout, Conv 512->1000, ReLU, AvgPool: keep only the pooling of the 512-map.
        replacement: nn.Module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        replacement = nn.Identity()
    parent_path, _, attr = spec.head_slot.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, replacement)
    return model


def _fetch_imagenet_checkpoint(spec: BackboneSpec, tv_weights: torchvision.models.WeightsEnum) -> str:
    """Path of the pretrained checkpoint in the torch hub cache, downloading it there on first use."""
    import torch

    filename = os.path.basename(urllib.parse.urlparse(tv_weights.url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)  # where torchvision looks for it
    if os.path.exists(path):
        return path
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.hub.download_url_to_file(tv_weights.url, path, match.group(1) if match else None, progress=True)
    except (OSError, http.client.HTTPException, RuntimeError) as exc:  # URLError is an OSError; RuntimeError: bad hash
        raise UserError(
            f"Could not download the ImageNet weights for {spec.name} ({first_line(exc)}; no network?); "
            "pass --weights PATH to a saved state_dict of the full torchvision model, "
            "or --weights none for random init."
        ) from exc
    return path


def _read_state_dict(path: str, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The state_dict saved at `path`; UserError if it is not a state_dict."""
    import torch

    not_it = f"{path} is not a state_dict of a torchvision {spec.name} model"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: pickle, zip, EOF, weights_only rejections
        raise UserError(
            f"{not_it}: it could not be loaded ({first_line(exc)}); "
            "save one with torch.save(model.state_dict(), PATH)."
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{not_it}: it holds a {type(state).__name__}, not a dict of tensors; "
            "save one with torch.save(model.state_dict(), PATH)."
        )
    return state


def _load_body(net: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec, path: str) -> None:
    """Load everything but the classifier head from `state` into the cut net; UserError naming the mismatch."""
    head_prefix = spec.head_slot + "."
    body = {
        key: value
        for key, value in state.items()
        if not key.startswith(head_prefix) and not key.startswith(("aux1.", "aux2."))  # GoogLeNet aux heads are unused
    }
    problems = state_dict_problems(body, net.state_dict())
    if problems:
        raise UserError(
            f"{path} is not a state_dict of a torchvision {spec.name} model: {', '.join(problems)}; "
            f"pass a file saved with torch.save(torchvision.models.{spec.name}().state_dict(), PATH)."
        )
    net.load_state_dict(body, strict=True)
