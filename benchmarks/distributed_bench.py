"""Extraction throughput with 1 and with N processes (torchrun, gloo on the CPU), same images (not a test).

Each run is a fresh `featcache extract` command in its own process tree, into its own cache folder:
`featcache extract` for 1 process, `featcache extract --nproc N` for N. Runs alternate (1, N, 1, N,
...) because this machine is shared and speeds drift; medians are reported, and the ratio N / 1.

Two figures per run:
* extraction img/s: images / the extraction's own seconds, as extract logs them (first batch to the
  cache in place; with N processes the slowest rank's, which includes waiting for the others and
  rank 0's merge of the shards). Start-up is left out.
* end to end img/s: images / wall-clock of the whole command (python and torch start-up, torchrun's
  rendezvous, the model build, the dataset scan, extraction, merge).

Threads: every run gets OMP_NUM_THREADS = cores / processes, so 1 and N processes use the same number
of compute threads; decode workers are extract's default (half the cores, at most 4) in every process.
The images are the demo generator's, saved as --source-size px JPEGs (as extract_bench.py makes them).

    PYTHONPATH=. python benchmarks/distributed_bench.py [--nproc 2] [--images 256] [--image-size 224]
        [--model resnet18] [--batch-size 32] [--repeat 3] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from extract_bench import make_jpeg_dataset  # noqa: E402

def run_extract(args: list[str], *, nproc: int, threads: int, cache_dir: Path) -> dict:
    """One `featcache extract` command; its images, extraction seconds (slowest rank) and wall seconds."""
    cmd = [sys.executable, "-m", "featcache", "extract", *args, "--cache-dir", str(cache_dir), "--quiet"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    found = [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"(\d+) images in ([\d.]+) s", done.stdout)]
    merge = re.search(r"merged \d+ shards into \S+ in ([\d.]+) s", done.stdout)
    if len(found) != nproc:
        raise RuntimeError(f"expected {nproc} summary lines, got:\n{done.stdout}")
    return {"images": sum(n for n, _ in found), "extract_s": max(s for _, s in found), "wall_s": wall,
            "merge_s": float(merge.group(1)) if merge else None, "log": done.stdout.strip().splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--source-size", type=int, default=512, help="side of the JPEG files")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    a = parser.parse_args()

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    settings = {1: max(1, cores), a.nproc: max(1, cores // a.nproc)}  # processes -> OMP threads each
    with tempfile.TemporaryDirectory(prefix="featcache-distributed-bench-") as tmp:
        tmp = Path(tmp)
        data = make_jpeg_dataset(tmp, images=a.images, source_size=a.source_size)
        args = ["--model", a.model, "--data", str(data), "--weights", a.weights, "--image-size", str(a.image_size),
                "--batch-size", str(a.batch_size)]
        print(f"featcache extract with 1 and {a.nproc} processes: {a.model}, weights {a.weights}, crop "
              f"{a.image_size} px, batch {a.batch_size}, {a.images} images as {a.source_size} px JPEGs")
        print(f"machine: {platform.machine()}, {cores} cores, device cpu (gloo), torch {torch.__version__}, "
              f"python {platform.python_version()}; OMP threads per process: "
              + ", ".join(f"{n} process{'es' if n > 1 else ''}: {t}" for n, t in settings.items()))
        runs: dict[int, list[dict]] = {n: [] for n in settings}
        for r in range(a.repeat):
            for nproc, threads in settings.items():
                result = run_extract(args, nproc=nproc, threads=threads, cache_dir=tmp / f"cache-{nproc}-{r}")
                runs[nproc].append(result)
                merge = f", merge {result['merge_s']:.1f} s" if result["merge_s"] is not None else ""
                print(f"  run {r + 1} | {nproc} process{'es' if nproc > 1 else '  '} | extraction "
                      f"{result['images'] / result['extract_s']:6.1f} img/s ({result['extract_s']:.1f} s{merge}) | "
                      f"end to end {result['images'] / result['wall_s']:6.1f} img/s ({result['wall_s']:.1f} s)")
        summary = {}
        for nproc, results in runs.items():
            summary[nproc] = {
                "extraction_img_s": statistics.median(x["images"] / x["extract_s"] for x in results),
                "end_to_end_img_s": statistics.median(x["images"] / x["wall_s"] for x in results),
            }
        one, many = summary[1], summary[a.nproc]
        print(f"median extraction img/s: 1 process {one['extraction_img_s']:.1f}, {a.nproc} processes "
              f"{many['extraction_img_s']:.1f} (ratio {many['extraction_img_s'] / one['extraction_img_s']:.2f})")
        print(f"median end-to-end img/s: 1 process {one['end_to_end_img_s']:.1f}, {a.nproc} processes "
              f"{many['end_to_end_img_s']:.1f} (ratio {many['end_to_end_img_s'] / one['end_to_end_img_s']:.2f})")
        if a.out:
            doc = {"args": vars(a), "cores": cores, "torch": torch.__version__, "threads": settings,
                   "summary": summary, "runs": {str(n): rs for n, rs in runs.items()}}
            Path(a.out).write_text(json.dumps(doc, indent=2))
            print(f"result: {a.out}")


if __name__ == "__main__":
    main()
