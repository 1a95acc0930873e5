"""The study folder: plan.toml, runs/<run key>/<run dir>, extractions.json, the report files.

    <out>/plan.toml            the plan the folder was made by (plan.to_toml)
    <out>/runs/<key>/<run>/    one run directory per run key (featcache's run dirs, metrics.json last)
    <out>/extractions.json     {model@weights: {"cache": path, "seconds": wall s of its extraction}}
    <out>/report.{md,html,csv,json} and <out>/figures/*.png

A run is finished when its run directory holds metrics.json; finished runs are what a rerun reuses and what the
report collects, whoever ran them (this process, or the commands of `--list` on a scheduler).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from featcache import runs
from featcache.errors import UserError
from featcache.files import atomic_write_bytes
from featcache.study.plan import PLAN_FILE, RunSpec, StudyPlan, read_toml, to_toml

EXTRACTIONS_FILE = "extractions.json"
RUNS_DIR = "runs"


def run_parent(out: str | Path, spec: RunSpec) -> Path:
    """The folder the run's directory is created in (its --runs-dir)."""
    return Path(out) / RUNS_DIR / spec.key


def finished_run(out: str | Path, spec: RunSpec) -> Path | None:
    """The run's finished directory (the first by name, when a scheduler ran it twice), None when none finished."""
    parent = run_parent(out, spec)
    done = sorted(p for p in parent.iterdir() if runs.is_finished(p)) if parent.is_dir() else []
    return done[0] if done else None


def unfinished_runs(out: str | Path, spec: RunSpec) -> list[Path]:
    """Run directories of the run that did not finish (killed or still running elsewhere)."""
    parent = run_parent(out, spec)
    return sorted(p for p in parent.iterdir() if p.is_dir() and not runs.is_finished(p)) if parent.is_dir() else []


def remove_tree(path: Path) -> None:
    """Remove an unfinished run directory of this study (never anything outside its runs/ folder)."""
    if RUNS_DIR not in path.parts:
        raise ValueError(f"refusing to remove {path}: not a study run")
    shutil.rmtree(path, ignore_errors=True)


def stored_plan(out: str | Path) -> StudyPlan | None:
    """The plan of an existing study folder (its plan.toml), None for a new folder."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return StudyPlan(out=str(out), **read_toml(path))
    except TypeError as exc:
        raise UserError(f"{path} is not a featcache study plan ({exc}); pass --force to start the study over.")


def write_plan(plan: StudyPlan) -> None:
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PLAN_FILE, to_toml(plan).encode())


def read_extractions(out: str | Path) -> dict:
    """{model@weights: {"cache": path, "seconds": s}} of the extractions this study ran (empty when none)."""
    path = Path(out) / EXTRACTIONS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_extraction(out: str | Path, label: str, *, cache: Path, seconds: float) -> None:
    """Keep the wall time of a model's extraction: the cost its cached rows share (counted once)."""
    data = read_extractions(out)
    if data.get(label, {}).get("cache") == str(cache):
        return  # a cache hit: the first extraction's time stays the cost
    data[label] = {"cache": str(cache), "seconds": round(float(seconds), 3)}
    atomic_write_bytes(Path(out) / EXTRACTIONS_FILE, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
