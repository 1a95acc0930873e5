"""backbones/ (torchvision source): cut networks equal the input of the original final Linear; weights, transforms, errors (offline)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from featcache.backbones import (
    BACKBONES,
    Backbone,
    build_backbone,
    describe_registry,
    describe_weights,
    eval_transform_desc,
    make_finetune_net,
    make_train_transform,
    make_transform,
    pick_device,
)
from featcache.errors import UserError

IMAGENET_PRESET = {
    "resize": 256,
    "crop": 224,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


def reference_model(name: str, *, seed: int = 0, **kwargs) -> nn.Module:
    """The unmodified torchvision model with random init from `seed` (what weights="none" must cut)."""
    if name == "googlenet":
        kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def penultimate(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Input of the model's final Linear, captured by a hook (SqueezeNet: global average of `features`)."""
    captured = {}
    if name.startswith("squeezenet"):
        hook = model.features.register_forward_hook(lambda m, args, out: captured.update(x=out.mean(dim=(2, 3))))
    else:
        final = model.get_submodule(BACKBONES[name].head_slot)
        assert isinstance(final, nn.Linear)
        hook = final.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(x)
    hook.remove()
    return captured["x"]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_cut_net_returns_input_of_original_final_layer(name: str) -> None:
    spec = BACKBONES[name]
    assert spec.weights_enum == str(torchvision.models.get_model_weights(name).DEFAULT)
    backbone = build_backbone(name, weights="none")
    assert not backbone.net.training
    assert backbone.weights_tag == "none" and backbone.weights_sha256 == ""

    size = max(spec.min_size, 32)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = backbone.net(x)
    expected = penultimate(reference_model(name), name, x)
    assert type(features) is torch.Tensor
    assert features.shape == (2, spec.feature_dim) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-6, atol=1e-6)

    # min_size is the real minimum: it runs, one pixel less does not.
    with torch.no_grad():
        assert backbone.net(torch.zeros(2, 3, spec.min_size, spec.min_size)).shape == (2, spec.feature_dim)
        if spec.min_size > 1:
            with pytest.raises((RuntimeError, ValueError, AssertionError)):
                backbone.net(torch.zeros(2, 3, spec.min_size - 1, spec.min_size - 1))


def test_googlenet_has_no_aux_heads_and_returns_a_tensor() -> None:
    net = build_backbone("googlenet", weights="none").net
    assert net.aux_logits is False and net.aux1 is None and net.aux2 is None
    assert net.transform_input is False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert type(net(x)) is torch.Tensor
        net.train()  # what finetune sees: still a plain tensor, no GoogLeNetOutputs
        assert type(net(x)) is torch.Tensor


def test_weights_none_is_deterministic_and_leaves_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    first = build_backbone("resnet18", weights="none").net.state_dict()
    second = build_backbone("resnet18", weights="none").net.state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_weights_path_round_trip(tmp_path) -> None:
    full = reference_model("resnet18", seed=7)
    path = tmp_path / "my-resnet18.pt"
    torch.save(full.state_dict(), path)

    backbone = build_backbone("resnet18", weights=str(path))
    assert backbone.weights_tag == "file:my-resnet18.pt"
    assert backbone.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone.net(x)
        assert not torch.equal(features, build_backbone("resnet18", weights="none").net(x))  # the file was used
    torch.testing.assert_close(features, penultimate(full, "resnet18", x), rtol=0, atol=0)


def test_weights_path_accepts_any_head_size(tmp_path) -> None:
    full = reference_model("resnet18", seed=7, num_classes=2)  # e.g. a model fine-tuned on two classes
    path = tmp_path / "two-class.pt"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("resnet18", weights=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.net(x), penultimate(full, "resnet18", x), rtol=0, atol=0)


def test_weights_path_googlenet_with_aux_heads(tmp_path) -> None:
    full = reference_model("googlenet", seed=7, aux_logits=True)  # torchvision's default keeps aux heads
    path = tmp_path / "googlenet.pt"
    torch.save(full.state_dict(), path)
    net = build_backbone("googlenet", weights=str(path)).net
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), penultimate(full, "googlenet", x), rtol=0, atol=0)


def test_bad_weights_files_are_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist") as info:
        build_backbone("resnet18", weights=str(tmp_path / "missing.pt"))
    assert info.value.exit_code == 2

    wrong_model = tmp_path / "resnet34.pt"
    torch.save(reference_model("resnet34").state_dict(), wrong_model)
    with pytest.raises(UserError, match="is not a state_dict of a torchvision resnet18 model: .*unexpected keys"):
        build_backbone("resnet18", weights=str(wrong_model))

    wrong_shape = tmp_path / "resnet50.pt"
    torch.save(reference_model("resnet50").state_dict(), wrong_shape)
    with pytest.raises(UserError, match="resnet18 model: .*shape mismatches"):
        build_backbone("resnet18", weights=str(wrong_shape))

    not_a_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(UserError, match="is not a state_dict of a torchvision resnet18 model: it holds a list"):
        build_backbone("resnet18", weights=str(not_a_dict))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be loaded"):
        build_backbone("resnet18", weights=str(garbage))


