"""Run a study: check the plan, estimate its cost, run what is not finished (cheap first), then the report.

Order: every extraction the cached heads need, every head (JAX, seconds), then the classic frozen loops, then
the fine-tunes, so the frozen-feature half of the answer exists long before the fine-tunes end. A finished run
(metrics.json in <out>/runs/<key>/) is never trained again; a fine-tune killed mid-way resumes from its
last.pt; a run that diverges is kept as diverged and the study goes on. With nproc > 1 extraction and
fine-tuning run as the `--list` command lines (torchrun); otherwise in this process. Orchestration: torch and
JAX are imported inside the functions that run a step.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featcache.config import DataConfig, ExtractConfig, FinetuneConfig, TrainConfig
from featcache.errors import DivergedError, UserError
from featcache.study import store
from featcache.study.commands import command_line, extract_args, run_args
from featcache.study.overview import Overview
from featcache.study.plan import RunSpec, StudyPlan, difference, expand, normalized

Log = Callable[[str], None]
REPORT_FILES = ("report.md", "report.html", "report.csv", "report.json")


@dataclass(frozen=True)
class StudyResult:
    """What run_study did: the plan, its runs, which it trained now, and the report it wrote."""

    plan: StudyPlan
    specs: list[RunSpec]
    trained: list[str]  # keys of the runs trained by this call
    diverged: list[str]  # keys of the runs that diverged (all, not only this call's)
    report: dict = field(default_factory=dict)  # report.json's content
    report_dir: Path = Path(".")

    @property
    def report_md(self) -> Path:
        return self.report_dir / "report.md"

    @property
    def report_html(self) -> Path:
        return self.report_dir / "report.html"


def prepare(plan: StudyPlan, *, force: bool = False, write: bool = True) -> tuple[StudyPlan, list[RunSpec]]:
    """The checked plan and its runs; a study folder of another plan is a UserError (unless force: start over).

    write: store plan.toml in the study folder (the plan of record for reruns and `--report-only`).
    """
    plan = normalized(plan)
    specs = expand(plan)
    stored = store.stored_plan(plan.out)
    if stored is not None and not force and (diff := difference(normalized(stored), plan)):
        raise UserError(f"Study folder {plan.out} was made by a different plan ({diff}); run it with the same "
                        f"settings, choose another --out, or pass --force to start over.")
    if force and stored is not None:
        _start_over(Path(plan.out))
    if write:
        store.write_plan(plan)
    return plan, specs


def _start_over(out: Path) -> None:
    """--force: remove what the study wrote in its folder (plan, runs, extraction times, report), nothing else."""
    import shutil

    shutil.rmtree(out / store.RUNS_DIR, ignore_errors=True)
    shutil.rmtree(out / "figures", ignore_errors=True)
    for name in (*REPORT_FILES, store.EXTRACTIONS_FILE, "plan.toml"):
        (out / name).unlink(missing_ok=True)


def pending(plan: StudyPlan, specs: list[RunSpec]) -> list[RunSpec]:
    """The runs with no finished run directory yet, in the order they run."""
    return [s for s in specs if store.finished_run(plan.out, s) is None]


def list_commands(plan: StudyPlan, *, force: bool = False) -> list[str]:
    """`--list`: one featcache command line per pending run (the plan is checked and stored first)."""
    plan, specs = prepare(plan, force=force)
    return [command_line(plan, s) for s in pending(plan, specs)]


def run_study(plan: StudyPlan, *, force: bool = False, report_only: bool = False, progress: bool = True,
              log: Log = print) -> StudyResult:
    """Run every unfinished run of the plan, then write the report; what `featcache study` does.

    Args:
        plan: the study (check_plan's errors come before anything runs).
        force: start a study folder of another plan over.
        report_only: run nothing; report whatever finished (e.g. after the `--list` commands ran elsewhere).
        progress: the live overview on an interactive terminal (otherwise one line per finished run).
        log: where the plan, the estimate and the report's first screen go.

    Returns:
        The StudyResult (report.json's content in .report).
    """
    from featcache.study.estimate import estimate
    from featcache.study.documents import write_report
    from featcache.study.report import first_screen

    plan, specs = prepare(plan, force=force, write=not report_only or store.stored_plan(plan.out) is None)
    todo = [] if report_only else pending(plan, specs)
    log(f"Study {plan.out}: {len(specs)} runs ({len(specs) - len(pending(plan, specs))} finished, "
        f"{len(todo)} to run now).")
    trained: list[str] = []
    if todo:
        costs = estimate(plan, todo, log=log)
        steps = [f"extract {label}" for label in dict.fromkeys(s.label for s in todo if s.mode == "head")]
        overview = Overview(steps + [s.key for s in specs], done={s.key for s in specs if s not in todo},
                            costs=costs, live=progress, log=log)
        with overview:
            _run_all(plan, todo, overview=overview, trained=trained)
    report = write_report(plan, specs, log=log)
    log(first_screen(report))
    diverged = [r["key"] for r in report["runs"] if r["status"] == "diverged"]
    return StudyResult(plan=plan, specs=specs, trained=trained, diverged=diverged, report=report,
                       report_dir=Path(plan.out))


def _run_all(plan: StudyPlan, todo: list[RunSpec], *, overview: Overview, trained: list[str]) -> None:
    """Extractions the pending heads need, then every pending run in plan order."""
    caches: dict[str, Path] = {}
    for spec in todo:
        if spec.mode == "head" and spec.label not in caches:
            overview.start(f"extract {spec.label}")
            caches[spec.label] = _extract(plan, spec)
            overview.finish(f"extract {spec.label}")
    for spec in todo:
        overview.start(spec.key)
        status = _run_one(plan, spec, cache=caches.get(spec.label))
        trained.append(spec.key)
        overview.finish(spec.key, status=status)


def _data(plan: StudyPlan) -> DataConfig:
    return DataConfig(root=plan.data, val_fraction=plan.val_fraction, test_fraction=plan.test_fraction,
                      split_seed=plan.split_seed)


def _train(plan: StudyPlan, spec: RunSpec, epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=plan.batch_size, optimizer=plan.optimizer, lr=plan.lr,
                       momentum=plan.momentum, weight_decay=plan.weight_decay, seed=spec.seed,
                       runs_dir=str(store.run_parent(plan.out, spec)))


def _quiet(_: str) -> None:
    """The steps' own lines: the overview stands in for them."""


def _extract(plan: StudyPlan, spec: RunSpec) -> Path:
    """The cache of the run's backbone (extracted or found), its wall time recorded once."""
    from featcache.extraction import extract, find_cache

    config = ExtractConfig(model=spec.model, data=_data(plan), weights=spec.weights, image_size=plan.image_size,
                           num_workers=plan.num_workers, device=plan.device, cache_dir=plan.cache_dir, wait=True)
    t0 = time.perf_counter()
    if plan.nproc > 1:
        _subprocess(extract_args(plan, spec))
        path = find_cache(config)
        if path is None:
            raise UserError(f"The extraction of {spec.label} under torchrun left no cache; see the lines above.")
    else:
        path = extract(config, progress=False, log=_quiet)
    store.record_extraction(plan.out, spec.label, cache=path, seconds=time.perf_counter() - t0)
    return path


def _run_one(plan: StudyPlan, spec: RunSpec, *, cache: Path | None) -> str:
    """Train one run into <out>/runs/<key>/; returns "done" or "diverged"."""
    for stale in store.unfinished_runs(plan.out, spec):
        if spec.mode == "head" or not (stale / "finetune.json").is_file():
            store.remove_tree(stale)  # a head run restarts (seconds); a loop without its settings file too
    try:
        if spec.mode == "head":
            from featcache.head_runs import head_train

            result = head_train(cache=cache, config=_train(plan, spec, plan.epochs), solver=spec.solver,
                                progress=False)
            return "diverged" if result.diverged else "done"
        return _loop(plan, spec)
    except DivergedError:
        return "diverged"


def _loop(plan: StudyPlan, spec: RunSpec) -> str:
    """A frozen loop or fine-tune, resumed from its unfinished run directory when one is left."""
    if plan.nproc > 1:
        code = _subprocess(run_args(plan, spec), allowed=(DivergedError.exit_code,))
        return "diverged" if code == DivergedError.exit_code else "done"
    from featcache.finetuning import finetune

    epochs = plan.epochs if spec.mode == "frozen" else plan.tune_epochs
    config = FinetuneConfig(model=spec.model, data=_data(plan), weights=spec.weights, image_size=plan.image_size,
                            freeze_backbone=spec.mode == "frozen", device=plan.device, num_workers=plan.num_workers,
                            cache_dir=plan.cache_dir)
    left = store.unfinished_runs(plan.out, spec)
    result = finetune(config, _train(plan, spec, epochs), resume=left[-1] if left else None, progress=False,
                      log=_quiet)
    return "diverged" if result.diverged else "done"


def _subprocess(args: list[str], *, allowed: tuple[int, ...] = ()) -> int:
    """Run `featcache ARGS` (torchrun behind --nproc); a failure other than `allowed` exit codes is a UserError."""
    code = subprocess.run([sys.executable, "-m", "featcache", *args]).returncode
    if code and code not in allowed:
        raise UserError(f"`featcache {' '.join(args[:3])} ...` failed (exit code {code}); the lines above say why.",
                        exit_code=code)
    return code

