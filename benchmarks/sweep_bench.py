"""Cost of a grid of heads in one vmapped program against one head (not a test).

Both on the same in-memory features (head_bench's random 2-class data), the study's defaults
(30 epochs, batch 32, sgd momentum 0.9, cosine): ONE head = featcache.head's compiled program;
the GRID = featcache.sweep's compiled program over lr x weight decay x seed. Warm = the compiled
program again with its inputs already on the device, --repeat runs each; the two are timed
alternately in the same run and reported as ratios of the medians and of the minimums (goal: 45
heads <= 10x one head). On a shared machine the minimum is the run least disturbed by other
processes. End to end (fit_head vs fit_grid: plan, compile, run, per-epoch metrics of every head)
is shown as well.

    PYTHONPATH=. python benchmarks/sweep_bench.py [--rows 2000] [--dim 1024] [--epochs 30] [--repeat 5]
        [--lrs 1e-4,1e-3,1e-2] [--weight-decays 0,1e-4,1e-3] [--seeds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--lrs", type=_floats, default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--weight-decays", type=_floats, default=[0.0, 1e-4, 1e-3])
    p.add_argument("--seeds", type=int, default=5)
    a = p.parse_args()

    import jax

    from featcache.config import TrainConfig
    from featcache.head import fit_head, prepare_data, program_args, train_program
    from featcache.plan import make_plan
    from featcache.sweep import fit_grid, grid_arguments, grid_program
    from head_bench import make_data

    config = TrainConfig(epochs=a.epochs)
    train, val, test = make_data(a.rows, a.dim)
    seeds = list(range(a.seeds))
    heads = len(a.lrs) * len(a.weight_decays) * len(seeds)

    # end to end, first call of each (compile included)
    t0 = time.perf_counter()
    fit_head(train, val, test, num_classes=2, config=dataclasses.replace(config, lr=a.lrs[0]))
    one_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = fit_grid(train, val, test, num_classes=2, config=config, lrs=a.lrs, weight_decays=a.weight_decays,
                    seeds=seeds)
    grid_first = time.perf_counter() - t0

    # warm: the compiled programs again, inputs on the device
    data = prepare_data(train, val, test, num_classes=2, config=config)
    plan = make_plan(n_train=len(data.y_train), feature_dim=a.dim, num_outputs=1, config=config)
    one_args = jax.device_put(program_args(plan, data))
    one = train_program(num_outputs=1, config=config).lower(*one_args).compile()
    pairs = [(lr, wd) for lr in a.lrs for wd in a.weight_decays]
    _, grid_args = grid_arguments(data, num_outputs=1, config=config, pairs=pairs, seeds=seeds)
    grid_args = jax.device_put(grid_args)
    many = grid_program(num_outputs=1, num_pairs=len(pairs), config=config).lower(*grid_args).compile()
    jax.block_until_ready(one(*one_args))
    jax.block_until_ready(many(*grid_args))
    one_times, grid_times = [], []
    for _ in range(a.repeat):  # alternate, so drift on a shared machine hits both alike
        t0 = time.perf_counter()
        jax.block_until_ready(one(*one_args))
        one_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(many(*grid_args))
        grid_times.append(time.perf_counter() - t0)
    w1, wg = statistics.median(one_times), statistics.median(grid_times)
    m1, mg = min(one_times), min(grid_times)

    cell = grid.selected_cell
    batches = -(-a.rows // config.batch_size)
    print(f"featcache sweep benchmark: {a.rows}x{a.dim} float32 features, 2 classes, {a.epochs} epochs x "
          f"{batches} batches of {config.batch_size}, sgd momentum 0.9, cosine")
    print(f"grid: lr {a.lrs} x weight decay {a.weight_decays} x {a.seeds} seeds = {heads} heads, one program")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}, python {platform.python_version()}")
    print(f"warm, median of {a.repeat}: one head {w1 * 1e3:.1f} ms, {heads} heads {wg * 1e3:.1f} ms  ->  "
          f"ratio {wg / w1:.2f}x (goal <= 10x; {heads * w1 / wg:.1f}x faster than {heads} heads one by one)")
    print(f"warm, minimum of {a.repeat}: one head {m1 * 1e3:.1f} ms, {heads} heads {mg * 1e3:.1f} ms  ->  "
          f"ratio {mg / m1:.2f}x ({heads * m1 / mg:.1f}x faster than {heads} heads one by one)")
    print(f"end to end (plan + compile + run + metrics), first call: fit_head {one_first:.2f} s, "
          f"fit_grid {grid_first:.2f} s (compile {grid.timings['compile_s']:.2f} s, run {grid.timings['train_s']:.2f} s)")
    print(f"selected lr {cell.lr:g}, wd {cell.weight_decay:g}: val acc {cell.val_acc.mean:.4f} ± "
          f"{cell.val_acc.half_width:.4f}, test acc {cell.test_acc.mean:.4f} ± {cell.test_acc.half_width:.4f} "
          f"(95 % t-interval over {a.seeds} seeds)")


if __name__ == "__main__":
    main()
