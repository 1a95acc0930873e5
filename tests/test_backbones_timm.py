"""timm backbones: pre-logits = the classifier's input, the pretrained config's transform, the lite0-package
weights (logits equal an independent EfficientNet-Lite0 forward), errors, a cache hit without torch or timm,
and pretrained features beating random ones on the demo data. Offline: weights "none" or "lite0-package".
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import featcache
from featcache.backbones import build_backbone, describe_weights, lite0_package, timm_source
from featcache.cache import load_features, read_meta
from featcache.demo import make_demo_dataset
from featcache.errors import UserError
from tests.cli_helpers import invoke

SIZE = 32


def _classifier_input(full: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the full model's classifier receives, caught with a forward hook."""
    seen = []
    handle = full.get_classifier().register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    with torch.no_grad():
        full(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["resnet18", "tf_efficientnet_lite0"])
def test_pre_logits_are_the_classifier_input_of_the_full_model(name):
    backbone = build_backbone(f"timm/{name}", weights="none", image_size=SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the seeded init of weights "none"
        full = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = backbone.net(x)
    expected = _classifier_input(full, x)
    assert features.shape == (2, backbone.spec.feature_dim) == expected.shape
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert backbone.weights_tag == "none" and backbone.weights_sha256 == ""


def test_transform_comes_from_the_pretrained_config():
    backbone = build_backbone("timm/tf_efficientnet_lite0", weights="none")
    # timm's tf_efficientnet_lite0 config: 224 px, crop_pct 0.875, bicubic, mean = std = 0.5
    assert backbone.transform_desc == {"resize": 256, "crop": 224, "interpolation": "bicubic",
                                       "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    small = build_backbone("timm/resnet18", weights="none", image_size=64).transform_desc
    assert small["crop"] == 64 and small["resize"] == math.floor(64 / 0.95)  # resnet18.a1_in1k: crop_pct 0.95
    assert small["interpolation"] == "bicubic" and small["mean"] == pytest.approx([0.485, 0.456, 0.406])


# ---------------------------------------------------------------- lite0-package


_LITE0_BLOCKS = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
                 (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # (expand, kernel, stride, out, repeats): EfficientNet-B0/Lite0


def _same(x, k, s):
    """TensorFlow's "SAME" padding of a k x k convolution of stride s."""
    def total(n):
        return max((math.ceil(n / s) - 1) * s + k - n, 0)
    ph, pw = total(x.shape[-2]), total(x.shape[-1])
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def _reference_lite0(sd, x):
    """(pooled features, logits) of EfficientNet-Lite0 from the package's own state_dict, written out by hand."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-3)
    x = F.relu6(bn(F.conv2d(_same(x, 3, 2), sd["_conv_stem.weight"], stride=2), "_bn0"))
    b = 0
    for expand, k, stride, _out, repeats in _LITE0_BLOCKS:
        for r in range(repeats):
            s, p, inp = (stride if r == 0 else 1), f"_blocks.{b}.", x
            if expand != 1:
                x = F.relu6(bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), p + "_bn0"))
            x = F.relu6(bn(F.conv2d(_same(x, k, s), sd[p + "_depthwise_conv.weight"], stride=s, groups=x.shape[1]),
                           p + "_bn1"))
            x = bn(F.conv2d(x, sd[p + "_project_conv.weight"]), p + "_bn2")
            if s == 1 and inp.shape[1] == x.shape[1]:
                x = x + inp
            b += 1
    features = F.relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1")).mean((2, 3))
    return features, F.linear(features, sd["_fc.weight"], sd["_fc.bias"])


def test_lite0_package_weights_give_the_reference_logits():
    sd = torch.load(lite0_package.weights_file(), map_location="cpu", weights_only=True)
    full = timm_source._full_model("tf_efficientnet_lite0", weights="lite0-package").eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_features, ref_logits = _reference_lite0(sd, x)
        logits = full(x)
    assert float((logits - ref_logits).abs().max()) <= 1e-4 * float(ref_logits.abs().max())
    assert (logits.argmax(1) == ref_logits.argmax(1)).all()
    backbone = build_backbone("timm/tf_efficientnet_lite0", weights="lite0-package")
    with torch.no_grad():
        torch.testing.assert_close(backbone.net(x), ref_features, rtol=1e-4, atol=1e-4)
    version = importlib_version(lite0_package.PACKAGE)
    assert backbone.weights_tag == f"lite0-package:{version}"
    assert backbone.weights_sha256 == featcache.backbones.common.sha256_of(lite0_package.weights_file())


def importlib_version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


def test_lite0_package_is_only_for_its_architecture():
    with pytest.raises(UserError, match="timm/tf_efficientnet_lite0"):
        describe_weights("timm/resnet18", weights="lite0-package")
    tag, weights_id, _ = describe_weights("timm/tf_efficientnet_lite0", weights="lite0-package")
    assert tag.startswith("lite0-package:") and weights_id.startswith(
        featcache.backbones.common.sha256_of(lite0_package.weights_file()))
    # never the hub weights' identity
    assert describe_weights("timm/tf_efficientnet_lite0", weights="imagenet")[:2] != (tag, weights_id)


# ---------------------------------------------------------------- weights files and errors


def test_weights_file_loads_with_any_head_and_a_wrong_one_names_the_key(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=5)  # another head: skipped
    path = tmp_path / "r18.pt"
    torch.save(source.state_dict(), path)
    backbone = build_backbone("timm/resnet18", weights=str(path), image_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone.net(x), _classifier_input(source.eval(), x), rtol=0, atol=1e-6)
    assert backbone.weights_tag == "file:r18.pt"

    from safetensors.torch import save_file

    state = source.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match=r"does not fit timm/resnet18: 1 shape mismatches \(e\.g\. layer1\.0\.conv1"):
        build_backbone("timm/resnet18", weights=str(tmp_path / "bad.safetensors"))


def test_unknown_timm_name_suggests_close_names(tmp_path):
    with pytest.raises(UserError, match=r"timm has no model 'resnet181'; did you mean .*timm/resnet18"):
        build_backbone("timm/resnet181", weights="none")
    with pytest.raises(UserError, match="convnext_tiny"):
        build_backbone("timm/convnext_tiny.fb_in22", weights="none")


def test_imagenet_weights_offline_and_not_cached_is_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1 and empty caches (huggingface_hub read the variables when imported: set its constants too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    data = make_demo_dataset(tmp_path / "d", num_classes=2, n_per_class=(2, 1, 1), image_size=SIZE)
    result = invoke("extract", "--model", "timm/resnet18", "--data", data, "--weights", "imagenet", "--image-size",
                    SIZE, "--cache-dir", tmp_path / "cache", "--num-workers", 0, "--quiet")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: Could not load the pretrained weights of timm/resnet18")
    assert "--weights none" in lines[0], lines
    # nothing written (the writer's lock file stays, as beside every cache)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


# ---------------------------------------------------------------- extract: features, cache hit without torch


def test_extract_timm_features_equal_the_pre_logits_and_a_hit_imports_neither_torch_nor_timm(tmp_path):
    data = make_demo_dataset(tmp_path / "d", num_classes=2, n_per_class=(3, 2, 2), image_size=SIZE)
    args = ["extract", "--model", "timm/resnet18", "--data", data, "--weights", "none", "--image-size", SIZE, "--precision", "fp32",
            "--cache-dir", tmp_path / "cache", "--num-workers", "0", "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "cache").rglob("*.h5")
    assert path.name.startswith("timm-resnet18-none-")
    meta = read_meta(path)
    assert meta["model"] == "timm/resnet18" and meta["transform"]["crop"] == SIZE
    assert meta["transform"]["interpolation"] == "bicubic"  # resolved from timm's config, stored
    features, _, _ = load_features(path, "test")
    backbone = build_backbone("timm/resnet18", weights="none", image_size=SIZE)
    from featcache.cache import load_paths
    from featcache.datasets import load_image

    images = torch.stack([backbone.transform(load_image(data / p)) for p in load_paths(path, "test")])
    with torch.no_grad():
        np.testing.assert_allclose(features, backbone.net(images).numpy(), rtol=1e-4, atol=1e-5)

    code = ("import sys; from featcache.cli import cli; "
            f"cli({json.dumps([str(a) for a in args])}, standalone_mode=False); "
            "print('MODULES', ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "cache hit" in out.stdout + out.stderr
    modules = set(out.stdout.split("MODULES", 1)[1].split())
    assert not {"torch", "timm", "torchvision"} & modules


def test_bad_model_names_are_one_line_errors(tmp_path):
    for model, needle in (("timm/", "e.g. timm/resnet18"), ("resnet181", "did you mean resnet18")):
        result = invoke("extract", "--model", model, "--data", tmp_path / "nowhere", "--weights", "none")
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.stderr.strip().splitlines()[-1]) > 20 and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------- pretrained beats random


def test_pretrained_lite0_features_beat_random_ones_on_the_demo_data(tmp_path):
    """A logistic-regression probe (scikit-learn) on the cached features: ImageNet weights vs a random init."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    data = make_demo_dataset(tmp_path / "d", num_classes=2, n_per_class=(40, 1, 30), image_size=64)
    accuracy = {}
    for weights in ("lite0-package", "none"):
        cache = featcache.extract(model="timm/tf_efficientnet_lite0", data=str(data), weights=weights,
                                  image_size=64, num_workers=0, cache_dir=str(tmp_path / "cache"))
        (x_train, y_train, _), (x_test, y_test, _) = (load_features(cache, s) for s in ("train", "test"))
        scaler = StandardScaler().fit(x_train)
        probe = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x_train), y_train)
        accuracy[weights] = float((probe.predict(scaler.transform(x_test)) == y_test).mean())
    assert accuracy["lite0-package"] >= accuracy["none"] + 0.15, accuracy


def test_models_lists_timm_names_with_their_feature_width():
    result = invoke("models", "--timm", "efficientnet_lite0*")
    assert result.exit_code == 0, result.output
    assert "timm/efficientnet_lite0.ra_in1k" in result.output and "1280" in result.output
    result = invoke("models", "--timm", "no_such_model_*")
    assert result.exit_code == 2 and "timm has no model matching" in result.output
    assert "timm/<name>" in invoke("models").output
