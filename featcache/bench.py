"""`featcache bench`: the cached frozen mode against the classic loops, each path in its own process.

Per model, on the same images and settings (E epochs, batch size, crop size, weights, device):

1. classic     `featcache finetune --freeze-backbone`: every image through the backbone every epoch
2. cold        `featcache extract` into an empty cache folder, then `featcache head-train` on it
3. warm        `featcache head-train` alone on that cache: what every further experiment costs
4. torch_head  the same head trained by a plain PyTorch loop on the cached features (a worker here);
   jax_head   beside it, head-train's compiled program timed the same way: warmed up, median of 3
5. forward     the backbone over in-memory tensors: the floor for extraction on this machine (a worker)
6. finetune    `featcache finetune`, the whole network (skipped with --no-finetune)

Every path runs in a fresh Python process (`python -m featcache ...` or `python -m featcache.bench
WORKER`), so it pays its own start-up and imports as a user does: the wall time of that process is
the path's time. What the process measures itself (extract's images/s, head-train's load/compile/
train seconds, the loops' epoch times) is kept beside it as the in-process time. Repeats are
interleaved (every path once, then every path again), so drift on a shared machine hits all paths
alike; each time is reported as median, min and max, and ratios are ratios of medians.

N = images over train + val + test, E = epochs. Theoretical classic / cached-cold ratio, counting
backbone forward passes: (E * (N_train + N_val) + N_test) / N.

Nothing heavy is imported at module level (the CLI imports this module inside its command).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from featcache.config import BenchConfig
from featcache.environment import library_versions
from featcache.errors import UserError

SCHEMA = "featcache-bench/1"
RESULT_MARK = "BENCH-RESULT "  # a worker's last stdout line: this mark, then one JSON object
QUICK_DEMO_PER_CLASS = (8, 4, 4)  # --quick: 32 images (train, val, test per class)
QUICK_DEMO_SIZE = 32
HEAD_RUNS = 3  # path 4 times each head (PyTorch loop, JAX program) this many times in its process
GOAL_FRACTION_OF_THEORY = 0.85  # issue 6: classic / cached-cold >= 85 % of the theoretical ratio
GOAL_TORCH_OVER_JAX = 30.0  # issue 6: warm head-train >= 30x faster than the PyTorch head

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

Log = Callable[[str], None]


# --------------------------------------------------------------------------- settings


def effective_config(config: BenchConfig) -> BenchConfig:
    """`config` with --quick applied: tiny images, 2 epochs, 1 repeat, two-point scaling, no full fine-tune."""
    if not config.quick:
        return config
    return dataclasses.replace(config, epochs=2, image_size=config.image_size or QUICK_DEMO_SIZE, repeat=1,
                               finetune=False, scale_factors=(1, 2), scale_epochs=(2, 8))


def check_config(config: BenchConfig) -> None:
    """Raise UserError for settings the benchmark cannot run."""
    from featcache.backbones import BACKBONES

    unknown = [m for m in config.models if m not in BACKBONES]
    if unknown or not config.models:
        raise UserError(f"Unknown model(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from: {', '.join(sorted(BACKBONES))}.")
    for name in ("epochs", "batch_size", "repeat"):
        if getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1.")
    if any(f < 1 for f in config.scale_factors) or any(e < 1 for e in config.scale_epochs):
        raise UserError("--scale-factors and --scale-epochs must be positive integers.")
    if config.device not in ("cpu", "cuda"):
        raise UserError(f"Unknown device {config.device!r}; use --device cpu or cuda.")
    if config.device == "cuda":
        from featcache.backbones import pick_device

        pick_device("cuda")  # UserError when this machine has no CUDA device


# --------------------------------------------------------------------------- the run


def run_bench(config: BenchConfig, *, command: str = "", log: Log = print) -> tuple[dict, Path]:
    """Run every path for every model, `repeat` times, and write the result JSON under config.out.

    Args:
        config: the settings (see BenchConfig); --quick is applied here.
        command: the command line, recorded in the JSON.
        log: one line per finished process.

    Returns:
        (the result document, the path of its JSON file).
    """
    config = effective_config(config)
    check_config(config)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load_before = _loadavg()
    with _work_dir(config.work_dir) as work:
        root = _prepare_data(config, work)
        counts = _split_counts(root)
        scaled = {f: (root if f == 1 else _replicate(root, work / "data" / f"x{f}", f)) for f in config.scale_factors}
        for stale in ("cache", "runs"):  # a kept --work-dir must not turn a cold extraction into a cache hit
            shutil.rmtree(work / stale, ignore_errors=True)
        runner = _Runner(config=config, work=work, log=log)
        models = {m: _empty_model_record(config, counts) for m in config.models}
        for r in range(config.repeat):
            for model in config.models:
                runner.paths(model, r, root, counts, models[model])
                runner.scaling(model, r, scaled, counts, models[model])
    doc = {
        "schema": SCHEMA,
        "created": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": command,
        "settings": {**dataclasses.asdict(config), "image_size_note":
                     "None = each model's native crop (224)" if config.image_size is None else ""},
        "machine": _machine(config.device, load_before),
        "versions": library_versions(),
        "data": {"name": config.data, "counts": counts, "n": sum(counts.values()),
                 "scale_images": {str(f): f * sum(counts.values()) for f in config.scale_factors}},
        "models": models,
    }
    for record in models.values():
        record["summary"] = summarize_model(record, counts=counts, epochs=config.epochs)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if config.quick else ''}.json"
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc, path


def _empty_model_record(config: BenchConfig, counts: dict) -> dict:
    paths = ["classic", "extract", "head_cold", "cold", "warm", "torch_head", "jax_head", "forward"]
    paths += ["finetune"] if config.finetune else []
    return {
        "paths": {p: {} for p in paths},
        "scaling": {
            "extract": [{"factor": f, "images": f * sum(counts.values())} for f in config.scale_factors],
            "head": [{"epochs": e} for e in config.scale_epochs],
        },
        "workers": {},
    }


def _append(record: dict, **values) -> None:
    for key, value in values.items():
        record.setdefault(key, []).append(value)


class _Runner:
    """Starts the processes of one benchmark and records their times."""

    def __init__(self, *, config: BenchConfig, work: Path, log: Log):
        self.config, self.work, self.log = config, work, log
        self.env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[1])  # the same featcache as this process
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        if config.device == "cpu":
            self.env["JAX_PLATFORMS"] = "cpu"  # the head on the same device as the torch paths

    # ---- processes

    def _run(self, args: Sequence[str], what: str) -> tuple[float, str]:
        """Run `python ARGS` to completion; (wall seconds, stdout). UserError if it fails."""
        cmd = [sys.executable, *map(str, args)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.work)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
            raise UserError(f"{what} failed (exit {proc.returncode}): {lines[-1]} -- command: "
                            f"{shlex.join(cmd)}", exit_code=1 if proc.returncode < 0 else proc.returncode)
        self.log(f"  {what}: {wall:.2f} s")
        return wall, proc.stdout

    def _cli(self, *args) -> list[str]:
        return ["-m", "featcache", *args]

    def _backbone_args(self, model: str) -> list[str]:
        c = self.config
        args = ["--model", model, "--weights", c.weights]
        return args + (["--image-size", str(c.image_size)] if c.image_size else [])

    def _finetune(self, model: str, root: Path, runs_dir: Path, *, frozen: bool, what: str) -> dict:
        c = self.config
        args = self._cli("finetune", *self._backbone_args(model), "--data", root, "--epochs", c.epochs,
                         "--batch-size", c.batch_size, "--device", c.device, "--runs-dir", runs_dir, "--quiet",
                         *(["--freeze-backbone"] if frozen else []))
        wall, _ = self._run(args, what)
        run = _read_run(runs_dir)
        return {"wall_s": wall, "inproc_s": run["summary"]["training_time"], "epochs_run": len(run["history"]),
                "diverged": bool(run["diverged"])}

    def _extract(self, model: str, root: Path, cache_dir: Path, what: str) -> tuple[dict, Path]:
        c = self.config
        args = self._cli("extract", *self._backbone_args(model), "--data", root, "--batch-size", c.batch_size,
                         "--device", c.device, "--cache-dir", cache_dir, "--quiet")
        wall, out = self._run(args, what)
        match = re.search(r": (\d+) images in [\d.]+ s \(([\d.]+) img/s\)", out)
        if not match:
            raise RuntimeError(f"cannot read the images/s from extract's output: {out!r}")
        images, rate = int(match.group(1)), float(match.group(2))
        (cache_file,) = cache_dir.rglob("*.h5")
        return {"wall_s": wall, "inproc_s": images / rate, "images": images}, cache_file

    def _head(self, cache_file: Path, runs_dir: Path, epochs: int, what: str) -> dict:
        args = self._cli("head-train", "--cache", cache_file, "--epochs", epochs,
                         "--batch-size", self.config.batch_size, "--runs-dir", runs_dir)
        wall, _ = self._run(args, what)
        t = _read_run(runs_dir)["timings"]
        return {"wall_s": wall, "load_s": t["load_s"], "compile_s": t["compile_s"], "train_s": t["train_s"],
                "inproc_s": t["load_s"] + t["compile_s"] + t["train_s"]}

    def _worker(self, name: str, what: str, **options) -> dict:
        args = ["-m", "featcache.bench", name]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", value]
        wall, out = self._run(args, what)
        line = next(ln for ln in reversed(out.splitlines()) if ln.startswith(RESULT_MARK))
        return {"wall_s": wall, **json.loads(line[len(RESULT_MARK):])}

    # ---- one repeat of one model

    def paths(self, model: str, r: int, root: Path, counts: dict, record: dict) -> None:
        """Paths 1-6 once, in this order, appending one value per repeat."""
        c, p, tag = self.config, record["paths"], f"{model}-r{r}"
        self.log(f"{model}, repeat {r + 1}/{c.repeat}:")
        _append(p["classic"], **self._finetune(model, root, self.work / "runs" / f"{tag}-classic",
                                               frozen=True, what=f"1 classic frozen, {c.epochs} epochs"))
        extract, cache_file = self._extract(model, root, self.work / "cache" / f"{tag}-x1",
                                            "2 extract (empty cache)")
        _append(p["extract"], wall_s=extract["wall_s"], inproc_s=extract["inproc_s"])
        head = self._head(cache_file, self.work / "runs" / f"{tag}-head-cold", c.epochs, "2 head-train")
        _append(p["head_cold"], **head)
        _append(p["cold"], wall_s=extract["wall_s"] + head["wall_s"],
                inproc_s=extract["inproc_s"] + head["inproc_s"])
        _append(p["warm"], **self._head(cache_file, self.work / "runs" / f"{tag}-head-warm", c.epochs,
                                        "3 head-train (warm cache)"))
        torch_head = self._worker("torch-head", "4 PyTorch head on the cache", cache=cache_file, epochs=c.epochs,
                                  batch_size=c.batch_size, device=c.device)
        _append(p["torch_head"], wall_s=torch_head["wall_s"], inproc_s=torch_head["seconds"],
                import_s=torch_head["import_s"], load_s=torch_head["load_s"], runs_s=torch_head["runs_s"])
        jax_head = self._worker("jax-head", "4 JAX head on the cache, same timing", cache=cache_file,
                                epochs=c.epochs, batch_size=c.batch_size)
        _append(p["jax_head"], wall_s=jax_head["wall_s"], inproc_s=jax_head["seconds"], import_s=jax_head["import_s"],
                load_s=jax_head["load_s"], compile_s=jax_head["compile_s"], first_s=jax_head["first_s"],
                runs_s=jax_head["runs_s"])
        forward = self._worker("forward", "5 forward limit", model=model, weights=c.weights,
                               image_size=c.image_size or 0, batch_size=c.batch_size, device=c.device,
                               counts=",".join(str(counts[s]) for s in ("train", "val", "test")))
        _append(p["forward"], wall_s=forward["wall_s"], inproc_s=forward["seconds"],
                import_s=forward["import_s"], build_s=forward["build_s"])
        record["workers"] = {"torch_threads": forward["torch_threads"],
                             "torch_interop_threads": forward["torch_interop_threads"],
                             "crop": forward["crop"], "feature_dim": torch_head["feature_dim"]}
        if "finetune" in p:
            _append(p["finetune"], **self._finetune(model, root, self.work / "runs" / f"{tag}-finetune",
                                                    frozen=False, what=f"6 full fine-tune, {c.epochs} epochs"))
        shutil.rmtree(self.work / "runs", ignore_errors=True)  # checkpoints: ~100 MB per loop run

    def scaling(self, model: str, r: int, scaled: dict[int, Path], counts: dict, record: dict) -> None:
        """Extraction at each image factor and head-train at each epoch count (points equal to a path reuse it)."""
        c, p, tag = self.config, record["paths"], f"{model}-r{r}"
        for point in record["scaling"]["extract"]:
            f = point["factor"]
            if f == 1:
                value = {k: p["extract"][k][-1] for k in ("wall_s", "inproc_s")}
            else:
                value, _ = self._extract(model, scaled[f], self.work / "cache" / f"{tag}-x{f}",
                                         f"scaling: extract {f}x images")
                value.pop("images")
            _append(point, **value)
        cache_file = next((self.work / "cache" / f"{tag}-x1").rglob("*.h5"))
        for point in record["scaling"]["head"]:
            e = point["epochs"]
            if e == c.epochs:
                value = {k: v[-1] for k, v in p["warm"].items()}
            else:
                value = self._head(cache_file, self.work / "runs" / f"{tag}-head-e{e}", e,
                                   f"scaling: head-train {e} epochs")
            _append(point, **value)
        shutil.rmtree(self.work / "runs", ignore_errors=True)
        shutil.rmtree(self.work / "cache", ignore_errors=True)


def _read_run(runs_dir: Path) -> dict:
    """metrics.json of the one run written under `runs_dir`."""
    (metrics_file,) = Path(runs_dir).glob("*/metrics.json")
    return json.loads(metrics_file.read_text())


@contextmanager
def _work_dir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        yield Path(tmp)


def _prepare_data(config: BenchConfig, work: Path) -> Path:
    """The dataset folder every path reads: the demo rendered into the work folder, or --data DIR."""
    from featcache import demo

    if config.data in ("demo", "demo3"):
        kwargs = {"n_per_class": QUICK_DEMO_PER_CLASS, "image_size": QUICK_DEMO_SIZE} if config.quick else {}
        return demo.ensure_demo_dataset(work / "data", num_classes=2 if config.data == "demo" else 3, **kwargs)
    from featcache.datasets import resolve_data_root

    return resolve_data_root(config.data).resolve()


def _split_counts(root: Path) -> dict[str, int]:
    from featcache.datasets import scan_dataset

    index = scan_dataset(root)
    counts = {s: len(index.splits.get(s, [])) for s in ("train", "val", "test")}
    empty = [s for s, n in counts.items() if n == 0]
    if empty:
        raise UserError(f"The {', '.join(empty)} split of {root} is empty; the benchmark needs all three.")
    return counts


def _replicate(root: Path, dest: Path, factor: int) -> Path:
    """A copy of the dataset at `root` with every image `factor` times (hard links when possible)."""
    from featcache.datasets import scan_dataset

    index = scan_dataset(root)
    for samples in index.splits.values():
        for sample in samples:
            src = index.root / sample.path
            rel = Path(sample.path)
            for k in range(factor):
                target = dest / rel.parent / f"{rel.stem}__x{k}{rel.suffix}"
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, target)
                except OSError:
                    shutil.copy2(src, target)
    return dest


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine(device: str, load_before) -> dict:
    return {
        "host": platform.node(), "platform": platform.platform(), "processor": platform.processor() or
        platform.machine(), "cpu_count": os.cpu_count(), "device": device,
        "load_avg_before": load_before, "load_avg_after": _loadavg(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS") if k in os.environ},
    }


# --------------------------------------------------------------------------- figures from the times


def stats(values: Sequence[float]) -> dict:
    """median, min, max of per-repeat values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _med(record: dict, key: str = "wall_s") -> float:
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
            entry["images_per_s"] = images[name] / _med(rec, "inproc_s")
        if "epochs_run" in rec:
            entry["complete"] = all(e == epochs for e in rec["epochs_run"]) and not any(rec["diverged"])
        out["paths"][name] = entry
    theory = theoretical_ratio(counts, epochs)
    ratios = {
        "theoretical_classic_over_cold": theory,
        "classic_over_cold": _med(p["classic"]) / _med(p["cold"]),
        "classic_over_cold_inproc": _med(p["classic"], "inproc_s") / _med(p["cold"], "inproc_s"),
        "classic_over_warm": _med(p["classic"]) / _med(p["warm"]),
        "torch_head_over_jax_warm": _med(p["torch_head"], "inproc_s") / _med(p["jax_head"], "inproc_s"),
        "torch_head_over_jax_train": _med(p["torch_head"], "inproc_s") / _med(p["warm"], "train_s"),
        "torch_head_over_jax_compile_train": _med(p["torch_head"], "inproc_s") / (
            _med(p["warm"], "compile_s") + _med(p["warm"], "train_s")),
        "extract_over_forward": _med(p["forward"], "inproc_s") / _med(p["extract"], "inproc_s"),
    }
    ratios["classic_over_cold_of_theory"] = ratios["classic_over_cold"] / theory
    ratios["classic_over_cold_inproc_of_theory"] = ratios["classic_over_cold_inproc"] / theory
    if "finetune" in p:
        ratios["finetune_over_cold"] = _med(p["finetune"]) / _med(p["cold"])
    out["ratios"] = ratios
    out["fixed_s"] = {  # wall - in-process: start-up, imports, dataset scan, model build, run directory
        name: _med(p[name]) - _med(p[name], "inproc_s") for name in ("classic", "extract", "head_cold", "warm")}
    ext, head = record["scaling"]["extract"], record["scaling"]["head"]
    out["scaling"] = {
        "extract": [{"factor": pt["factor"], "images": pt["images"],
                     "wall_s": _med(pt), "inproc_s": _med(pt, "inproc_s"),
                     "growth_wall": _med(pt) / _med(ext[0]),
                     "growth_inproc": _med(pt, "inproc_s") / _med(ext[0], "inproc_s"),
                     "expected": pt["factor"] / ext[0]["factor"]} for pt in ext],
        "head": [{"epochs": pt["epochs"], "wall_s": _med(pt), "compile_s": _med(pt, "compile_s"),
                  "train_s": _med(pt, "train_s"), "growth_wall": _med(pt) / _med(head[0]),
                  "growth_train": _med(pt, "train_s") / _med(head[0], "train_s"),
                  "expected": pt["epochs"] / head[0]["epochs"]} for pt in head],
    }
    return out


