"""Your own backbone as a file (--model FILE.pt2 from torch.export, or TorchScript .pt): features equal the
file's own output, its featcache.json sets the transform (else the ImageNet preset, said so), the cache key
holds its SHA-256 and a hit imports no torch, head-train -> export -> predict works, bad files and finetune
are refused in one sentence. A tiny CNN, 32 px demo images, CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import featcache
from featcache.backbones import build_backbone, describe_weights
from featcache.backbones.common import sha256_of
from featcache.cache import load_features, load_paths, read_meta
from featcache.datasets import load_image
from featcache.demo import make_demo_dataset
from tests.cli_helpers import invoke, one_error_line

SIZE = 32
PREPROCESSING = {"input_size": SIZE, "resize": 36, "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3],
                 "std": [0.2, 0.25, 0.3]}


class TinyNet(nn.Module):
    """(N, 3, S, S) -> (N, 8) features; `flat=False` returns the (N, 8, S', S') map (not a backbone)."""

    def __init__(self, flat: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.flat = flat

    def forward(self, images):
        maps = torch.relu(self.conv(images))
        return maps.mean((2, 3)) if self.flat else maps


def write_exported(path, net, extra: dict | None) -> None:
    program = torch.export.export(net.eval(), (torch.zeros(2, 3, SIZE, SIZE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path), extra_files={"featcache.json": json.dumps(extra)} if extra else None)


def write_torchscript(path, net, extra: dict | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(net.eval()), str(path),
                       _extra_files={"featcache.json": json.dumps(extra)} if extra else {})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("files")


@pytest.fixture(scope="module")
def data(work):
    return make_demo_dataset(work / "demo", num_classes=2, n_per_class=(8, 4, 4), image_size=SIZE)


@pytest.mark.parametrize("suffix, write", [(".pt2", write_exported), (".pt", write_torchscript)])
def test_extract_gives_the_files_own_output_with_its_transform(work, data, suffix, write):
    path = work / f"tiny{suffix}"
    write(path, TinyNet(), PREPROCESSING)
    result = invoke("extract", "--model", path, "--data", data, "--cache-dir", work / "cache", "--num-workers", 0,
                    "--precision", "fp32", "--quiet")
    assert result.exit_code == 0, result.output
    (cache,) = (work / "cache").rglob(f"tiny{suffix}-backbone-file-*.h5")
    meta = read_meta(cache)
    assert meta["model"] == str(path) and meta["weights_sha256"] == sha256_of(str(path))
    assert meta["transform"] == {"resize": 36, "crop": SIZE, "interpolation": "bicubic",
                                 "mean": PREPROCESSING["mean"], "std": PREPROCESSING["std"]}
    features, _, _ = load_features(cache, "test")
    backbone = build_backbone(str(path))
    images = torch.stack([backbone.transform(load_image(data / p)) for p in load_paths(cache, "test")])
    with torch.no_grad():
        expected = TinyNet()(images).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_key_holds_the_files_hash_and_a_hit_imports_no_torch(work, data):
    path = work / "keyed.pt2"
    write_exported(path, TinyNet(), None)  # no featcache.json: the ImageNet preset
    tag, weights_id, desc = describe_weights(str(path), image_size=SIZE)
    assert (tag, weights_id) == ("backbone-file", sha256_of(str(path)))
    assert desc == {"resize": 37, "crop": SIZE, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225]}
    args = ["extract", "--model", str(path), "--data", str(data), "--image-size", str(SIZE), "--cache-dir",
            str(work / "cache"), "--num-workers", "0", "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0 and "has no featcache.json: its images get the ImageNet preset" in result.output
    code = (f"import sys; from featcache.cli import cli; cli({json.dumps(args)}, standalone_mode=False); "
            "print('MODULES', ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "cache hit" in out.stdout + out.stderr, out.stderr
    assert not {"torch", "timm", "torchvision"} & set(out.stdout.split("MODULES", 1)[1].split())
    write_exported(path, TinyNet(), {"input_size": SIZE})  # another file at the same path: another key
    assert describe_weights(str(path), image_size=SIZE)[1] != weights_id


def test_head_train_export_predict_on_a_file_backbone(work, data):
    path = work / "served.pt2"
    write_exported(path, TinyNet(), PREPROCESSING)
    cache = featcache.extract(model=str(path), data=str(data), num_workers=0, cache_dir=str(work / "cache"))
    run = featcache.train_head(cache=cache, runs_dir=str(work / "runs"), epochs=5, optimizer="adam", lr=0.05,
                               batch_size=8, standardize=True)
    exported = featcache.export(run.run_dir)
    assert exported.path.name == "model.pt2" and exported.max_abs_diff <= exported.tolerance
    predictions = featcache.predict(exported.path, data / "test", num_workers=0)
    x, _, _ = load_features(cache, "test")
    from featcache import runs

    head = runs.load_head(run.run_dir / runs.HEAD_FILE)
    logits = ((x - head["mean"]) / head["std"]) @ head["weight"].T + head["bias"]
    np.testing.assert_allclose(predictions.logits, logits, rtol=1e-4, atol=1e-4)


def test_bad_backbone_files_and_finetune_are_one_sentence(work, data):
    maps = work / "maps.pt2"
    write_exported(maps, TinyNet(flat=False), {"input_size": SIZE})
    cache_dir = work / "bad-cache"
    line = one_error_line(invoke("extract", "--model", maps, "--data", data, "--cache-dir", cache_dir,
                                 "--num-workers", 0, "--quiet"), 2)
    assert "to a tensor of shape (2, 8, 15, 15), not features (N, D)" in line
    assert not [p for p in cache_dir.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    garbage = work / "garbage.pt2"
    garbage.write_bytes(b"not a zip")
    assert "not a torch.export .pt2 or TorchScript file" in one_error_line(
        invoke("extract", "--model", garbage, "--data", data, "--cache-dir", cache_dir), 2)
    good = work / "good.pt2"
    write_exported(good, TinyNet(), {"input_size": SIZE})
    line = one_error_line(invoke("finetune", "--model", good, "--data", data, "--runs-dir", work / "ft",
                                 "--epochs", 1), 2)
    assert "backbone file, which featcache uses frozen only" in line and not (work / "ft").exists()
    assert "carries its own weights" in one_error_line(
        invoke("extract", "--model", good, "--data", data, "--weights", "none", "--cache-dir", cache_dir), 2)
