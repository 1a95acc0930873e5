"""featcache export / predict / load_model: an exported head-train run and an exported finetune run
reproduce the run's test accuracy on the demo test split image by image; the .pt2 (torch.export, the
default) and TorchScript files load with plain torch in a process that never imports featcache; the export check refuses a
backbone that does not compute the cached features; bad inputs end in one-line errors (exit 2).

Tiny demo data (12/6/6 images per class, 32 px), resnet18 with weights "none", CPU. JAX is loaded in
this process (train_head), so DataLoader workers run only in subprocesses.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import featcache
from featcache import runs
from featcache.cache import load_features, load_paths
from featcache.cli import cli
from featcache.demo import make_demo_dataset
from featcache.exporting import META_FILE

SIZE = 32
N_PER_CLASS = (12, 6, 6)  # train, val, test images per class
HEAD_OPTIONS = dict(epochs=5, optimizer="adam", lr=0.05, batch_size=8, standardize=True)
FINETUNE_OPTIONS = dict(epochs=2, optimizer="adam", lr=0.001, batch_size=8)


def _invoke(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def _accuracy(predictions) -> float:
    """Accuracy against the class folder of each image."""
    return float(np.mean([Path(r.path).parent.name == r.predicted for r in predictions.rows]))


# ---------------------------------------------------------------- shared data and runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def demo2(work) -> Path:
    return make_demo_dataset(work / "demo2", num_classes=2, n_per_class=N_PER_CLASS, image_size=SIZE)


@pytest.fixture(scope="module")
def head_run(work, demo2):
    cache = featcache.extract(model="resnet18", data=str(demo2), weights="none", image_size=SIZE, num_workers=0,
                              cache_dir=str(work / "cache"))
    return featcache.train_head(cache=cache, runs_dir=str(work / "runs"), **HEAD_OPTIONS)


@pytest.fixture(scope="module")
def finetune_run(work):
    demo3 = make_demo_dataset(work / "demo3", num_classes=3, n_per_class=N_PER_CLASS, image_size=SIZE)
    return featcache.finetune(model="resnet18", data=str(demo3), weights="none", image_size=SIZE, num_workers=0,
                              runs_dir=str(work / "runs"), cache_dir=str(work / "cache"), **FINETUNE_OPTIONS)


@pytest.fixture(scope="module")
def head_model(work, head_run) -> Path:
    return featcache.export(head_run.run_dir, out=work / "head-model.pt", format="torchscript").path


# ---------------------------------------------------------------- export -> predict = the run


def test_head_run_export_then_predict_reproduces_the_run(work, demo2, head_run, head_model):
    # What the run scored: head.npz on the CACHED test features, image by image.
    x, y, meta = load_features(head_run.cache["path"], "test")
    head = runs.load_head(head_run.run_dir / runs.HEAD_FILE)
    logits = ((x - head["mean"]) / head["std"]) @ head["weight"].T + head["bias"]  # (N, 1)
    expected = {p: meta["class_names"][int(v > 0)] for p, v in zip(load_paths(head_run.cache["path"], "test"),
                                                                     logits[:, 0])}
    assert float(np.mean([(v > 0) == label for v, label in zip(logits[:, 0], y)])) == head_run.summary.test_acc
    assert len(set(expected.values())) == 2  # a model that predicts both classes: the comparison means something

    model = featcache.load_model(head_model)
    assert isinstance(model, torch.jit.ScriptModule)
    assert model.class_names == ["abnormal", "normal"] and model.input_size == SIZE
    assert model.metadata["head_shape"] == [1, 512] and model.metadata["run"]["mode"] == "head"
    assert model.transform_desc == meta["transform"]

    predictions = featcache.predict(model, demo2 / "test", batch_size=5, num_workers=0)
    assert not predictions.failed and len(predictions.rows) == 12
    got = {Path(r.path).relative_to(demo2).as_posix(): r.predicted for r in predictions.rows}
    assert got == expected
    assert _accuracy(predictions) == head_run.summary.test_acc
    # The logits agree with the cached-feature logits, not just the classes (paths are in the same sorted order).
    np.testing.assert_allclose(predictions.logits, logits, rtol=1e-5, atol=1e-4)
    for r in predictions.rows:
        assert sum(r.probabilities) == pytest.approx(1.0) and max(r.probabilities) >= 0.5

    # The default torch.export .pt2 gives the same logits, on any batch size (dynamic batch dimension).
    program = featcache.export(head_run.run_dir, out=work / "head-model.pt2")
    assert program.format == "exported" and program.max_abs_diff <= program.tolerance
    from_pt2 = featcache.predict(program.path, demo2 / "test", batch_size=5, num_workers=0)
    np.testing.assert_allclose(from_pt2.logits, predictions.logits, rtol=1e-5, atol=1e-5)

    # state-dict format and predict(RUN_DIR) give the same predictions.
    state_dict = featcache.export(head_run.run_dir, out=work / "head-sd.pt", format="state-dict")
    assert state_dict.format == "state-dict" and state_dict.max_abs_diff <= state_dict.tolerance
    payload = torch.load(state_dict.path, weights_only=True)
    assert payload["head_shape"] == [1, 512] and payload["class_names"] == ["abnormal", "normal"]
    for source in (state_dict.path, head_run.run_dir):
        again = featcache.predict(source, [demo2 / "test"], num_workers=0)
        assert [r.predicted for r in again.rows] == [r.predicted for r in predictions.rows]
        np.testing.assert_allclose(again.logits, predictions.logits, rtol=1e-5, atol=1e-5)


def test_finetune_run_export_then_predict_reproduces_the_run(work, finetune_run):
    result = featcache.export(finetune_run.run_dir)  # default: RUN_DIR/model.pt2, torch.export
    assert result.path == finetune_run.run_dir / "model.pt2" and result.mode == "finetune"
    assert result.format == "exported"
    assert result.max_abs_diff <= 1e-4
    root = Path(finetune_run.extra["dataset_root"])
    predictions = featcache.predict(result.path, root / "test", batch_size=7, num_workers=0)
    assert len(predictions.rows) == 18 and predictions.logits.shape == (18, 3)
    assert len({r.predicted for r in predictions.rows}) > 1
    assert _accuracy(predictions) == finetune_run.summary.test_acc
    counts = np.zeros((3, 3), int)
    names = finetune_run.class_names
    for r in predictions.rows:
        counts[names.index(Path(r.path).parent.name), names.index(r.predicted)] += 1
    assert counts.tolist() == finetune_run.summary.confusion_matrix


def test_torchscript_and_pt2_load_with_plain_torch_in_a_process_without_featcache(work, head_run, head_model):
    program = featcache.export(head_run.run_dir, out=work / "plain.pt2").path
    images = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch.save(images, work / "inputs.pt")
    code = f"""