# --------------------------------------------------------------------------- tables


def _console(file=None):
    from rich.console import Console

    return Console(width=132, record=True, file=file)


def render(doc: dict) -> str:
    """The benchmark tables of one result document, as text."""
    import io

    from rich.table import Table

    s = doc["settings"]
    counts = doc["data"]["counts"]
    console = _console(io.StringIO())
    console.print(_header(doc))
    times = Table(title=f"featcache bench: {s['epochs']} epochs, batch {s['batch_size']}, "
                        f"{'native crop' if not s['image_size'] else str(s['image_size']) + ' px'}, "
                        f"weights {s['weights']}, {s['device']}, median of {s['repeat']} "
                        f"(wall = whole process, start-up included)")
    for col in ("model", "path", "wall s", "min-max", "in-process s", "img/s", "classic ÷ path"):
        times.add_column(col, justify="left" if col in ("model", "path") else "right")
    for model, record in doc["models"].items():
        summ = record["summary"]
        classic = _med(record["paths"]["classic"])
        for name, label in PATH_LABELS.items():
            if name not in record["paths"]:
                continue
            rec, entry = record["paths"][name], summ["paths"][name]
            inproc = _inproc_text(name, rec)
            rate = f"{entry['images_per_s']:.1f}" if "images_per_s" in entry else "-"
            note = "" if entry.get("complete", True) else " (stopped early!)"
            ratio = f"{classic / _med(rec):.2f}x" if not label.startswith(" ") else ""
            times.add_row(model, label + note, f"{_med(rec):.2f}", f"{min(rec['wall_s']):.2f}-{max(rec['wall_s']):.2f}",
                          inproc, rate, ratio)
        times.add_section()
    console.print(times)

    ratios = Table(title="Ratios (of medians)")
    for col in ("model", "ratio", "value", "reference", "verdict"):
        ratios.add_column(col, justify="left" if col in ("model", "ratio", "reference") else "right")
    e = s["epochs"]
    for model, record in doc["models"].items():
        r = record["summary"]["ratios"]
        theory = r["theoretical_classic_over_cold"]
        ratios.add_row(model, "theoretical classic ÷ cached-cold", f"{theory:.2f}x",
                       f"({e}·({counts['train']}+{counts['val']}) + {counts['test']}) / {doc['data']['n']}", "")
        ratios.add_row(model, "classic ÷ cached-cold (wall)", f"{r['classic_over_cold']:.2f}x",
                       f"{100 * r['classic_over_cold_of_theory']:.0f} % of theoretical (goal ≥ 85 %)",
                       _verdict(r["classic_over_cold_of_theory"] >= GOAL_FRACTION_OF_THEORY))
        ratios.add_row(model, "classic ÷ cached-cold (in-process)", f"{r['classic_over_cold_inproc']:.2f}x",
                       f"{100 * r['classic_over_cold_inproc_of_theory']:.0f} % of theoretical", "")
        if "torch_head_over_jax_warm" in r:  # older result files lack it
            ratios.add_row(model, "PyTorch head ÷ JAX head (both warm, median of 3)",
                           f"{r['torch_head_over_jax_warm']:.1f}x", "goal ≥ 30x",
                           _verdict(r["torch_head_over_jax_warm"] >= GOAL_TORCH_OVER_JAX))
        ratios.add_row(model, "PyTorch head ÷ head-train's program (1st run)", f"{r['torch_head_over_jax_train']:.1f}x",
                       "train_s of path 3", "")
        ratios.add_row(model, "PyTorch head ÷ JAX head (compile + program)",
                       f"{r['torch_head_over_jax_compile_train']:.2f}x", "JIT compile counted (path 3)", "")
        ratios.add_row(model, "extraction ÷ forward limit (images/s)", f"{100 * r['extract_over_forward']:.0f} %",
                       "in-process", "")
        ratios.add_row(model, "classic ÷ cached-warm (wall)", f"{r['classic_over_warm']:.1f}x", "", "")
        if "finetune_over_cold" in r:
            ratios.add_row(model, "full fine-tune ÷ cached-cold (wall)", f"{r['finetune_over_cold']:.1f}x", "", "")
        fixed, fw = record["summary"]["fixed_s"], record["paths"]["forward"]
        ratios.add_row(model, "fixed cost in cached-cold (wall - in-process)",
                       f"{fixed['extract'] + fixed['head_cold']:.1f} s",
                       f"extract {fixed['extract']:.1f} s (torch+torchvision import {_med(fw, 'import_s'):.1f} s, "
                       f"model build {_med(fw, 'build_s'):.1f} s) + head-train {fixed['head_cold']:.1f} s; "
                       f"classic: {fixed['classic']:.1f} s", "")
        ratios.add_section()
    console.print(ratios)

    scaling = Table(title="Scaling of the cached path (growth = time / time at the first point)")
    for col in ("model", "step", "size", "wall s", "in-process s", "growth (wall)", "growth (in-process)", "ideal"):
        scaling.add_column(col, justify="left" if col in ("model", "step") else "right")
    for model, record in doc["models"].items():
        sc = record["summary"]["scaling"]
        for pt in sc["extract"]:
            scaling.add_row(model, "extract", f"{pt['factor']}x = {pt['images']} images", f"{pt['wall_s']:.2f}",
                            f"{pt['inproc_s']:.2f}", f"{pt['growth_wall']:.2f}x", f"{pt['growth_inproc']:.2f}x",
                            f"{pt['expected']:.2f}x")
        for pt in sc["head"]:
            scaling.add_row(model, "head-train", f"{pt['epochs']} epochs", f"{pt['wall_s']:.2f}",
                            f"compile {pt['compile_s']:.2f} + train {pt['train_s']:.3f}", f"{pt['growth_wall']:.2f}x",
                            f"{pt['growth_train']:.2f}x (train)", f"{pt['expected']:.2f}x")
        scaling.add_section()
    console.print(scaling)
    return console.export_text()