def test_imagenet_weights_come_from_the_hub_cache(tmp_path, monkeypatch) -> None:
    """weights="imagenet" with the checkpoint already cached: no download, preset transform, hash of the file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # Stand-ins for the real checkpoints (same keys; torchvision's pretrained GoogLeNet has aux heads).
    resnet = reference_model("resnet50", seed=3)
    torch.save(resnet.state_dict(), checkpoints / "resnet50-11ad3fa6.pth")
    googlenet_state = reference_model("googlenet", seed=3, aux_logits=True).state_dict()
    torch.save(googlenet_state, checkpoints / "googlenet-1378be20.pth")

    backbone = build_backbone("resnet50", weights="imagenet")
    assert backbone.weights_tag == "imagenet:ResNet50_Weights.IMAGENET1K_V2"
    assert backbone.weights_sha256 == hashlib.sha256((checkpoints / "resnet50-11ad3fa6.pth").read_bytes()).hexdigest()
    assert backbone.transform_desc == {**IMAGENET_PRESET, "resize": 232}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.net(x), penultimate(resnet, "resnet50", x), rtol=0, atol=0)

    googlenet = build_backbone("googlenet", weights="imagenet").net
    assert googlenet.transform_input is True and googlenet.aux1 is None


def test_no_network_is_a_user_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    with pytest.raises(UserError) as info:
        build_backbone("resnet18", weights="imagenet")
    message = str(info.value)
    assert "resnet18" in message and "--weights PATH" in message and "--weights none" in message
    assert info.value.exit_code == 2
    assert os.listdir(tmp_path / "hub" / "checkpoints") == []


def test_corrupt_cached_checkpoint_is_a_user_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    with pytest.raises(UserError, match="delete it"):
        build_backbone("resnet18", weights="imagenet")


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_image_size_override_scales_resize() -> None:
    backbone = build_backbone("resnet18", weights="none", image_size=32)
    assert backbone.transform_desc == {**IMAGENET_PRESET, "resize": 37, "crop": 32}
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    assert backbone.transform(image).shape == (3, 32, 32)
    assert backbone.transform(image).dtype == torch.float32

    assert eval_transform_desc(BACKBONES["resnet18"], pretrained=False, image_size=None) == IMAGENET_PRESET
    efficientnet = eval_transform_desc(BACKBONES["efficientnet_b0"], pretrained=True, image_size=64)
    assert efficientnet == {**IMAGENET_PRESET, "interpolation": "bicubic", "resize": 73, "crop": 64}
    assert eval_transform_desc(BACKBONES["vit_b_16"], pretrained=True, image_size=224)["crop"] == 224


def test_bad_image_sizes_are_user_errors() -> None:
    with pytest.raises(UserError, match="only accepts --image-size 224"):
        build_backbone("vit_b_16", weights="none", image_size=160)
    with pytest.raises(UserError, match="at least 63"):
        build_backbone("alexnet", weights="none", image_size=62)
    with pytest.raises(UserError, match="Unknown model"):
        build_backbone("resnet19", weights="none")


def test_make_transform_matches_the_torchvision_preset() -> None:
    weights = torchvision.models.get_weight(BACKBONES["convnext_tiny"].weights_enum)
    desc = eval_transform_desc(BACKBONES["convnext_tiny"], pretrained=True, image_size=None)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8, generator=generator)
    image = Image.fromarray(pixels.numpy(), "RGB")
    torch.testing.assert_close(make_transform(desc)(image), weights.transforms()(image), rtol=0, atol=1e-6)

    train = make_train_transform(desc)(image)
    assert train.shape == (3, 224, 224) and train.dtype == torch.float32


def test_finetune_net_puts_a_linear_head_on_the_cut_net() -> None:
    backbone: Backbone = build_backbone("mobilenet_v2", weights="none")
    net = make_finetune_net(backbone, 3)
    assert net.backbone is backbone.net
    assert isinstance(net.head, nn.Linear) and (net.head.in_features, net.head.out_features) == (1280, 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.head(backbone.net(x)))


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available on this machine; use --device cpu."):
            pick_device("cuda")
    with pytest.raises(UserError, match="Unknown device"):
        pick_device("tpu")


def test_describe_weights_matches_the_build_without_building(tmp_path) -> None:
    assert describe_weights("resnet18", weights="none", image_size=32) == (
        "none",
        f"init-seed:0:torch-{torch.__version__.split('+')[0]}",
        {**IMAGENET_PRESET, "resize": 37, "crop": 32},
    )
    tag, weights_id, desc = describe_weights("resnet50", weights="imagenet")
    assert tag == "imagenet:ResNet50_Weights.IMAGENET1K_V2"
    assert weights_id == "https://download.pytorch.org/models/resnet50-11ad3fa6.pth"
    assert desc == {**IMAGENET_PRESET, "resize": 232}

    path = tmp_path / "squeeze.pt"
    torch.save(reference_model("squeezenet1_0", seed=5).state_dict(), path)
    backbone = build_backbone("squeezenet1_0", weights=str(path), image_size=64)
    assert describe_weights("squeezenet1_0", weights=str(path), image_size=64) == (
        backbone.weights_tag,
        backbone.weights_sha256,
        backbone.transform_desc,
    )


def test_importing_the_registry_does_not_import_torch() -> None:
    code = ("import sys, featcache.backbones; "
            "sys.exit(bool({'torch', 'torchvision', 'timm'} & set(sys.modules)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_describe_registry() -> None:
    rows = describe_registry()
    assert [row["name"] for row in rows] == list(BACKBONES)
    resnet50 = next(row for row in rows if row["name"] == "resnet50")
    assert resnet50 == {
        "name": "resnet50",
        "feature_dim": 2048,
        "default_weights": "ResNet50_Weights.IMAGENET1K_V2",
        "input_size": 224,
        "min_size": 1,
    }
