"""The study plan: its settings (from options or a TOML file), checked, expanded into runs, written as plan.toml.

A run is (model, weights, mode, solver, seed); its key names its folder in the study. The settings that change
what a run computes (data, weights, epochs, lr, ...) must equal those of the plan.toml already in a study
folder; the lists (models, modes, solvers, seeds) may grow or shrink: a study extended by one model trains only
that model's runs. Core + stdlib: no torch, no jax (the backbone lookup imports no torch at module level).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from featcache.errors import UserError

PLAN_FILE = "plan.toml"
MODES = ("head", "frozen", "finetune")  # cached heads (extract + head-train), the classic frozen loop, fine-tuning
DETERMINISTIC_SOLVERS = ("ridge", "lbfgs", "knn")  # no seed: one run, whatever --seeds says
LIST_FIELDS = ("models", "modes", "solvers", "seeds")  # may change between runs of one study folder
PLACE_FIELDS = ("out", "cache_dir", "device", "nproc", "num_workers", "bootstrap")  # where/how, not what


@dataclass(frozen=True)
class StudyPlan:
    """What `featcache study` runs: one field per option (and per key of the plan TOML)."""

    data: str  # a dataset folder, a manifest CSV, or demo / demo3
    out: str  # the study folder
    models: tuple[str, ...] = ("resnet18",)  # NAME or NAME@WEIGHTS (per-model weights)
    modes: tuple[str, ...] = MODES
    solvers: tuple[str, ...] = ("sgd",)  # head-train solvers of mode head
    seeds: int = 3  # seeds seed, seed + 1, ..., seed + seeds - 1
    seed: int = 0
    weights: str = "imagenet"  # of every model without @WEIGHTS
    image_size: int | None = None  # None = each model's native size
    epochs: int = 30  # head-train and the frozen loop
    finetune_epochs: int | None = None  # None = epochs
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    cache_dir: str = "cache"
    device: str = "cpu"
    nproc: int = 1  # processes of extract and finetune (torchrun)
    num_workers: int = 0  # decode workers of the torch steps (0: the study's process also holds JAX)
    bootstrap: int = 1000  # resamples of the report's paired comparisons

    @property
    def tune_epochs(self) -> int:
        return self.epochs if self.finetune_epochs is None else self.finetune_epochs

    def seed_list(self) -> list[int]:
        return list(range(self.seed, self.seed + self.seeds))


@dataclass(frozen=True)
class RunSpec:
    """One run of the study: what it trains; `key` names its folder under the study's runs/."""

    model: str  # the registry name
    weights: str
    mode: str  # head | frozen | finetune
    solver: str  # head's solver; "" for the torch loops
    seed: int

    @property
    def label(self) -> str:
        """model@weights: the backbone of a row."""
        return f"{self.model}@{self.weights}"

    @property
    def row(self) -> tuple[str, str, str]:
        """(label, mode, solver): the report row this run is one seed of."""
        return self.label, self.mode, self.solver

    @property
    def key(self) -> str:
        name = re.sub(r"[^A-Za-z0-9_.+-]", "_", self.label.replace("@", "--"))
        return f"{name}-{self.mode}{'-' + self.solver if self.solver else ''}-s{self.seed}"


def split_model(entry: str, default_weights: str) -> tuple[str, str]:
    """'NAME@WEIGHTS' -> (NAME, WEIGHTS); 'NAME' -> (NAME, default_weights). Model names never hold '@'."""
    name, sep, weights = entry.strip().partition("@")
    if sep and not weights:
        raise UserError(f"Model {entry!r} ends in '@' without weights; write NAME@WEIGHTS (e.g. resnet18@none) "
                        "or NAME alone.")
    return name, (weights if sep else default_weights)


def check_plan(plan: StudyPlan) -> list[tuple[str, str]]:
    """The (model, weights) of every model, after every check of the plan: one-sentence UserErrors, before any run."""
    if not plan.models:
        raise UserError("The study has no models; pass --models NAME[,NAME...].")
    bad_modes = [m for m in plan.modes if m not in MODES]
    if bad_modes or not plan.modes:
        raise UserError(f"Unknown mode {', '.join(bad_modes) or '(none)'}; choose from {', '.join(MODES)}.")
    if plan.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {plan.seeds}.")
    _check_solvers(plan)
    models = [split_model(m, plan.weights) for m in plan.models]
    for name, weights in models:
        _check_model(name, weights, plan.image_size, plan.modes)
    if len(set(models)) != len(models):
        raise UserError("A model appears twice in --models; list each NAME@WEIGHTS once.")
    return models


def _check_solvers(plan: StudyPlan) -> None:
    """Solvers exist, combine with head-train's options, and have a head mode to run in."""
    from featcache.head_runs import check_combination, solver_name

    solvers = [solver_name(s) for s in plan.solvers]
    if not solvers:
        raise UserError("--solvers is empty; give at least one of sgd, ridge, lbfgs, knn.")
    if "head" not in plan.modes and tuple(solvers) != ("sgd",):
        raise UserError(f"--solvers {','.join(solvers)} chooses the heads of mode head, which --modes "
                        f"{','.join(plan.modes)} leaves out; add head to --modes or drop --solvers.")
    for solver in solvers:
        check_combination(solver=solver, grid=False, stream=None, l2s=None)