def _inproc_text(name: str, rec: dict) -> str:
    if name == "torch_head":
        return f"{_med(rec, 'inproc_s'):.4f}"
    if name == "jax_head":
        return f"{_med(rec, 'inproc_s'):.4f} (compile {_med(rec, 'compile_s'):.2f})"
    if name in ("head_cold", "warm"):
        return (f"load {_med(rec, 'load_s'):.2f} + compile {_med(rec, 'compile_s'):.2f} "
                f"+ train {_med(rec, 'train_s'):.3f}")
    return f"{_med(rec, 'inproc_s'):.2f}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _header(doc: dict) -> str:
    m, v, d = doc["machine"], doc["versions"], doc["data"]
    threads = {r["workers"].get("torch_threads") for r in doc["models"].values()}
    return (f"{doc['created']}  {m['processor']}, {m['cpu_count']} CPUs, device {m['device']}, torch threads "
            f"{', '.join(str(t) for t in sorted(threads, key=str))}, load avg before {m['load_avg_before']} after "
            f"{m['load_avg_after']}\n"
            f"python {v.get('python')}, torch {v.get('torch')}, torchvision {v.get('torchvision')}, "
            f"jax {v.get('jax')}, "
            f"flax {v.get('flax')}, optax {v.get('optax')}\n"
            f"data {d['name']}: train {d['counts']['train']}, val {d['counts']['val']}, test {d['counts']['test']} "
            f"(N = {d['n']})")


