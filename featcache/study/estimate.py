"""The cost of a study before it runs: image counts of the dataset and a timing probe of each backbone.

The probe times one forward pass of a small batch at the study's crop size (random weights: the speed does
not depend on the values); a step's estimate counts the forward passes it makes (a fine-tune's backward pass
as two more). Orchestration: torch inside the probe only.
"""

from __future__ import annotations

import time
from typing import Callable

from featcache.config import DataConfig
from featcache.study.overview import duration
from featcache.study.plan import RunSpec, StudyPlan

PROBE_BATCH = 8
DECODE_FACTOR = 1.5  # reading and transforming images on top of the forward pass
BACKWARD_FACTOR = 3.0  # forward + backward + optimizer step of a fine-tune, in forward passes
HEAD_SECONDS = {"sgd": 2.0, "ridge": 2.0, "lbfgs": 4.0, "knn": 2.0}  # compile + fit on cached features


def split_counts(plan: StudyPlan) -> dict[str, int]:
    """Images per split of the study's dataset (the demo is rendered here when it is not yet)."""
    from featcache.datasets import resolve_data_root, scan_data

    data = DataConfig(root=plan.data, val_fraction=plan.val_fraction, test_fraction=plan.test_fraction,
                      split_seed=plan.split_seed)
    index = scan_data(resolve_data_root(plan.data, cache_dir=plan.cache_dir), data)
    return {split: len(samples) for split, samples in index.splits.items()}


def probe_seconds_per_image(model: str, image_size: int | None) -> float:
    """Wall seconds of one image through the backbone's forward pass (a warm batch of PROBE_BATCH)."""
    import torch

    from featcache.backbones import build_backbone

    backbone = build_backbone(model, weights="none", image_size=image_size)
    size = image_size or getattr(backbone.spec, "input_size", 224)
    x = torch.zeros(PROBE_BATCH, 3, size, size)
    with torch.inference_mode():
        backbone.net(x)
        t0 = time.perf_counter()
        backbone.net(x)
    return (time.perf_counter() - t0) / PROBE_BATCH


def step_costs(plan: StudyPlan, todo: list[RunSpec], *, counts: dict[str, int],
               per_image: dict[str, float]) -> dict[str, float]:
    """Estimated wall seconds of each pending step (extractions as "extract model@weights")."""
    n_train, n_val, n_test = counts["train"], counts["val"], counts["test"]
    costs: dict[str, float] = {}
    for spec in todo:
        t = per_image[spec.model] * DECODE_FACTOR
        if spec.mode == "head":
            costs.setdefault(f"extract {spec.label}", (n_train + n_val + n_test) * t + 1.0)
            costs[spec.key] = HEAD_SECONDS.get(spec.solver, 2.0)
        elif spec.mode == "frozen":
            costs[spec.key] = plan.epochs * (n_train + n_val) * t + n_test * t
        else:
            costs[spec.key] = plan.tune_epochs * (n_train * BACKWARD_FACTOR + n_val) * t + n_test * t
    return costs


def estimate(plan: StudyPlan, todo: list[RunSpec], *, log: Callable[[str], None]) -> dict[str, float]:
    """Probe each pending backbone, print the estimate of the whole study, return the estimate per step."""
    counts = split_counts(plan)
    per_image = {m: probe_seconds_per_image(m, plan.image_size) for m in dict.fromkeys(s.model for s in todo)}
    costs = step_costs(plan, todo, counts=counts, per_image=per_image)
    parts = {"extractions": sum(c for k, c in costs.items() if k.startswith("extract "))}
    for mode in ("head", "frozen", "finetune"):
        parts[mode] = sum(costs[s.key] for s in todo if s.mode == mode)
    rates = ", ".join(f"{m} {1 / t:.0f} img/s" for m, t in per_image.items())
    shown = ", ".join(f"{name} {duration(c)}" for name, c in parts.items() if c)
    log(f"Estimated cost: about {duration(sum(costs.values()))} for {len(todo)} runs ({shown}) on "
        f"{counts['train']}/{counts['val']}/{counts['test']} train/val/test images; probe of the forward pass: "
        f"{rates}.")
    return costs
