"""`featcache bench`'s run: the settings, the data, and the processes of every path, timed; writes the result JSON.

See featcache/bench/__init__.py for the paths and how they are timed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from featcache.bench.results import SCHEMA, summarize_model
from featcache.bench.worker import RESULT_MARK
from featcache.config import BenchConfig
from featcache.environment import library_versions
from featcache.errors import UserError

QUICK_DEMO_PER_CLASS = (8, 4, 4)  # --quick: 32 images (train, val, test per class)
QUICK_DEMO_SIZE = 32

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
    from featcache.backbones import check_model

    if not config.models:
        raise UserError("No model to benchmark; pass --models with one or more names (featcache models lists them).")
    for model in config.models:
        check_model(model)  # UserError naming an unknown model and close names
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
        package_parent = str(Path(__file__).resolve().parents[2])  # the same featcache as this process
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
        if config.device == "cpu":
            self.env["JAX_PLATFORMS"] = "cpu"  # the head on the same device as the torch paths

    # ---- processes

    def _run(self, args: Sequence[str], what: str) -> tuple[float, str]:
        """Run `python ARGS` to completion; (wall seconds, stdout). UserError if it fails."""
        cmd = [sys.executable, *map(str, args)]
        launched, t0 = time.time(), time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.work)
        wall = time.perf_counter() - t0
        self.span = (launched, launched + wall)  # wall clock of the last process: start and end
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip() or "(no output)").splitlines()
            raise UserError(f"{what} failed (exit {proc.returncode}): {lines[-1]} -- command: "
                            f"{shlex.join(cmd)}", exit_code=1 if proc.returncode < 0 else proc.returncode)
        self.log(f"  {what}: {wall:.2f} s")
        return wall, proc.stdout

    def _fixed(self, first_batch_at: float | None, last_batch_at: float | None) -> dict:
        """The last process's fixed cost: seconds from its start to its first batch and after its last batch."""
        if first_batch_at is None or last_batch_at is None:
            return {}
        launched, ended = self.span
        return {"to_first_batch_s": first_batch_at - launched, "after_last_batch_s": ended - last_batch_at}

    def _cli(self, *args) -> list[str]:
        return ["-m", "featcache", *args]

    def _backbone_args(self, model: str) -> list[str]:
        c = self.config
        args = ["--model", model, "--weights", c.weights, "--precision", c.precision]
        return args + (["--image-size", str(c.image_size)] if c.image_size else [])

    def _finetune(self, model: str, root: Path, runs_dir: Path, *, frozen: bool, what: str) -> dict:
        c = self.config
        args = self._cli("finetune", *self._backbone_args(model), "--data", root, "--epochs", c.epochs,
                         "--batch-size", c.batch_size, "--device", c.device, "--runs-dir", runs_dir, "--quiet",
                         *(["--freeze-backbone"] if frozen else []))
        wall, _ = self._run(args, what)
        run = _read_run(runs_dir)
        t = run["timings"]
        return {"wall_s": wall, "inproc_s": run["summary"]["training_time"], "epochs_run": len(run["history"]),
                "diverged": bool(run["diverged"]), **self._fixed(t.get("first_batch_at"), t.get("last_batch_at"))}

    def _extract(self, model: str, root: Path, cache_dir: Path, what: str) -> tuple[dict, Path]:
        c = self.config
        args = self._cli("extract", *self._backbone_args(model), "--data", root, "--batch-size", c.batch_size,
                         "--device", c.device, "--cache-dir", cache_dir, "--quiet")
        from featcache.cache import read_meta

        wall, _ = self._run(args, what)
        (cache_file,) = cache_dir.rglob("*.h5")
        measured = read_meta(cache_file)["extraction"]  # what the extraction measured itself
        return {"wall_s": wall, "inproc_s": measured["seconds"], "images": measured["images"],
                **self._fixed(measured.get("first_batch_at"), measured.get("last_batch_at"))}, cache_file

    def _head(self, cache_file: Path, runs_dir: Path, epochs: int, what: str) -> dict:
        args = self._cli("head-train", "--cache", cache_file, "--epochs", epochs,
                         "--batch-size", self.config.batch_size, "--runs-dir", runs_dir)
        wall, _ = self._run(args, what)
        t = _read_run(runs_dir)["timings"]
        return {"wall_s": wall, "load_s": t["load_s"], "compile_s": t["compile_s"], "train_s": t["train_s"],
                "inproc_s": t["load_s"] + t["compile_s"] + t["train_s"],
                **self._fixed(t.get("first_batch_at"), t.get("last_batch_at"))}

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
        _append(p["extract"], **{k: v for k, v in extract.items() if k != "images"})
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
                               counts=",".join(str(counts[s]) for s in ("train", "val", "test")),
                               precision=c.precision)
        _append(p["forward"], wall_s=forward["wall_s"], inproc_s=forward["seconds"],
                import_s=forward["import_s"], build_s=forward["build_s"],
                **{f"{name}_s": seconds for name, seconds in forward["limits"].items()})
        record["precision"] = forward["precision"]
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
                value = {k: value[k] for k in ("wall_s", "inproc_s")}
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
