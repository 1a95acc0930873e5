"""The result document of `featcache bench`: its schema, path names, and the figures computed from its times."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from featcache.errors import UserError

SCHEMA = "featcache-bench/1"

PATH_LABELS = {
    "classic": "1 classic frozen (finetune --freeze-backbone)",
    "cold": "2 cached, cold: extract + head-train",
    "extract": "    extract (empty cache)",
    "head_cold": "    head-train",
    "warm": "3 cached, warm: head-train",
    "torch_head": "4 PyTorch head on the cache",
    "jax_head": "    JAX head, same timing (warm program)",
    "forward": "5 forward limit (in-memory tensors)",
    "finetune": "6 full fine-tune (finetune)",
}


def stats(values: Sequence[float]) -> dict:
    """median, min, max of per-repeat values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def med(record: dict, key: str = "wall_s") -> float:
    """Median of the per-repeat values `record[key]`."""
    return statistics.median(record[key])


def theoretical_ratio(counts: dict, epochs: int) -> float:
    """Backbone forward passes of the classic loop over those of one extraction: (E(Ntr+Nv)+Nte)/N."""
    n = counts["train"] + counts["val"] + counts["test"]
    return (epochs * (counts["train"] + counts["val"]) + counts["test"]) / n


def summarize_model(record: dict, *, counts: dict, epochs: int) -> dict:
    """Medians/spread per path, images/s and the ratios, computed from the per-repeat times in `record`."""
    p = record["paths"]
    n = sum(counts.values())
    trained = epochs * (counts["train"] + counts["val"])  # forward passes in the loops' epochs (test pass excluded)
    images = {"classic": trained, "extract": n, "cold": n, "forward": n, "finetune": trained}
    out = {"paths": {}, "ratios": {}, "scaling": {}}
    for name, rec in p.items():
        entry = {k: stats(v) for k, v in rec.items() if k not in ("diverged", "epochs_run", "runs_s")}
        if name in images:
            entry["images"] = images[name]
            entry["images_per_s"] = images[name] / med(rec, "inproc_s")
        if "epochs_run" in rec:
            entry["complete"] = all(e == epochs for e in rec["epochs_run"]) and not any(rec["diverged"])
        out["paths"][name] = entry
    theory = theoretical_ratio(counts, epochs)
    ratios = {
        "theoretical_classic_over_cold": theory,
        "classic_over_cold": med(p["classic"]) / med(p["cold"]),
        "classic_over_cold_inproc": med(p["classic"], "inproc_s") / med(p["cold"], "inproc_s"),
        "classic_over_warm": med(p["classic"]) / med(p["warm"]),
        "torch_head_over_jax_warm": med(p["torch_head"], "inproc_s") / med(p["jax_head"], "inproc_s"),
        "torch_head_over_jax_train": med(p["torch_head"], "inproc_s") / med(p["warm"], "train_s"),
        "torch_head_over_jax_compile_train": med(p["torch_head"], "inproc_s") / (
            med(p["warm"], "compile_s") + med(p["warm"], "train_s")),
        "extract_over_forward": med(p["forward"], "inproc_s") / med(p["extract"], "inproc_s"),
    }
    fw = p["forward"]
    if "fp32_nchw_s" in fw:  # the forward limit per precision (older result files lack it)
        ratios["extract_over_fp32_nchw_forward"] = med(fw, "fp32_nchw_s") / med(p["extract"], "inproc_s")
        ratios["forward_over_fp32_nchw_forward"] = med(fw, "fp32_nchw_s") / med(fw, "inproc_s")
    ratios["classic_over_cold_of_theory"] = ratios["classic_over_cold"] / theory
    ratios["classic_over_cold_inproc_of_theory"] = ratios["classic_over_cold_inproc"] / theory
    if "finetune" in p:
        ratios["finetune_over_cold"] = med(p["finetune"]) / med(p["cold"])
    out["ratios"] = ratios
    out["fixed_s"] = {  # wall - in-process: start-up, imports, dataset scan, model build, run directory
        name: med(p[name]) - med(p[name], "inproc_s") for name in ("classic", "extract", "head_cold", "warm")}
    out["fixed_parts_s"] = {  # the fixed cost split: before the first batch, after the last (newer results only)
        name: {"to_first_batch_s": med(rec, "to_first_batch_s"), "after_last_batch_s": med(rec, "after_last_batch_s")}
        for name, rec in p.items() if "to_first_batch_s" in rec}
    ext, head = record["scaling"]["extract"], record["scaling"]["head"]
    out["scaling"] = {
        "extract": [{"factor": pt["factor"], "images": pt["images"],
                     "wall_s": med(pt), "inproc_s": med(pt, "inproc_s"),
                     "growth_wall": med(pt) / med(ext[0]),
                     "growth_inproc": med(pt, "inproc_s") / med(ext[0], "inproc_s"),
                     "expected": pt["factor"] / ext[0]["factor"]} for pt in ext],
        "head": [{"epochs": pt["epochs"], "wall_s": med(pt), "compile_s": med(pt, "compile_s"),
                  "train_s": med(pt, "train_s"), "growth_wall": med(pt) / med(head[0]),
                  "growth_train": med(pt, "train_s") / med(head[0], "train_s"),
                  "expected": pt["epochs"] / head[0]["epochs"]} for pt in head],
    }
    return out



def load_result(path: str | Path) -> dict:
    """A result JSON written by `featcache bench`; UserError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read {path} as JSON ({exc}); pass files written by featcache bench.") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a featcache bench result (schema {SCHEMA}).")
    return doc
