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

Modules: runner.py (settings, data, the processes of every path), worker.py (paths 4 and 5 in their
own process; the head loops benchmarks/head_bench.py times too), results.py (the result document,
its schema and the figures from its times), tables.py (the text tables). Nothing heavy is imported
at module level (the CLI imports this package inside its command).
"""

from featcache.bench.results import PATH_LABELS, SCHEMA, load_result, stats, summarize_model, theoretical_ratio
from featcache.bench.runner import check_config, effective_config, run_bench
from featcache.bench.tables import compare, render
from featcache.bench.worker import HEAD_RUNS, RESULT_MARK, jax_head_program, torch_head_loop

__all__ = ["HEAD_RUNS", "PATH_LABELS", "RESULT_MARK", "SCHEMA", "check_config", "compare", "effective_config",
           "jax_head_program", "load_result", "render", "run_bench", "stats", "summarize_model", "theoretical_ratio",
           "torch_head_loop"]
