"""The command line as a user meets it: --help, models, demo-data, import boundaries."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from featcache.backbones import BACKBONES
from featcache.cli import cli


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


def test_help_imports_neither_torch_nor_jax():
    mods = _modules_after("from featcache.cli import cli; cli(['--help'], standalone_mode=False)")
    assert "click" in mods
    assert not {"torch", "torchvision", "jax", "flax", "optax"} & mods


@pytest.mark.parametrize("module, forbidden", [
    ("featcache.head", {"torch", "torchvision"}),
    ("featcache.stream", {"torch", "torchvision"}),
    ("featcache.finetuning", {"jax", "flax", "optax"}),
    ("featcache.extraction", {"jax", "flax", "optax", "torch"}),  # torch only once it computes
    ("featcache.plan", {"jax", "torch"}),
    ("featcache.metrics", {"jax", "torch"}),
    ("featcache.runs", {"jax", "torch"}),
    ("featcache.cache", {"jax", "torch"}),
])
def test_import_boundaries(module, forbidden):
    assert not forbidden & _modules_after(f"import {module}")


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    commands = ["models", "demo-data", "demo", "extract", "head-train", "finetune", "report",
                "cache ls", "cache verify", "export", "predict", "bench", "shift"]
    for command in commands:
        result = runner.invoke(cli, command.split() + ["--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Example" in result.output, command


def test_models_lists_the_registry():
    result = CliRunner().invoke(cli, ["models"])
    assert result.exit_code == 0
    for name, spec in BACKBONES.items():
        assert name in result.output
    assert "convnext_small" in result.output and "1280" in result.output


def test_demo_data_writes_a_dataset(tmp_path):
    result = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "d"), "--image-size", "32"])
    assert result.exit_code == 0, result.output
    assert "wrote 320 images" in result.output
    assert len(list((tmp_path / "d" / "train" / "normal").glob("*.png"))) == 100


def test_unknown_model_and_missing_data_are_one_line_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["extract", "--model", "resnet19", "--data", "demo"])
    assert result.exit_code == 2 and "resnet18" in result.output
    result = runner.invoke(cli, ["extract", "--model", "resnet18", "--data", str(tmp_path / "nope"),
                                 "--weights", "none"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_head_train_without_a_cache_says_how_to_create_it(tmp_path):
    result = CliRunner().invoke(cli, ["head-train", "--model", "resnet18", "--data", "demo", "--weights", "none",
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2
    assert "featcache extract --model resnet18 --data demo --weights none" in result.output
