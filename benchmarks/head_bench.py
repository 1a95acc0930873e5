"""Speed of the compiled JAX head against a plain PyTorch loop on the same plan (not a test).

Both train the same linear head for the same epochs on the same in-memory features, following
one TrainPlan (same init, batch order and lr per epoch) and, per epoch, one val pass: the JAX
program via featcache.head, the PyTorch loop as a tutorial writes it (zero_grad, forward,
loss, backward, step, loss.item() every batch): featcache.bench.torch_head_loop, path 4 of
`featcache bench`. Measured in one run and reported as a ratio, since absolute times on a
shared machine drift.

    PYTHONPATH=. python benchmarks/head_bench.py [--rows 2000] [--dim 1024] [--epochs 30] [--repeat 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_data(rows: int, dim: int, seed: int = 0):
    """Random features, 2 classes; val and test are a quarter of train each."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows + rows // 2, dim)).astype(np.float32)
    y = (x[:, :8].sum(axis=1) + rng.normal(size=len(x)) > 0).astype(np.int64)
    q = rows // 4
    return (x[:rows], y[:rows]), (x[rows:rows + q], y[rows:rows + q]), (x[rows + q:], y[rows + q:])


def jax_warm(train, val, config, repeat: int) -> list[float]:
    """Seconds of the compiled training program, inputs already on the device, run `repeat` times."""
    from featcache.bench import jax_head_program  # the JAX side of `featcache bench`'s path 4

    return jax_head_program(train, val, num_classes=2, config=config, runs=repeat)["runs_s"]


PROCESS_CODE = """
import sys, time; t0 = time.perf_counter()
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from head_bench import make_data
from featcache.config import TrainConfig
from featcache.head import fit_head
fit = fit_head(*make_data({rows}, {dim}), num_classes=2, config=TrainConfig(epochs={epochs}))
print(time.perf_counter() - t0)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--torch-device", default="cpu", help="device of the PyTorch loop (cpu, cuda)")
    a = p.parse_args()

    from featcache.bench import torch_head_loop  # the PyTorch loop `featcache bench` times as path 4
    from featcache.config import TrainConfig

    config = TrainConfig(epochs=a.epochs)  # the study's defaults: batch 32, sgd momentum 0.9, cosine
    train, val, test = make_data(a.rows, a.dim)

    # 1. first call in a fresh process state: fit_head = plan + compile + run + metrics
    from featcache.head import fit_head

    t0 = time.perf_counter()
    fit = fit_head(train, val, test, num_classes=2, config=config)
    first = time.perf_counter() - t0
    # 2. warm: the compiled program again
    warm = jax_warm(train, val, config, a.repeat)
    # 3. the PyTorch loop on the same tensors: torch's default intra-op threads, and 1 thread
    #    (on a small, shared CPU, OpenMP threads waiting on each other can cost more than they bring)
    import torch

    default_threads = torch.get_num_threads()
    # warm-up (torch's first-call initialization out of the timings), as featcache bench's path 4
    torch_head_loop(train, val, num_classes=2, config=dataclasses.replace(config, epochs=1), device=a.torch_device)
    torch_times = {}
    for threads in sorted({default_threads, 1}, reverse=True) if a.torch_device == "cpu" else [default_threads]:
        torch.set_num_threads(threads)
        torch_times[threads] = statistics.median(
            [torch_head_loop(train, val, num_classes=2, config=config, device=a.torch_device)
             for _ in range(max(1, a.repeat // 2))])
    torch.set_num_threads(default_threads)
    # 4. a whole Python process: imports + data + fit_head (no cache file, no run directory)
    proc0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROCESS_CODE.format(root=str(ROOT), bench=str(Path(__file__).parent),
                                                                    rows=a.rows, dim=a.dim, epochs=a.epochs)],
                         capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - proc0

    import jax

    w = statistics.median(warm)
    batches = -(-a.rows // config.batch_size)
    print(f"featcache head benchmark: {a.rows}x{a.dim} float32 features, 2 classes, {a.epochs} epochs x "
          f"{batches} batches of {config.batch_size}, val {len(val[1])} rows per epoch")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} on {a.torch_device}, "
          f"python {platform.python_version()}")
    print(f"JAX first call (fit_head: compile {fit.timings['compile_s']:.3f} s + run {fit.timings['train_s']:.3f} s "
          f"+ metrics): {first:.3f} s")
    print(f"JAX warm (compiled program, median of {len(warm)}): {w * 1e3:.2f} ms")
    for threads, t in torch_times.items():
        print(f"PyTorch loop, {threads} thread{'s' if threads > 1 else ''} (median of {max(1, a.repeat // 2)}): "
              f"{t * 1e3:.1f} ms  ->  ratio PyTorch / JAX warm {t / w:.1f}x, PyTorch / JAX first call {t / first:.2f}x")
    print(f"whole process (python start + imports + data + fit_head): {process_s:.2f} s "
          f"(of which imports + data + fit_head {float(out.stdout.strip()):.2f} s)")
    print(f"test acc: JAX head {fit.summary.test_acc:.3f}")


if __name__ == "__main__":
    main()
