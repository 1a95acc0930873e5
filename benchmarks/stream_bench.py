"""head-train streamed from the HDF5 file against head-train in memory, same cache, same results (not a test).

A synthetic cache of --rows x --dim float32 train features (val and test a tenth each, 10 classes) is
trained with `featcache head-train` four ways, each a fresh Python process (imports and start-up
included, as a user runs it), repeats interleaved because this machine is shared:

* in memory         `--no-stream`: every split loaded, the whole training one compiled program;
* streamed          `--stream`: the train rows read from the file a block at a time in the plan's
                    order, blocks of the default size (1024 MiB, or a quarter of the memory available);
* streamed, 64 MiB  `--stream --stream-memory 64`: more, smaller blocks;
* no flag (auto)    head-train's own choice: streamed when the features would not fit in the
                    memory available (MemAvailable, or the room under the cgroup's limit).

Per run: wall seconds, head-train's own load/compile/train seconds (and, streamed, the reader
thread's read_s and the training's wait_s for it), the process's peak RSS, and its exit status.
The results must be equal to the in-memory run's (test accuracy, selected epoch, per-epoch val
accuracy; the largest train-loss difference is printed).

Without --memory-limit-mib the file fits in this machine's page cache: the streamed runs read
from memory, not from the disk. With --memory-limit-mib M every run above goes into a cgroup
(v1 or v2; needs root) whose memory, page cache included, is capped at M MiB, after the file's
cached pages are dropped (posix_fadvise): with a cache larger than M, that is a cache larger than
memory, read from the disk. The in-memory reference for the equality check then runs once
outside the cgroup.

Last, in this process, the reader itself on one block of random rows, page cache warm and cold, in
microseconds per row: os.preadv as streaming uses it (8 reads in flight), os.preadv one at a time,
and h5py's indexing (the fallback for compressed files).

    PYTHONPATH=. python benchmarks/stream_bench.py [--rows 200000] [--dim 512] [--epochs 10] [--repeat 3]
        [--memory-limit-mib M] [--out benchmarks/results/stream-2cores-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "in memory": ["--no-stream"],
    "streamed": ["--stream"],
    "streamed, 64 MiB": ["--stream", "--stream-memory", "64"],
    "no flag (auto)": [],
}
REFERENCE = "in memory, no limit"


def write_cache(path: Path, *, rows: int, dim: int, classes: int = 10, seed: int = 0) -> Path:
    """A complete cache of Gaussian features (class c shifts feature c by 1.5), written in 8192-row pieces."""
    from featcache.cache import CacheWriter, SplitRows

    sizes = {"train": rows, "val": rows // 10, "test": rows // 10}
    rng = np.random.default_rng(seed)
    labels = {s: rng.integers(0, classes, n) for s, n in sizes.items()}
    meta = {"key": "b" * 64, "model": "synthetic", "weights": "none", "weights_sha256": "", "transform": {},
            "class_names": [f"c{i}" for i in range(classes)], "dataset_root": "/bench", "dataset_name": "bench",
            "dataset_fingerprint": "-", "split_rule": {}, "versions": {}, "created": ""}
    splits = {s: SplitRows(labels=y, paths=[f"{s}/{i}" for i in range(len(y))]) for s, y in labels.items()}
    writer = CacheWriter(path, meta=meta, feature_dim=dim, dtype="float32", splits=splits)
    for split, y in labels.items():
        for a in range(0, len(y), 8192):
            part = y[a:a + 8192]
            x = rng.normal(size=(len(part), dim)).astype(np.float32)
            x[np.arange(len(part)), part] += 1.5
            writer.write(split, a, x)
    return writer.finish()


class MemoryCgroup:
    """A memory cgroup capped at `limit_mib` (v1 under /sys/fs/cgroup/memory, else v2); processes join it at start."""

    def __init__(self, limit_mib: int):
        name = f"featcache-stream-bench-{os.getpid()}"
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        try:
            if (v1 / "memory.limit_in_bytes").exists():
                self.dir = v1 / name
                self.dir.mkdir()
                (self.dir / "memory.limit_in_bytes").write_text(str(limit_mib * 2**20))
            else:
                self.dir = v2 / name
                self.dir.mkdir()
                (self.dir / "memory.max").write_text(str(limit_mib * 2**20))
                if (self.dir / "memory.swap.max").exists():
                    (self.dir / "memory.swap.max").write_text("0")
        except OSError as exc:
            raise SystemExit(f"--memory-limit-mib needs a writable memory cgroup (root, cgroup v1 or v2): {exc}")

    def join(self) -> None:  # preexec_fn of the child: before it imports anything
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from featcache.cli import cli
try:
    cli(sys.argv[1:], standalone_mode=False)
finally:
    print("RESULT " + json.dumps({"wall_in_process_s": time.perf_counter() - t0,
                                 "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def drop_page_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (they are clean: the file was fsynced when written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_head_train(cache: Path, runs: Path, name: str, flags: list[str], epochs: int,
                   cgroup: MemoryCgroup | None = None) -> dict:
    """One `featcache head-train` in a fresh process: exit status, wall s, peak RSS, what its metrics.json records."""
    cmd = [sys.executable, "-c", CHILD, "head-train", "--cache", str(cache), "--epochs", str(epochs),
           "--lr", "0.01", "--runs-dir", str(runs), "--run-name", name, *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cgroup:
        drop_page_cache(cache)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=cgroup.join if cgroup else None)
    wall = time.perf_counter() - t0
    if done.returncode:
        if cgroup and done.returncode < 0:  # killed by the kernel's OOM killer inside the cgroup
            return {"returncode": done.returncode, "wall_s": wall}
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    child = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    doc = json.loads((runs / name / "metrics.json").read_text())
    return {"returncode": 0, "wall_s": wall, **child, **doc["timings"], "stream": doc["extra"].get("stream"),
            "test_acc": doc["summary"]["test_acc"], "selected_epoch": doc["summary"]["selected_epoch"],
            "val_acc": [r["val_acc"] for r in doc["history"]], "train_loss": [r["train_loss"] for r in doc["history"]]}


def reader_speed(cache: Path, *, rows: int, block: int) -> dict:
    """Microseconds per row of FeatureReader.take on `block` random train rows, page cache warm and cold:
    os.preadv with its default threads, with one thread, and h5py's indexing (the fallback)."""
    import featcache.cache.reader as cache_module  # FeatureReader's module: its tuning constants
    from featcache.cache import FeatureReader

    picks = np.random.default_rng(1).permutation(rows)[:block]
    out, threads = {}, cache_module._READ_THREADS
    with FeatureReader(cache) as reader:
        offsets = reader._chunks["train"]
        for how in (f"preadv_{threads}", "preadv_1", "h5py"):
            reader._chunks["train"] = None if how == "h5py" else offsets  # the fallback path, on purpose
            cache_module._READ_THREADS = 1 if how == "preadv_1" else threads
            for state in ("warm", "cold"):
                if state == "cold":
                    drop_page_cache(cache)
                else:
                    reader.take("train", picks)  # pages in
                t0 = time.perf_counter()
                got = reader.take("train", picks)
                out[f"{how}_{state}_us_per_row"] = (time.perf_counter() - t0) / len(picks) * 1e6
                out.setdefault("checksum", float(got.sum(dtype=np.float64)))
                assert float(got.sum(dtype=np.float64)) == out["checksum"]
        reader._chunks["train"], cache_module._READ_THREADS = offsets, threads
    return out


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(runs: dict[str, list[dict]], a) -> str:
    ok = {m: [r for r in rs if r["returncode"] == 0] for m, rs in runs.items()}
    reference = ok.get(REFERENCE) or ok["in memory"]
    base, base_train_s = reference[0], _med(reference, "train_s")
    limit = f", in a cgroup capped at {a.memory_limit_mib} MiB (page cache included)" if a.memory_limit_mib else ""
    lines = [f"head-train on {a.rows} x {a.dim} float32 train features ({a.rows * a.dim * 4 / 2**20:.0f} MiB; "
             f"+ {a.rows // 10} val, {a.rows // 10} test), 10 classes, {a.epochs} epochs, batch 32, median of "
             f"{a.repeat} interleaved runs{limit}",
             f"{'mode':20s} {'wall s':>8s} {'load s':>7s} {'compile s':>9s} {'train s':>8s} {'read s':>7s} "
             f"{'wait s':>7s} {'s/epoch':>8s} {'peak RSS MiB':>12s} {'train ÷ in-memory':>18s} {'blocks':>7s} same"]
    for mode, rs in runs.items():
        if not ok[mode]:
            codes = sorted({r["returncode"] for r in rs})
            lines.append(f"{mode:20s} killed in every run (exit {', '.join(map(str, codes))}, out of memory, after "
                         f"{_med(rs, 'wall_s'):.1f} s)")
            continue
        streamed = ok[mode][0]["stream"]
        same = all(r["test_acc"] == base["test_acc"] and r["selected_epoch"] == base["selected_epoch"]
                   and r["val_acc"] == base["val_acc"] for r in ok[mode])
        lines.append(
            f"{mode:20s} {_med(ok[mode], 'wall_s'):8.2f} {_med(ok[mode], 'load_s'):7.2f} "
            f"{_med(ok[mode], 'compile_s'):9.2f} {_med(ok[mode], 'train_s'):8.2f} "
            f"{_med(ok[mode], 'read_s') if streamed else 0:7.2f} {_med(ok[mode], 'wait_s') if streamed else 0:7.2f} "
            f"{_med(ok[mode], 'train_s') / a.epochs:8.3f} {_med(ok[mode], 'peak_rss_mib'):12.0f} "
            f"{_med(ok[mode], 'train_s') / base_train_s:17.2f}x "
            f"{streamed['blocks_per_epoch'] if streamed else '-':>7} {'yes' if same else 'NO'}"
            + (f"  ({len(rs) - len(ok[mode])} of {len(rs)} runs killed)" if len(ok[mode]) < len(rs) else ""))
    diffs = [abs(x - y) for rs in ok.values() for r in rs for x, y in zip(r["train_loss"], base["train_loss"])]
    lines.append(f"largest train-loss difference from the in-memory run: {max(diffs):.2e}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--memory-limit-mib", type=int, default=None,
                   help="run every mode in a cgroup capped at this much memory, page cache included (root)")
    p.add_argument("--reader-block", type=int, default=32768, help="random rows per reader timing")
    p.add_argument("--work-dir", default=None, help="where the cache and runs go (default: a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream-2cores-cpu.json"))
    a = p.parse_args()

    load_before = list(os.getloadavg())
    cgroup = MemoryCgroup(a.memory_limit_mib) if a.memory_limit_mib else None
    try:
        with tempfile.TemporaryDirectory(dir=a.work_dir) as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            cache = write_cache(work / "bench.h5", rows=a.rows, dim=a.dim)
            print(f"cache: {a.rows} x {a.dim} float32 train rows ({a.rows * a.dim * 4 / 2**20:.0f} MiB), "
                  f"{cache.stat().st_size / 2**20:.0f} MiB file, written in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            if cgroup:
                runs[REFERENCE] = [run_head_train(cache, work / "runs", "reference", MODES["in memory"], a.epochs)]
            for r in range(a.repeat):
                for mode, flags in MODES.items():
                    rec = run_head_train(cache, work / "runs", f"{r}-{mode.replace(' ', '_').replace(',', '')}",
                                         flags, a.epochs, cgroup)
                    runs[mode].append(rec)
                    print(f"  repeat {r + 1} {mode:18s} " + (
                        f"wall {rec['wall_s']:6.2f} s  train {rec['train_s']:6.2f} s  peak RSS "
                        f"{rec['peak_rss_mib']:6.0f} MiB" if rec["returncode"] == 0
                        else f"killed (exit {rec['returncode']}) after {rec['wall_s']:.1f} s"), flush=True)
            reader = reader_speed(cache, rows=a.rows, block=a.reader_block)
    finally:
        if cgroup:
            cgroup.close()

    text = table(runs, a) + f"\nreader, {min(a.reader_block, a.rows)} random rows of {a.rows}, us/row warm / cold: " + \
        "; ".join(f"{how.replace('_', ' ')} {reader[f'{how}_warm_us_per_row']:.2f} / {reader[f'{how}_cold_us_per_row']:.2f}"
                  for how in [k[:-len("_warm_us_per_row")] for k in reader if k.endswith("_warm_us_per_row")])
    print(text)

    import h5py
    import jax

    doc = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(["python", *sys.argv]),
           "settings": vars(a), "machine": {"platform": platform.platform(), "processor": platform.machine(),
                                            "cpu_count": os.cpu_count(), "load_avg_before": load_before,
                                            "load_avg_after": list(os.getloadavg())},
           "versions": {"python": platform.python_version(), "jax": jax.__version__, "h5py": h5py.version.version,
                        "hdf5": h5py.version.hdf5_version, "numpy": np.__version__},
           "runs": runs, "reader": reader, "table": text}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"wrote {out} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