import json, sys, torch
extra, extra2 = {{"{META_FILE}": ""}}, {{"{META_FILE}": ""}}
model = torch.jit.load({str(head_model)!r}, _extra_files=extra)
meta = json.loads(extra["{META_FILE}"])
program = torch.export.load({str(program)!r}, extra_files=extra2).module()
images = torch.load({str(work / 'inputs.pt')!r})
torch.save([model(images), program(images)], {str(work / 'plain-logits.pt')!r})
assert "featcache" not in sys.modules, "featcache was imported"
print(json.dumps([meta["class_names"], meta["input_size"], meta["transform"]["crop"],
                  json.loads(extra2["{META_FILE}"])["input_size"]]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["abnormal", "normal"], SIZE, SIZE, SIZE]
    with torch.no_grad():
        ours = featcache.load_model(head_model)(images)
    from_script, from_program = torch.load(work / "plain-logits.pt")
    torch.testing.assert_close(from_script, ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_program, ours, rtol=0, atol=1e-5)


def test_predict_cli_lists_unreadable_images_and_decodes_in_workers(work, demo2, head_model):
    folder = work / "new-images"
    (folder / "sub").mkdir(parents=True)
    good = sorted((demo2 / "test" / "normal").glob("*.png"))[:3]
    for i, path in enumerate(good):
        shutil.copy(path, folder / ("sub" if i == 2 else ".") / f"img{i}.png")
    (folder / "broken.png").write_bytes(good[0].read_bytes()[:60])  # truncated PNG
    (folder / "notes.jpg").write_text("not an image")
    (folder / "readme.txt").write_text("skipped: not an image extension")
    out_csv = work / "out" / "predictions.csv"
    # A fresh process (no JAX here), so the decode worker may fork.
    proc = subprocess.run([sys.executable, "-m", "featcache", "predict", "--model-file", str(head_model),
                           str(folder), "--num-workers", "1", "--batch-size", "2", "--out", str(out_csv)],
                          capture_output=True, text=True, cwd=work, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert "3 images predicted, 2 unreadable" in proc.stderr
    assert f"unreadable: {folder / 'notes.jpg'} (not a recognised image format)" in proc.stderr
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [Path(r["path"]).name for r in rows] == ["img0.png", "img1.png", "img2.png", "broken.png", "notes.jpg"]
    assert list(rows[0]) == ["path", "predicted", "prob_abnormal", "prob_normal", "error"]
    reference = featcache.predict(head_model, good, num_workers=0)
    for row, ref in zip(rows[:3], reference.rows):
        assert row["predicted"] == ref.predicted and row["error"] == ""
        # batch size 2 here vs 64 there: oneDNN picks other convolution kernels, so probabilities agree to
        # ~5e-6, not to the CSV's 6 decimals (measured 4.4e-6 on an AVX-512 EPYC)
        assert float(row["prob_normal"]) == pytest.approx(ref.probabilities[1], abs=2e-5)
    assert rows[3]["predicted"] == "" and rows[3]["error"] and rows[4]["error"]

    # The same through the in-process CLI, CSV on stdout, the run directory in place of --model-file.
    result = _invoke(["predict", head_model, good[0], "--num-workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert f"{good[0]},{reference.rows[0].predicted}," in result.output


# ---------------------------------------------------------------- the export check and weights


def test_export_check_refuses_images_that_are_not_the_cached_ones(work, head_run):
    # Same file names, other pixels: the rebuilt model does not reproduce the cached features.
    other = make_demo_dataset(work / "demo2-seed1", seed=1, num_classes=2, n_per_class=N_PER_CLASS, image_size=SIZE)
    out = work / "refused.pt"
    result = _invoke(["export", head_run.run_dir, "--out", out, "--data-root", other])
    _assert_one_line_error(result, "Export check failed", "differ from the run's")
    assert not out.exists() and not list(work.glob(".refused.pt.*"))


def test_head_run_on_a_weights_file_needs_that_file(work, demo2):
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        net = torchvision.models.resnet18(weights=None, num_classes=5)
    weights, wrong = work / "r18.pt", work / "r18-other.pt"
    torch.save(net.state_dict(), weights)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    cache = featcache.extract(model="resnet18", data=str(demo2), weights=str(weights), image_size=SIZE,
                              num_workers=0, dtype="float16", cache_dir=str(work / "cache"))
    run = featcache.train_head(cache=cache, runs_dir=str(work / "runs-file"), **HEAD_OPTIONS)
    _assert_one_line_error(_invoke(["export", run.run_dir]), "--weights PATH", "r18.pt")
    _assert_one_line_error(_invoke(["export", run.run_dir, "--weights", wrong]), "not those the cache")
    result = _invoke(["export", run.run_dir, "--weights", weights, "--out", work / "file-model.pt"])
    assert result.exit_code == 0, result.output
    assert "check: max |logit diff|" in result.output
    predictions = featcache.predict(work / "file-model.pt", demo2 / "test", num_workers=0)
    assert _accuracy(predictions) == run.summary.test_acc


def test_timm_head_run_exports_and_predicts(work, demo2):
    cache = featcache.extract(model="timm/resnet18", data=str(demo2), weights="none",
                              image_size=SIZE, num_workers=0, cache_dir=str(work / "cache"))
    run = featcache.train_head(cache=cache, runs_dir=str(work / "runs-timm"), **HEAD_OPTIONS)
    assert run.model == "timm/resnet18"
    report = _invoke(["report", run.run_dir])
    assert report.exit_code == 0 and "timm/resnet18" in report.output, report.output
    result = featcache.export(run.run_dir)
    assert result.path.name == "model.pt2" and result.max_abs_diff <= result.tolerance
    model = featcache.load_model(result.path)
    assert model.metadata["weights"] == "none" and model.transform_desc["interpolation"] == "bicubic"
    predictions = featcache.predict(model, demo2 / "test", num_workers=0)
    assert _accuracy(predictions) == run.summary.test_acc


# ---------------------------------------------------------------- errors a user can cause


def test_bad_runs_are_one_line_errors(work, head_run, finetune_run):
    _assert_one_line_error(_invoke(["export", work / "no-such-run"]), "does not exist")
    headless = work / "headless"
    shutil.copytree(head_run.run_dir, headless)
    (headless / runs.HEAD_FILE).unlink()
    _assert_one_line_error(_invoke(["export", headless]), "has no head.npz")
    unfinished = work / "unfinished"
    unfinished.mkdir()
    shutil.copy(finetune_run.run_dir / "finetune.json", unfinished)
    shutil.copy(finetune_run.run_dir / "last.pt", unfinished)
    _assert_one_line_error(_invoke(["export", unfinished]), "unfinished finetune run", "--resume")
    no_metrics = work / "no-metrics"
    shutil.copytree(head_run.run_dir, no_metrics)
    (no_metrics / runs.METRICS_FILE).unlink()
    _assert_one_line_error(_invoke(["export", no_metrics]), "not a finished run")
    no_best = work / "no-best"
    shutil.copytree(finetune_run.run_dir, no_best)
    (no_best / "best.pt").unlink()
    _assert_one_line_error(_invoke(["export", no_best]), "has no best.pt")
    _assert_one_line_error(_invoke(["export", head_run.run_dir, "--weights", work / "x.pt"]), "drop --weights")
    result = _invoke(["export", head_run.run_dir, "--format", "onnx"])
    assert result.exit_code == 2 and "torchscript" in result.output


def test_bad_model_files_and_images_are_one_line_errors(work, demo2, head_run, finetune_run, head_model):
    image = sorted((demo2 / "test" / "normal").glob("*.png"))[0]
    text = work / "model.txt"
    text.write_text("hello")
    cases = [
        (work / "missing.pt", "does not exist"),
        (image, "not a model exported by featcache"),
        (text, "not a model exported by featcache"),
        (head_run.run_dir / runs.HEAD_FILE, "not a model exported by featcache"),
        (finetune_run.run_dir / "best.pt", "training checkpoint"),
    ]
    for model_file, needle in cases:
        _assert_one_line_error(_invoke(["predict", "--model-file", model_file, image, "--num-workers", "0"]), needle)
    _assert_one_line_error(_invoke(["predict", "--model-file", head_model, work / "nope.png", "--num-workers", "0"]),
                           "does not exist")
    _assert_one_line_error(_invoke(["predict", head_model]), "--model-file")
    empty = work / "empty-folder"
    empty.mkdir()
    _assert_one_line_error(_invoke(["predict", head_model, empty, "--num-workers", "0"]), "No images found")


def test_api_names_and_import_boundaries():
    assert callable(featcache.predict) and callable(featcache.export) and callable(featcache.load_model)
    code = "import featcache.exporting, featcache.prediction, sys; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert "torch" in out.stdout.split()
    assert not {"jax", "flax", "optax"} & set(out.stdout.split())


def test_googlenet_skeleton_keeps_the_input_transform_of_imagenet_weights():
    # torchvision builds GoogLeNet with ImageNet weights with transform_input=True, which no state_dict
    # records: a finetune checkpoint of it must load into a network that still transforms its input.
    from featcache.backbones import BACKBONES
    from featcache.exporting import _skeleton

    tag = f"imagenet:{BACKBONES['googlenet'].weights_enum}"
    assert _skeleton("googlenet", weights_tag=tag, input_size=SIZE, num_outputs=1).backbone.transform_input
    assert not _skeleton("googlenet", weights_tag="none", input_size=SIZE, num_outputs=1).backbone.transform_input