def compare(a: dict, b: dict, *, sources: tuple[str, str] = ("", "")) -> str:
    """Two result documents (A, B) side by side: median wall time of every path and the ratios, and B / A."""
    import io

    from rich.table import Table

    names = ("A", "B")
    console = _console(io.StringIO())
    for name, doc, source in zip(names, (a, b), sources):
        console.print(f"{name} = {source or '(result)'}: {doc['command'] or '(no command recorded)'}", highlight=False)
        console.print(_header(doc), highlight=False)
    table = Table(title=f"{names[1]} against {names[0]} (medians)")
    for col in ("model", "path / ratio", names[0], names[1], f"{names[1]} ÷ {names[0]}"):
        table.add_column(col, justify="left" if col in ("model", "path / ratio") else "right")
    for model in [m for m in a["models"] if m in b["models"]]:
        ra, rb = a["models"][model], b["models"][model]
        for name, label in PATH_LABELS.items():
            if name in ra["paths"] and name in rb["paths"]:
                wa, wb = _med(ra["paths"][name]), _med(rb["paths"][name])
                table.add_row(model, label.strip() + " (wall s)", f"{wa:.2f}", f"{wb:.2f}", f"{wb / wa:.2f}")
        for key in ra["summary"]["ratios"]:
            if key in rb["summary"]["ratios"]:
                xa, xb = ra["summary"]["ratios"][key], rb["summary"]["ratios"][key]
                table.add_row(model, key, f"{xa:.3f}", f"{xb:.3f}", f"{xb / xa:.2f}")
        table.add_section()
    console.print(table)
    return console.export_text()


