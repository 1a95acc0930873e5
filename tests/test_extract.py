"""featcache extract end to end: cache hit, a new key per change, the features themselves,
kill-and-resume, the lock, the plain-h5py layout, several models, cache ls/verify, bad input.

Tiny data: the demo dataset at 32 px (16 or 60 images), resnet18 with weights="none" (seeded init).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache
import featcache.backbones
import featcache.extraction
from featcache import cache
from featcache.cli import cli
from featcache.config import SPLITS, DataConfig, ExtractConfig
from featcache.datasets import DatasetIndex, scan_dataset
from featcache.demo import make_demo_dataset
from featcache.extraction import find_cache, plan_extraction

FEATCACHE = Path(sys.executable).with_name("featcache")  # the console script of this venv
D = 512  # resnet18's feature dim
N = {"train": 16, "val": 8, "test": 8}  # demo n_per_class=(8, 4, 4), two classes
CLI_ARGS = ["--model", "resnet18", "--weights", "none", "--image-size", "32", "--quiet"]


@pytest.fixture
def data(tmp_path) -> Path:
    return make_demo_dataset(tmp_path / "d", n_per_class=(8, 4, 4), image_size=32)


def _extract(data: Path, cache_dir: Path, **options) -> Path:
    options = {"weights": "none", "image_size": 32, "num_workers": 0, **options}
    return featcache.extract(model="resnet18", data=data, cache_dir=str(cache_dir), **options)


def _invoke(*args: str, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def _read(path: Path) -> dict:
    """{split: (features, labels, paths)} read with plain h5py."""
    with h5py.File(path, "r") as f:
        return {s: (f[s]["features"][...], f[s]["labels"][...], [p.decode() for p in f[s]["paths"][...]])
                for s in f}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _forbid_forward_pass(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built: this run should have been a cache hit")
    monkeypatch.setattr(featcache.backbones, "build_backbone", refuse)


# --------------------------------------------------------------------------- cache hit


def test_second_identical_run_is_a_cache_hit_without_forward_pass(data, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    first = _invoke("extract", *CLI_ARGS, "--data", data, "--cache-dir", cache_dir)
    assert first.exit_code == 0, first.output
    path = cache_dir / "d" / re.search(r"(resnet18-none-[0-9a-f]{12}\.h5)", first.output).group(1)
    assert re.fullmatch(rf"resnet18: 32 images in [\d.]+ s \([\d.]+ img/s\) -> {re.escape(str(path))} "
                        r"\([\d.]+ MB\)\n", first.output), first.output
    digest, mtime = _sha256(path), path.stat().st_mtime_ns

    _forbid_forward_pass(monkeypatch)
    second = _invoke("extract", *CLI_ARGS, "--data", data, "--cache-dir", cache_dir)
    assert second.exit_code == 0, second.output
    assert second.output == f"cache hit: {path}\n"
    assert _extract(data, cache_dir) == path  # the Python API agrees
    assert _sha256(path) == digest and path.stat().st_mtime_ns == mtime  # not rewritten


def test_cache_hit_of_the_console_script_is_fast_and_does_not_import_torch(data, tmp_path):
    cache_dir = tmp_path / "cache"
    path = _extract(data, cache_dir)
    cmd = [str(FEATCACHE), "extract", *CLI_ARGS, "--data", str(data), "--cache-dir", str(cache_dir)]
    walls = []
    for _ in range(3):  # best of 3: the machine is shared
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        walls.append(time.perf_counter() - t0)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"cache hit: {path}\n"
    assert min(walls) < 2.0, walls
    # The Python API, twice in a fresh process: still a hit without torch, and the first call (which
    # imports the extract module) must leave featcache.extract callable.
    probe = ("import sys, featcache\n"
             f"kw = dict(model='resnet18', data={str(data)!r}, weights='none', image_size=32, "
             f"cache_dir={str(cache_dir)!r})\n"
             "print(featcache.extract(**kw), featcache.extract(**kw), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout == f"{path} {path} False\n", out.stderr[-2000:]


# --------------------------------------------------------------------------- a new key per change


def _rewrite_uncompressed(path: Path, *, edit: bool) -> None:
    """Save `path` as an uncompressed PNG (its byte size then depends only on its shape); `edit` changes pixels."""
    pixels = np.asarray(Image.open(path).convert("RGB")).copy()  # (H, W, 3) uint8
    if edit:
        pixels[:16] = 255 - pixels[:16]
    Image.fromarray(pixels).save(path, compress_level=0)


@pytest.mark.parametrize("change", ["image_added", "image_removed", "image_edited", "weights_file",
                                    "image_size", "dtype"])
def test_each_change_gives_a_new_key_and_a_new_file(change, data, tmp_path):
    cache_dir = tmp_path / "cache"
    edited = data / "train" / "normal" / sorted(os.listdir(data / "train" / "normal"))[2]
    if change == "image_edited":
        _rewrite_uncompressed(edited, edit=False)
    base = _extract(data, cache_dir)
    base_digest, base_key = _sha256(base), cache.read_meta(base)["key"]
    old = _read(base)

    options = {}
    if change == "image_added":
        shutil.copy(data / "val" / "abnormal" / os.listdir(data / "val" / "abnormal")[0],
                    data / "train" / "abnormal" / "zz_added.png")
    elif change == "image_removed":
        (data / "test" / "normal" / sorted(os.listdir(data / "test" / "normal"))[0]).unlink()
    elif change == "image_edited":
        size, before, mtime = edited.stat().st_size, edited.read_bytes(), edited.stat().st_mtime_ns
        _rewrite_uncompressed(edited, edit=True)
        os.utime(edited, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))
        assert edited.stat().st_size == size and edited.read_bytes() != before  # same size, other bytes
    elif change == "weights_file":
        import torch
        import torchvision

        torch.manual_seed(1)
        weights = tmp_path / "mine.pt"
        torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
        options["weights"] = str(weights)
    elif change == "image_size":
        options["image_size"] = 48
    elif change == "dtype":
        options["dtype"] = "float16"

    new = _extract(data, cache_dir, **options)
    meta = cache.read_meta(new)
    assert new != base and new.is_file() and meta["key"] != base_key and new.name.endswith(f"{meta['key'][:12]}.h5")
    assert _sha256(base) == base_digest  # the old cache is still there, untouched
    assert sorted(p.name for p in (cache_dir / "d").glob("*.h5")) == sorted([base.name, new.name])
    got = _read(new)

    if change == "image_added":
        assert [len(got[s][2]) for s in SPLITS] == [N["train"] + 1, N["val"], N["test"]]
        assert "train/abnormal/zz_added.png" in got["train"][2]
    elif change == "image_removed":
        assert [len(got[s][2]) for s in SPLITS] == [N["train"], N["val"], N["test"] - 1]
    elif change == "image_edited":
        row = got["train"][2].index(edited.relative_to(data).as_posix())
        assert not np.allclose(got["train"][0][row], old["train"][0][row], atol=1e-3)
        others = np.arange(N["train"]) != row
        np.testing.assert_allclose(got["train"][0][others], old["train"][0][others], rtol=1e-5, atol=1e-6)
    elif change == "weights_file":
        assert meta["weights"] == "file:mine.pt" and meta["weights_sha256"] == _sha256(tmp_path / "mine.pt")
        assert not np.allclose(got["train"][0], old["train"][0], atol=1e-3)
        assert new.name.startswith("resnet18-file-mine.pt-")
    elif change == "image_size":
        assert meta["transform"]["crop"] == 48 and meta["transform"]["resize"] == 55
        assert not np.allclose(got["train"][0], old["train"][0], atol=1e-3)
    elif change == "dtype":
        assert meta["dtype"] == "float16" and got["train"][0].dtype == np.float16
        for s in SPLITS:
            np.testing.assert_array_equal(got[s][0], old[s][0].astype(np.float16))
    if change in ("weights_file", "image_size", "dtype"):  # same images, same rows
        for s in SPLITS:
            assert got[s][2] == old[s][2]
            np.testing.assert_array_equal(got[s][1], old[s][1])


# --------------------------------------------------------------------------- the features themselves


def test_features_are_the_cut_network_on_the_transformed_images(data, tmp_path):
    import torch

    from featcache.datasets import ImageDataset

    # fp32: the plain network's numbers (bf16's are checked against these in test_precision)
    path = _extract(data, tmp_path / "cache", batch_size=5, precision="fp32")  # a short last batch in every split
    backbone = featcache.backbones.build_backbone("resnet18", weights="none", image_size=32)
    index = scan_dataset(data)
    for split in SPLITS:
        features, labels, meta = featcache.load_features(path, split)
        paths = cache.load_paths(path, split)
        assert features.shape == (N[split], D) and features.dtype == np.float32
        # Documented order: sorted relative paths; label = index of the class folder in sorted class names.
        assert paths == sorted(paths) and len(set(paths)) == len(paths)
        assert all(p.startswith(f"{split}/") for p in paths)
        np.testing.assert_array_equal(labels, [meta["class_names"].index(p.split("/")[1]) for p in paths])
        assert meta["class_names"] == ["abnormal", "normal"]
        assert np.bincount(labels).tolist() == [N[split] // 2] * 2

        items = ImageDataset(index.root, index.splits[split], backbone.transform)
        with torch.inference_mode():
            expected = backbone.net(torch.stack([items[i][0] for i in range(len(items))])).numpy()  # (N, D)
        assert [s.path for s in index.splits[split]] == paths
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
        assert features.std() > 0.01  # real features, not a constant fill

    half = _extract(data, tmp_path / "cache", batch_size=5, dtype="float16", precision="fp32")
    for split in SPLITS:
        x16, _, meta = featcache.load_features(half, split)
        assert x16.dtype == np.float16 and meta["dtype"] == "float16"
        np.testing.assert_array_equal(x16, featcache.load_features(path, split)[0].astype(np.float16))
    with h5py.File(half, "r") as f:
        assert f["train/features"].dtype == np.float16


# --------------------------------------------------------------------------- kill and resume


SLOW_DRIVER = """\
    import sys, time
    import featcache.cache

    _write = featcache.cache.CacheWriter.write

    def slow_write(self, *args, **kwargs):  # commit, then dawdle: the test kills us mid-run
        _write(self, *args, **kwargs)
        time.sleep(0.2)

    featcache.cache.CacheWriter.write = slow_write
    from featcache.cli import cli
    cli(sys.argv[1:], prog_name="featcache")