def _check_model(name: str, weights: str, image_size: int | None, modes: Sequence[str]) -> None:
    """The backbone exists (the registry's own lookup and message), can run every mode of the plan (a backbone
    file is frozen only) and, for a torchvision model, takes the crop size."""
    from featcache import backbones

    if not weights:
        raise UserError(f"Model {name} has empty weights; write NAME@imagenet, NAME@none or NAME@PATH.")
    backbones.check_model(name)
    if "finetune" in modes:
        backbones.check_finetunable(name, frozen=False)
    if backbones.source_of(name) is not backbones.torchvision_source:
        return  # timm and files: their own transform decides the crop
    spec = backbones.get_spec(name)
    min_size, fixed = getattr(spec, "min_size", 1), getattr(spec, "fixed_size", False)
    native = getattr(spec, "input_size", None)
    if image_size is not None and fixed and image_size != native:
        raise UserError(f"{name} takes only {native} px images, not --image-size {image_size}; use "
                        f"--image-size {native} or another model.")
    if image_size is not None and image_size < min_size:
        raise UserError(f"{name} needs images of at least {min_size} px, not --image-size {image_size}; raise "
                        f"--image-size or drop {name} from --models.")


def expand(plan: StudyPlan) -> list[RunSpec]:
    """Every run of the plan, cheap first: heads (all models), then frozen loops, then fine-tunes."""
    models = check_plan(plan)
    from featcache.head_runs import solver_name

    solvers = list(dict.fromkeys(solver_name(s) for s in plan.solvers))
    out: list[RunSpec] = []
    for mode in [m for m in MODES if m in plan.modes]:
        for name, weights in models:
            for solver in (solvers if mode == "head" else [""]):
                seeds = plan.seed_list()[:1] if solver in DETERMINISTIC_SOLVERS else plan.seed_list()
                out += [RunSpec(model=name, weights=weights, mode=mode, solver=solver, seed=s) for s in seeds]
    return out


# --------------------------------------------------------------------------- plan.toml


def to_toml(plan: StudyPlan) -> str:
    """The plan as TOML (flat keys; None fields left out; `out` left out: the file lives in the study folder)."""
    lines = ["# featcache study plan: `featcache study plan.toml` runs it again (finished runs are reused);",
             "# edit models, modes, solvers or seeds to extend the study."]
    for f in fields(StudyPlan):
        value = getattr(plan, f.name)
        if f.name == "out" or value is None:
            continue
        lines.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_toml(path: str | Path) -> dict:
    """The fields of a plan TOML file as StudyPlan keywords (lists as tuples); a bad file is a UserError."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"Plan file {path} cannot be read as TOML ({exc}); fix it or pass the options instead.")
    known = {f.name: f for f in fields(StudyPlan)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise UserError(f"Plan file {path} has unknown key(s) {', '.join(unknown)}; the keys are the options of "
                        f"featcache study ({', '.join(known)}).")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def normalized(plan: StudyPlan) -> StudyPlan:
    """A plan whose data is an absolute path (demo / demo3 stay names): the same plan from any folder."""
    if plan.data in ("demo", "demo3"):
        return plan
    return dataclasses.replace(plan, data=str(Path(plan.data).expanduser().resolve()))


def difference(stored: StudyPlan, given: StudyPlan) -> str | None:
    """What differs between two plans in the settings that change runs ("epochs 3 there, 5 here"), or None."""
    diffs = []
    for f in fields(StudyPlan):
        if f.name in LIST_FIELDS or f.name in PLACE_FIELDS:
            continue
        a, b = getattr(stored, f.name), getattr(given, f.name)
        if a != b:
            diffs.append(f"{f.name} {_shown(a)} there, {_shown(b)} here")
    return "; ".join(diffs) or None


def _shown(value) -> str:
    return "(default)" if value is None else (",".join(map(str, value)) if isinstance(value, tuple) else str(value))


def plan_from(given: dict, *, plan_file: str | Path | None = None) -> StudyPlan:
    """The plan of `featcache study`: StudyPlan's defaults, then the plan file's keys, then the options given.

    given: option name -> value (None = not given; lists as tuples). out defaults to the plan file's folder.
    """
    values = read_toml(plan_file) if plan_file is not None else {}
    values.update({k: v for k, v in given.items() if v is not None})
    if plan_file is not None:
        values.setdefault("out", str(Path(plan_file).parent))
    for needed, option in (("data", "--data DIR|manifest.csv|demo"), ("out", "--out FOLDER")):
        if values.get(needed) in (None, ""):
            raise UserError(f"The study needs {option} (or a plan TOML file that sets {needed}).")
    return StudyPlan(**values)