def load_result(path: str | Path) -> dict:
    """A result JSON written by `featcache bench`; UserError if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot read {path} as JSON ({exc}); pass files written by featcache bench.") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a featcache bench result (schema {SCHEMA}).")
    return doc


# --------------------------------------------------------------------------- workers (run in their own process)


def torch_head_loop(train, val, *, num_classes: int, config, device: str = "cpu") -> float:
    """Seconds of a plain PyTorch loop training the linear head on in-memory features.

    The loop as a tutorial writes it, on the same plan as head-train (init, batch order, lr per
    epoch): per batch zero_grad, forward, loss, backward, step, loss.item(); per epoch one val pass;
    metrics from featcache.metrics. train, val: (features (N, D) float32, labels (N,) int64).
    """
    import torch

    from featcache import metrics
    from featcache.plan import make_plan, num_outputs_for

    dev = torch.device(device)
    x, y = torch.from_numpy(train[0]).to(dev), torch.from_numpy(train[1]).to(dev)
    xv, yv = torch.from_numpy(val[0]).to(dev), val[1]
    k = num_outputs_for(num_classes)
    plan = make_plan(n_train=len(y), feature_dim=x.shape[1], num_outputs=k, config=config)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    lin = torch.nn.Linear(x.shape[1], k).to(dev)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(plan.weight))
        lin.bias.copy_(torch.tensor(plan.bias))
    opt = torch.optim.SGD(lin.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                          weight_decay=config.weight_decay)

    def loss_fn(logits, labels):
        if k == 1:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        return torch.nn.functional.cross_entropy(logits, labels)

    for epoch in range(plan.epochs):
        for group in opt.param_groups:
            group["lr"] = float(plan.lrs[epoch])
        loss_sums, correct, sizes = [], [], []
        for rows in plan.batches(epoch):
            rows = torch.from_numpy(rows).to(dev)
            xb, yb = x[rows], y[rows]
            opt.zero_grad()
            logits = lin(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            loss_sums.append(loss.item() * len(rows))
            pred = metrics.predict(logits.detach().cpu().numpy(), num_classes)
            correct.append(int((pred == yb.cpu().numpy()).sum()))
            sizes.append(len(rows))
        metrics.epoch_train_metrics(loss_sums, correct, sizes)
        with torch.no_grad():
            metrics.evaluate(lin(xv).cpu().numpy(), yv, num_classes)
    sync()
    return time.perf_counter() - t0


def _torch_head_worker(cache: str, epochs: int, batch_size: int, device: str) -> dict:
    """Path 4: load the cached train/val features, warm up one epoch, time E epochs of torch_head_loop.

    The loop is timed HEAD_RUNS times in this process and the median kept: PyTorch's intra-op
    threads on a small shared CPU stall erratically, and one such stall should not be the result.
    """
    t0 = time.perf_counter()
    import torch

    import_s = time.perf_counter() - t0
    from featcache.backbones import pick_device
    from featcache.cache import load_features
    from featcache.config import TrainConfig

    pick_device(device)
    t0 = time.perf_counter()
    (xt, yt, meta), (xv, yv, _) = load_features(cache, "train"), load_features(cache, "val")
    train, val = (xt.astype("float32"), yt), (xv.astype("float32"), yv)
    load_s = time.perf_counter() - t0
    num_classes = len(meta["class_names"])
    config = TrainConfig(epochs=epochs, batch_size=batch_size)
    warmup_s = torch_head_loop(train, val, num_classes=num_classes, config=dataclasses.replace(config, epochs=1),
                               device=device)
    runs = [torch_head_loop(train, val, num_classes=num_classes, config=config, device=device)
            for _ in range(HEAD_RUNS)]
    return {"seconds": statistics.median(runs), "runs_s": runs, "warmup_s": warmup_s, "import_s": import_s,
            "load_s": load_s,
            "feature_dim": int(xt.shape[1]), "torch_threads": torch.get_num_threads()}


def jax_head_program(train, val, *, num_classes: int, config, runs: int) -> dict:
    """Seconds of head-train's compiled program (featcache.head.train_program) on in-memory features.

    Returns compile_s (lower + compile), first_s (the first call) and runs_s (`runs` further calls,
    inputs already on the device). train, val: (features (N, D) float32, labels (N,) int64).
    """
    import jax
    import numpy as np

    from featcache.head import padded_batches, params_from_linear, train_program
    from featcache.plan import make_plan, num_outputs_for

    k = num_outputs_for(num_classes)
    plan = make_plan(n_train=len(train[1]), feature_dim=train[0].shape[1], num_outputs=k, config=config)
    idx, mask = padded_batches(plan)
    args = jax.device_put((params_from_linear(plan.weight, plan.bias), train[0], train[1].astype(np.int32),
                           val[0], idx, mask, plan.lrs.astype(np.float32)))
    t0 = time.perf_counter()
    compiled = train_program(num_outputs=k, config=config).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(runs + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "first_s": times[0], "runs_s": times[1:]}


def _jax_head_worker(cache: str, epochs: int, batch_size: int) -> dict:
    """Path 4's JAX side: head-train's program on the cached features, compiled, called once, timed HEAD_RUNS times."""
    t0 = time.perf_counter()
    import jax  # noqa: F401

    import_s = time.perf_counter() - t0
    from featcache.cache import load_features
    from featcache.config import TrainConfig

    t0 = time.perf_counter()
    (xt, yt, meta), (xv, yv, _) = load_features(cache, "train"), load_features(cache, "val")
    load_s = time.perf_counter() - t0
    times = jax_head_program((xt.astype("float32"), yt), (xv.astype("float32"), yv),
                             num_classes=len(meta["class_names"]),
                             config=TrainConfig(epochs=epochs, batch_size=batch_size), runs=HEAD_RUNS)
    return {"seconds": statistics.median(times["runs_s"]), **times, "import_s": import_s, "load_s": load_s}


def _forward_worker(model: str, weights: str, image_size: int, batch_size: int, device: str,
                    counts: str) -> dict:
    """Path 5: the backbone over in-memory tensors in extract's batches (per split, the short rest last)."""
    t0 = time.perf_counter()
    import torch
    import torchvision  # noqa: F401  (counted in import_s, as extract pays it)

    import_s = time.perf_counter() - t0
    from featcache.backbones import build_backbone, pick_device

    dev = pick_device(device)
    t0 = time.perf_counter()
    backbone = build_backbone(model, weights=weights, image_size=image_size or None)
    net = backbone.net.to(dev).eval()
    build_s = time.perf_counter() - t0
    crop = int(backbone.transform_desc["crop"])
    sizes = [min(batch_size, n - a) for n in map(int, counts.split(",")) for a in range(0, n, batch_size)]
    inputs = {b: torch.randn(b, 3, crop, crop, device=dev) for b in set(sizes)}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(2):  # warm-up: allocator, kernel selection
            net(inputs[sizes[0]])
        sync()
        t0 = time.perf_counter()
        for b in sizes:
            net(inputs[b]).float().cpu().numpy()  # the hand-off to numpy that extract does
        sync()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "images": sum(sizes), "import_s": import_s, "build_s": build_s, "crop": crop,
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}


def _worker_main(argv: Sequence[str]) -> None:
    """`python -m featcache.bench forward|torch-head|jax-head --option value ...`: print one RESULT_MARK line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m featcache.bench")
    sub = parser.add_subparsers(dest="worker", required=True)
    fw = sub.add_parser("forward")
    for name, kind in (("model", str), ("weights", str), ("image-size", int), ("batch-size", int),
                       ("device", str), ("counts", str)):
        fw.add_argument(f"--{name}", type=kind, required=True)
    th = sub.add_parser("torch-head")
    for name, kind in (("cache", str), ("epochs", int), ("batch-size", int), ("device", str)):
        th.add_argument(f"--{name}", type=kind, required=True)
    jh = sub.add_parser("jax-head")
    for name, kind in (("cache", str), ("epochs", int), ("batch-size", int)):
        jh.add_argument(f"--{name}", type=kind, required=True)
    args = vars(parser.parse_args(argv))
    worker = {"forward": _forward_worker, "torch-head": _torch_head_worker,
              "jax-head": _jax_head_worker}[args.pop("worker")]
    try:
        result = worker(**args)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