"""


def _done_rows(partial: Path) -> int | None:
    """Rows committed in a partial file being written by another process (None if unreadable now)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(int(f[s]["done"][...].sum()) for s in f)
    except Exception:
        return None


def test_killed_extraction_resumes_to_the_same_features_as_a_clean_run(tmp_path):
    data = make_demo_dataset(tmp_path / "d", n_per_class=(14, 4, 4), image_size=32)  # 44 images
    total = 44
    driver = tmp_path / "slow_extract.py"
    driver.write_text(textwrap.dedent(SLOW_DRIVER))
    cache_dir = tmp_path / "cache"
    args = ["extract", *CLI_ARGS, "--data", str(data), "--batch-size", "4"]  # default --num-workers: forked workers
    config = ExtractConfig(model="resnet18", data=DataConfig(root=str(data)), weights="none", image_size=32,
                           batch_size=4, cache_dir=str(cache_dir))
    final = plan_extraction(config).path
    partial = cache.partial_path(final)

    proc = subprocess.Popen([sys.executable, str(driver), *args, "--cache-dir", str(cache_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            done = _done_rows(partial) if partial.exists() else None
            if done is not None and 8 <= done < total - 8:
                live = cache.list_caches(cache_dir)  # while the writer holds the file open
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"extraction never got mid-way: {proc.communicate()[0].decode()[-2000:]}")
        proc.send_signal(signal.SIGKILL)  # only the main process: its decode workers must die with it
    finally:
        proc.kill()
        proc.wait()
    assert [(r["status"], r["model"]) for r in live] == [("partial", "resnet18")]
    assert not final.exists() and partial.exists()
    committed = _done_rows(partial)
    assert 8 <= committed < total and committed % 4 == 0

    # Before the re-run: ls shows it as partial; it is never a cache hit.
    rows = cache.list_caches(cache_dir)
    assert [(r["status"], Path(r["path"]).name) for r in rows] == [("partial", partial.name)]
    assert sum(v["done"] for v in rows[0]["splits"].values()) == committed
    listed = _invoke("cache", "ls", "--cache-dir", cache_dir, env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and re.search(r"│ partial\s+│", listed.output), listed.output
    assert find_cache(config) is None
    with pytest.raises(cache.CacheError, match="unfinished"):
        featcache.load_features(partial, "train")

    # The re-run, at once and at full speed, resumes from the last committed batch.
    resumed = _invoke(*args, "--cache-dir", cache_dir)
    assert resumed.exit_code == 0, resumed.output
    assert "cache hit" not in resumed.output
    assert f"resuming {partial.name}: {committed} rows already written\n" in resumed.output
    assert f"resnet18: {total - committed} images in " in resumed.output
    assert final.is_file() and not partial.exists() and cache.verify_cache(final) == []

    clean = _invoke(*args, "--cache-dir", tmp_path / "clean")
    assert clean.exit_code == 0 and "resuming" not in clean.output, clean.output
    clean_path = tmp_path / "clean" / "d" / final.name
    got, want = _read(final), _read(clean_path)
    assert list(got) == list(want) == list(SPLITS)
    for split in SPLITS:
        for a, b in zip(got[split], want[split]):
            assert np.array_equal(a, b)  # bit-identical
    assert cache.read_meta(final)["key"] == cache.read_meta(clean_path)["key"]


# --------------------------------------------------------------------------- lock


HOLDER = """\
import sys, time
from pathlib import Path
from featcache import cache
with cache.write_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(final: Path, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(final), str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_lock_held_by_another_process_refuses_or_waits(data, tmp_path):
    cache_dir = tmp_path / "cache"
    config = ExtractConfig(model="resnet18", data=DataConfig(root=str(data)), weights="none", image_size=32,
                           cache_dir=str(cache_dir))
    final = plan_extraction(config).path
    args = ["extract", *CLI_ARGS, "--data", data, "--cache-dir", cache_dir, "--num-workers", "0"]

    holder = _hold_lock(final, 60)
    try:
        refused = _invoke(*args)
    finally:
        holder.kill()
        holder.wait()
    assert refused.exit_code == 4, refused.output
    assert refused.output.count("\n") == 1 and "Traceback" not in refused.output
    assert f"pid {holder.pid} " in refused.output and "--wait" in refused.output
    assert not final.exists() and not cache.partial_path(final).exists()

    holder = _hold_lock(final, 1.0)
    t0 = time.perf_counter()
    waited = _invoke(*args, "--wait")
    holder.wait()
    assert waited.exit_code == 0, waited.output
    assert time.perf_counter() - t0 > 0.5 and final.is_file()


# --------------------------------------------------------------------------- layout, several models, ls/verify


def test_plain_h5py_reads_the_documented_layout(data, tmp_path):
    path = _extract(data, tmp_path / "cache")
    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
        for name in ("format_version", "key", "model", "weights", "weights_sha256", "transform", "feature_dim",
                     "class_names", "dataset_root", "dataset_fingerprint", "dtype", "versions", "created",
                     "complete"):
            assert name in attrs, name
        assert attrs["format_version"] == 2 and bool(attrs["complete"]) is True
        assert re.fullmatch(r"[0-9a-f]{64}", attrs["key"]) and path.name == f"resnet18-none-{attrs['key'][:12]}.h5"
        assert attrs["model"] == "resnet18" and attrs["weights"] == "none" and attrs["weights_sha256"] == ""
        assert attrs["feature_dim"] == D and attrs["dtype"] == "float32"
        assert json.loads(attrs["transform"]) == {"resize": 37, "crop": 32, "interpolation": "bilinear",
                                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        assert json.loads(attrs["class_names"]) == ["abnormal", "normal"]
        assert attrs["dataset_fingerprint"] == scan_dataset(data).fingerprint()
        assert attrs["dataset_root"] == str(data.resolve())
        versions = json.loads(attrs["versions"])
        assert versions["h5py"] == h5py.__version__ and versions["numpy"] == np.__version__ and "torch" in versions
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", attrs["created"])
        assert list(f) == list(SPLITS)
        for split in SPLITS:
            g = f[split]
            assert set(g) == {"features", "labels", "paths", "done", "checksums"}
            assert g["features"].shape == (N[split], D) and g["features"].dtype == np.float32
            assert g["features"].chunks is not None and g["features"].chunks[1] == D  # chunked by rows
            assert g["labels"].shape == (N[split],) and g["labels"].dtype == np.int64
            assert g["paths"].shape == (N[split],) and h5py.check_string_dtype(g["paths"].dtype).encoding == "utf-8"
            assert g["done"].dtype == bool and g["done"][...].all()
            paths = [p.decode() for p in g["paths"][...]]
            assert all((data / p).is_file() for p in paths)
            assert np.isfinite(g["features"][...]).all() and np.abs(g["features"][...]).sum() > 0


def test_the_cache_records_its_extraction_outside_the_key(data, tmp_path, monkeypatch):
    fingerprints = []
    fingerprint = DatasetIndex.fingerprint
    monkeypatch.setattr(DatasetIndex, "fingerprint", lambda index, **kw: fingerprints.append(1) or fingerprint(index, **kw))
    config = ExtractConfig(model="resnet18", data=DataConfig(root=str(data)), weights="none", image_size=32,
                           batch_size=8, num_workers=0, cache_dir=str(tmp_path / "cache"))
    plan = plan_extraction(config)
    assert len(fingerprints) == 1  # every image is statted once
    path = featcache.extraction.extract(config, progress=False, log=lambda message: None)
    meta = cache.read_meta(path)
    run = meta["extraction"]
    assert run["images"] == sum(meta["splits"].values()) == sum(N.values())  # the rows written
    assert run["seconds"] > 0 and run["images_per_s"] == pytest.approx(run["images"] / run["seconds"])
    assert (run["device"], run["batch_size"], run["num_workers"], run["processes"]) == ("cpu", 8, 0, 1)
    # a run's measurement and settings are not the features: the key is the one planned, and another batch
    # size or worker count finds the same cache
    assert meta["key"] == plan.key and "extraction" not in plan.meta
    _forbid_forward_pass(monkeypatch)
    assert _extract(data, tmp_path / "cache", batch_size=3, num_workers=1) == path


def test_several_models_in_one_call_write_one_file_each(data, tmp_path):
    cache_dir = tmp_path / "cache"
    result = _invoke("extract", "--model", "resnet18", "--model", "squeezenet1_0", "--weights", "none",
                     "--image-size", "32", "--quiet", "--num-workers", "0", "--data", data, "--cache-dir", cache_dir)
    assert result.exit_code == 0, result.output
    files = sorted((cache_dir / "d").glob("*.h5"))
    assert [f.name.split("-")[0] for f in files] == ["resnet18", "squeezenet1_0"]
    for f in files:
        meta = cache.read_meta(f)
        assert meta["model"] == f.name.split("-")[0] and meta["feature_dim"] == D
        assert f"{meta['model']}: 32 images in " in result.output and str(f) in result.output
    a, b = (featcache.load_features(f, "val")[0] for f in files)
    assert not np.allclose(a, b, atol=1e-3)


def test_cache_verify_and_ls_tell_good_from_damaged(data, tmp_path):
    cache_dir = tmp_path / "cache"
    good = _extract(data, cache_dir)
    truncated = good.with_name("resnet18-none-truncated000.h5")
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    holed = good.with_name("resnet18-none-holed0000000.h5")
    shutil.copy(good, holed)
    with h5py.File(holed, "r+") as f:
        f["val/done"][3] = False

    ok = _invoke("cache", "verify", good)
    assert ok.exit_code == 0 and ok.output == f"{good}: ok\n"
    bad = _invoke("cache", "verify", truncated)
    assert bad.exit_code == 3 and "corrupt or truncated" in bad.output and "Traceback" not in bad.output
    bad = _invoke("cache", "verify", holed)
    assert bad.exit_code == 3 and f"{holed}: val: 1 of {N['val']} rows not written" in bad.output

    status = {Path(r["path"]).name: r["status"] for r in cache.list_caches(cache_dir)}
    assert status == {good.name: "complete", truncated.name: "corrupt", holed.name: "complete"}
    listed = _invoke("cache", "ls", "--cache-dir", cache_dir, env={"COLUMNS": "250"})
    assert listed.exit_code == 0
    for name in status:
        assert name in listed.output
    assert re.search(r"train=16 val=8 test=8 .*complete .*" + re.escape(good.name), listed.output)
    assert re.search(r"corrupt .*" + re.escape(truncated.name), listed.output)
    assert "val=7/8" in listed.output  # the holed file's missing row shows


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("problem", ["missing_folder", "file_not_folder", "image_size_too_small"])
def test_bad_input_is_one_line_and_exit_code_2(problem, data, tmp_path):
    target, model = str(data), ["--model", "resnet18", "--image-size", "32"]
    if problem == "missing_folder":
        target = str(tmp_path / "no-such-data")
    elif problem == "file_not_folder":
        target = str(next((data / "train" / "normal").iterdir()))
    else:
        model = ["--model", "squeezenet1_0", "--image-size", "16"]
    args = ["extract", *model, "--weights", "none", "--quiet", "--data", target, "--cache-dir", tmp_path / "cache"]
    result = _invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    expected = {"missing_folder": "does not exist", "file_not_folder": "is a file, not a folder",
                "image_size_too_small": "--image-size 16 is too small for squeezenet1_0"}[problem]
    assert expected in result.output
    assert not (tmp_path / "cache" / "d").exists()  # nothing written
