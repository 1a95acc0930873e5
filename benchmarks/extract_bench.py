"""Extraction throughput against the bare forward pass of the same backbone (not a test).

Extraction = featcache's extract over an image folder of JPEGs: decode + resize + crop + normalize
(DataLoader workers), forward pass, HDF5 writes. Its images/s is what extract itself measures and
logs: from the first batch requested to the file renamed into place, so process start-up, the
dataset scan and the model build are left out. Forward = the same cut network, eval mode, under
torch.inference_mode(), over in-memory tensors of the same shape and the same batches (same batch
size, same short batches at the end of each split), after a warm-up. Forward passes are timed
before and after each extraction and averaged, since this machine is shared and speeds drift; the
ratio extraction / forward is the figure of merit (goal >= 80 %).

The images are rendered by featcache's demo generator and saved as --source-size px JPEGs (like a
real dataset, so the transform really decodes and resizes) into a temporary folder.

    PYTHONPATH=. python benchmarks/extract_bench.py [--model resnet18] [--image-size 224] [--batch-size 32]
        [--images 256] [--weights none] [--num-workers -1 [0 1 ...]] [--source-size 512] [--repeat 1]

Several --num-workers values are measured in one run, each against its own forward timings.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpeg_dataset(root: Path, *, images: int, source_size: int, seed: int = 0) -> Path:
    """`images` demo images (2 classes; train/val/test = 3/4, 1/8, 1/8) as source_size px JPEGs."""
    from PIL import Image

    from featcache.demo import make_demo_dataset

    per_class = images // 2
    held_out = max(1, per_class // 8)
    demo = make_demo_dataset(root / "png", seed=seed, n_per_class=(per_class - 2 * held_out, held_out, held_out),
                             image_size=64)
    rng = np.random.default_rng(seed)
    out = root / "jpeg"
    for png in sorted(demo.rglob("*.png")):
        target = out / png.relative_to(demo).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        big = np.asarray(Image.open(png).resize((source_size, source_size), Image.Resampling.BICUBIC), np.float32)
        big += rng.normal(0.0, 4.0, size=big.shape)  # sensor-like grain: a JPEG with real detail to decode
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(target, quality=90)
    return out


def batch_sizes(plan, batch_size: int) -> list[int]:
    """The batches extract runs: per split, full batches then the short rest."""
    sizes = []
    for samples in plan.index.splits.values():
        n = len(samples)
        sizes += [min(batch_size, n - a) for a in range(0, n, batch_size)]
    return sizes


def forward_rate(net, sizes: list[int], image_size: int, *, warmup: int = 2) -> float:
    """Images/s of `net` on in-memory (B, 3, S, S) tensors over the batches `sizes`, after a warm-up."""
    import torch

    inputs = {b: torch.randn(b, 3, image_size, image_size) for b in set(sizes)}
    with torch.inference_mode():
        for _ in range(warmup):
            net(inputs[sizes[0]])
        t0 = time.perf_counter()
        for b in sizes:
            net(inputs[b]).float().cpu().numpy()  # the same hand-off to numpy extract does
        seconds = time.perf_counter() - t0
    return sum(sizes) / seconds


def extraction_rate(config) -> tuple[float, str]:
    """Images/s that extract logs for `config` (a fresh cache dir: a real extraction), and its log line."""
    from featcache.extraction import extract

    lines: list[str] = []
    extract(config, progress=False, log=lines.append)
    line = lines[-1]
    match = re.search(r"\(([\d.]+) img/s\)", line)
    if not match:
        raise RuntimeError(f"cannot read the rate from extract's log: {line!r}")
    return float(match.group(1)), line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[-1],
                        help="-1 = extract's default; several values are measured in one run")
    parser.add_argument("--source-size", type=int, default=512, help="side of the JPEG files")
    parser.add_argument("--repeat", type=int, default=1, help="extractions per --num-workers value")
    a = parser.parse_args()

    import torch

    from featcache.backbones import build_backbone
    from featcache.config import DataConfig, ExtractConfig
    from featcache.environment import default_num_workers
    from featcache.extraction import plan_extraction

    with tempfile.TemporaryDirectory(prefix="featcache-extract-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = make_jpeg_dataset(tmp, images=a.images, source_size=a.source_size)
        made_s = time.perf_counter() - t0

        def config(workers: int, run: int) -> ExtractConfig:
            return ExtractConfig(model=a.model, data=DataConfig(root=str(data)), weights=a.weights,
                                 image_size=a.image_size, batch_size=a.batch_size, num_workers=workers,
                                 cache_dir=str(tmp / f"cache-w{workers}-r{run}"))

        plan = plan_extraction(config(a.num_workers[0], 0))
        sizes = batch_sizes(plan, a.batch_size)
        crop = plan.meta["transform"]["crop"]
        backbone = build_backbone(a.model, weights=a.weights, image_size=a.image_size)
        net = backbone.net.eval()

        print(f"featcache extract benchmark: {a.model}, weights {a.weights}, crop {crop} px "
              f"(resize {plan.meta['transform']['resize']}), batch {a.batch_size}, {sum(sizes)} images "
              f"({', '.join(f'{s}={len(v)}' for s, v in plan.index.splits.items())}) as {a.source_size} px JPEGs "
              f"(made in {made_s:.1f} s)")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, device cpu, torch {torch.__version__}, "
              f"torch threads {torch.get_num_threads()} (inter-op {torch.get_num_interop_threads()}), "
              f"python {platform.python_version()}; extract's default --num-workers here: {default_num_workers()}")

        forward_rate(net, sizes[:1], crop, warmup=1)  # first-call costs (allocator, kernels) out of the way
        results = []
        for workers in a.num_workers:
            resolved = default_num_workers() if workers < 0 else workers
            for run in range(a.repeat):
                before = forward_rate(net, sizes, crop)
                rate, line = extraction_rate(config(workers, run))
                after = forward_rate(net, sizes, crop)
                forward = (before + after) / 2
                results.append((workers, rate / forward))
                print(f"--num-workers {workers} ({resolved} worker process{'es' if resolved != 1 else ''}): "
                      f"extraction {rate:6.1f} img/s | forward {forward:6.1f} img/s "
                      f"(before {before:.1f}, after {after:.1f}) | ratio {100 * rate / forward:5.1f} %")
                print(f"    extract: {line}")
        for workers in a.num_workers:
            ratios = [r for w, r in results if w == workers]
            print(f"ratio extraction/forward, --num-workers {workers}: {100 * statistics.median(ratios):.1f} % "
                  f"(median of {len(ratios)}; goal >= 80 %)")


if __name__ == "__main__":
    main()
