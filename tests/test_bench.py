"""`featcache bench`: the quick run produces a table and a JSON that agree; never a speed threshold."""

from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from featcache import bench
from featcache.cli import cli


def _median(values):
    return statistics.median(values)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `featcache bench --quick` (resnet18, 32 px, 2 epochs): its output and its JSON."""
    tmp = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(cli, ["bench", "--quick", "--out", str(tmp / "out"), "--work-dir", str(tmp / "work")])
    assert result.exit_code == 0, result.output
    (path,) = (tmp / "out").glob("bench-*-quick.json")
    return result.output, json.loads(path.read_text()), path


def test_quick_json_records_machine_settings_and_every_repeat(quick_run):
    _, doc, _ = quick_run
    assert doc["schema"] == bench.SCHEMA
    s = doc["settings"]
    assert doc["command"] == f"featcache bench --quick --out {s['out']} --work-dir {s['work_dir']}"
    assert (s["models"], s["epochs"], s["image_size"], s["repeat"], s["finetune"]) == (["resnet18"], 2, 32, 1, False)
    assert doc["data"]["counts"] == {"train": 16, "val": 8, "test": 8}
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["device"] == "cpu"
    assert {"torch", "torchvision", "jax", "flax", "optax", "python"} <= set(doc["versions"])
    record = doc["models"]["resnet18"]
    assert record["workers"]["torch_threads"] >= 1 and record["workers"]["crop"] == 32
    assert record["workers"]["feature_dim"] == 512
    assert set(record["paths"]) == {"classic", "extract", "head_cold", "cold", "warm", "torch_head", "jax_head",
                                     "forward"}
    for name, times in record["paths"].items():
        assert len(times["wall_s"]) == 1 and all(t > 0 for t in times["wall_s"]), name
        assert all(0 < t <= w for t, w in zip(times["inproc_s"], times["wall_s"])), name  # in-process <= process
    assert record["paths"]["classic"]["epochs_run"] == [2] and record["paths"]["classic"]["diverged"] == [False]
    for head in ("head_cold", "warm"):
        t = record["paths"][head]
        assert t["inproc_s"][0] == pytest.approx(t["load_s"][0] + t["compile_s"][0] + t["train_s"][0])


def test_quick_ratios_are_recomputed_from_the_times_in_the_file(quick_run):
    _, doc, _ = quick_run
    record = doc["models"]["resnet18"]
    p, r = record["paths"], record["summary"]["ratios"]
    # cached-cold = extract + head-train, repeat by repeat
    assert p["cold"]["wall_s"][0] == pytest.approx(p["extract"]["wall_s"][0] + p["head_cold"]["wall_s"][0])
    theory = (2 * (16 + 8) + 8) / 32
    assert r["theoretical_classic_over_cold"] == pytest.approx(theory)
    classic, cold = _median(p["classic"]["wall_s"]), _median(p["cold"]["wall_s"])
    assert r["classic_over_cold"] == pytest.approx(classic / cold)
    assert r["classic_over_cold_of_theory"] == pytest.approx(classic / cold / theory)
    assert r["classic_over_cold_inproc"] == pytest.approx(
        _median(p["classic"]["inproc_s"]) / _median(p["cold"]["inproc_s"]))
    assert r["torch_head_over_jax_warm"] == pytest.approx(
        _median(p["torch_head"]["inproc_s"]) / _median(p["jax_head"]["inproc_s"]))
    assert r["torch_head_over_jax_train"] == pytest.approx(
        _median(p["torch_head"]["inproc_s"]) / _median(p["warm"]["train_s"]))
    assert r["extract_over_forward"] == pytest.approx(
        _median(p["forward"]["inproc_s"]) / _median(p["extract"]["inproc_s"]))
    for head in ("torch_head", "jax_head"):  # each head timed 3 times in its process, median kept
        assert len(p[head]["runs_s"][0]) == 3
        assert p[head]["inproc_s"][0] == pytest.approx(_median(p[head]["runs_s"][0]))
    # scaling: the 1x point is path 2's extraction, the E-epoch point path 3; growth against the first point
    ext, head = record["scaling"]["extract"], record["scaling"]["head"]
    assert [pt["factor"] for pt in ext] == [1, 2] and [pt["images"] for pt in ext] == [32, 64]
    assert ext[0]["wall_s"] == p["extract"]["wall_s"] and head[0]["train_s"] == p["warm"]["train_s"]
    sc = record["summary"]["scaling"]
    assert sc["extract"][1]["growth_inproc"] == pytest.approx(ext[1]["inproc_s"][0] / ext[0]["inproc_s"][0])
    assert [pt["epochs"] for pt in head] == [2, 8]
    assert sc["head"][1]["growth_train"] == pytest.approx(head[1]["train_s"][0] / head[0]["train_s"][0])
    assert sc["head"][1]["expected"] == 4


def test_quick_records_precision_forward_limits_and_fixed_costs(quick_run):
    from featcache.precision import resolve

    _, doc, _ = quick_run
    record = doc["models"]["resnet18"]
    p, r = record["paths"], record["summary"]["ratios"]
    assert doc["settings"]["precision"] == "auto" and record["precision"] == resolve("auto", "cpu")
    limits = {"fp32_nchw_s", "fp32_s"} | ({"bf16_s"} if record["precision"] == "bf16" else set())
    assert limits <= set(p["forward"]) and all(p["forward"][k][0] > 0 for k in limits)
    assert p["forward"]["inproc_s"] == p["forward"][f"{record['precision']}_s"]  # extract's arithmetic
    assert r["extract_over_fp32_nchw_forward"] == pytest.approx(
        _median(p["forward"]["fp32_nchw_s"]) / _median(p["extract"]["inproc_s"]))
    fixed = record["summary"]["fixed_parts_s"]
    assert set(fixed) == {"classic", "extract", "head_cold", "warm"}
    for name, parts in fixed.items():  # before the first batch + the batches + after the last = the process
        rec = p[name]
        assert parts["to_first_batch_s"] > 0 and parts["after_last_batch_s"] > 0, name
        assert rec["to_first_batch_s"][0] + rec["after_last_batch_s"][0] < rec["wall_s"][0], name


def test_quick_table_shows_the_numbers_of_the_file(quick_run):
    output, doc, path = quick_run
    record = doc["models"]["resnet18"]
    r = record["summary"]["ratios"]
    for label in bench.PATH_LABELS.values():
        if "fine-tune" not in label:
            assert label.strip().split(" (")[0][:20] in output
    assert "6 full fine-tune" not in output  # --quick skips path 6
    assert f"{_median(record['paths']['classic']['wall_s']):.2f}" in output
    assert f"{r['theoretical_classic_over_cold']:.2f}x" in output and f"{r['classic_over_cold']:.2f}x" in output
    assert "(2·(16+8) + 8) / 32" in output
    fixed = record["summary"]["fixed_parts_s"]["extract"]
    assert f"{fixed['to_first_batch_s']:.2f}" in output and f"{fixed['after_last_batch_s']:.2f}" in output
    assert "forward limit, fp32_nchw" in output and f"{r['extract_over_fp32_nchw_forward']:.2f}x" in output
    assert f"result: {path}" in output
    assert bench.render(doc) in output  # the table is a function of the file alone


def test_compare_two_results(quick_run):
    _, _, path = quick_run
    result = CliRunner().invoke(cli, ["bench", "--compare", str(path), str(path)])
    assert result.exit_code == 0, result.output
    assert "classic_over_cold" in result.output and "1.00" in result.output


def test_compare_refuses_a_file_that_is_not_a_result(tmp_path):
    other = tmp_path / "metrics.json"
    other.write_text(json.dumps({"mode": "head"}))
    result = CliRunner().invoke(cli, ["bench", "--compare", str(other), str(other)])
    assert result.exit_code == 2 and "is not a featcache bench result" in result.output


def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(cli, ["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: CUDA is not available on this machine; use --device cpu."
    assert not list(tmp_path.iterdir())


def test_unknown_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--models", "resnet19", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "resnet18" in result.output and "Traceback" not in result.output


def test_theoretical_ratio_of_the_demo_at_30_epochs():
    assert bench.theoretical_ratio({"train": 200, "val": 60, "test": 60}, 30) == pytest.approx((30 * 260 + 60) / 320)
