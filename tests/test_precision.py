"""--precision fp32|bf16|auto: resolved per device, part of the cache key, one forward for both frozen modes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import featcache
from featcache import precision
from featcache.backbones import build_backbone
from featcache.cache import read_meta
from featcache.datasets import ImageDataset, scan_dataset
from featcache.demo import make_demo_dataset
from featcache.errors import UserError
from tests.cli_helpers import invoke

COMMON = dict(model="resnet18", weights="none", image_size=32, num_workers=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("prec") / "d", n_per_class=(8, 4, 4), image_size=32)


@pytest.fixture(scope="module")
def caches(data, tmp_path_factory) -> dict[str, Path]:
    cache_dir = tmp_path_factory.mktemp("prec-cache")
    return {p: featcache.extract(data=data, cache_dir=str(cache_dir), precision=p, **COMMON) for p in ("fp32", "bf16")}


def _features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return np.concatenate([f[s]["features"][...] for s in ("train", "val", "test")])


def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert precision.cpu_flags(str(info)) == {"fpu", "sse2", "avx512f", "avx512_bf16", "amx_tile"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
    for flags, expected in ((set(), "fp32"), ({"avx512f"}, "fp32"), ({"avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16")):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert precision.resolve("auto", "cpu") == expected
        assert precision.resolve("fp32", "cpu") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
        assert precision.resolve("fp32", "cpu", amp=True) == "bf16"  # the older --amp flag
    with pytest.raises(UserError, match="--precision must be one of fp32, bf16, auto"):
        precision.resolve("fp16", "cpu")


def test_precision_is_in_the_cache_key_and_bf16_features_are_close(caches):
    fp32, bf16 = caches["fp32"], caches["bf16"]
    assert fp32 != bf16  # two keys, two files
    assert read_meta(fp32)["precision"] == "fp32" and read_meta(bf16)["precision"] == "bf16"
    assert json.loads(h5py.File(bf16, "r").attrs["extraction"])["precision"] == "bf16"
    a, b = _features(fp32), _features(bf16)
    assert a.shape == b.shape == (32, 512) and not np.array_equal(a, b)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 1e-5 < rel < 3e-2  # bf16 arithmetic: visibly different, still the same features


def test_fp32_channels_last_equals_the_plain_nchw_forward(data, caches):
    """fp32 changes only the memory layout: the cached features are eager NCHW float32's up to summation order."""
    backbone = build_backbone("resnet18", weights="none", image_size=32)
    index = scan_dataset(data)
    images = torch.stack([ImageDataset(index.root, index.splits["train"], backbone.transform)[i][0] for i in range(4)])
    with torch.inference_mode():
        reference = backbone.net.eval()(images).numpy()  # (4, 512)
    got = precision.features(precision.prepare(backbone.net, torch.device("cpu"), "fp32"), images,
                             device=torch.device("cpu"), precision="fp32").numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_features(caches["fp32"])[:4], reference, rtol=1e-4, atol=1e-5)  # same weights: seed


@pytest.mark.parametrize("arithmetic", ["fp32", "bf16"])
def test_frozen_loop_equals_extract_plus_head_train_at_each_precision(data, caches, arithmetic, tmp_path):
    runs_dir = str(tmp_path / "runs")
    head = featcache.train_head(cache=caches[arithmetic], epochs=2, runs_dir=runs_dir)
    frozen = featcache.finetune(data=str(data), freeze_backbone=True, epochs=2, runs_dir=runs_dir,
                                cache_dir=str(tmp_path / "c"), precision=arithmetic, **COMMON)
    assert frozen.extra["precision"] == arithmetic
    for h, f in zip(head.history, frozen.history):
        assert (h.train_acc, h.val_acc) == (f.train_acc, f.val_acc)
        assert h.train_loss == pytest.approx(f.train_loss, abs=1e-4)
        assert h.val_loss == pytest.approx(f.val_loss, abs=1e-4)
    assert head.summary.test_acc == frozen.summary.test_acc


def test_cli_precision_option_and_its_error(data, tmp_path):
    for command in ("extract", "finetune", "predict", "bench"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "--precision [fp32|bf16|auto]" in result.output, command
    bad = invoke("extract", "--model", "resnet18", "--data", data, "--precision", "fp16", "--cache-dir", tmp_path)
    assert bad.exit_code == 2 and "fp16" in bad.output
    assert not list(tmp_path.rglob("*.h5"))
