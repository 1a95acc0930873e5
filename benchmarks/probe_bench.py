"""The L-BFGS probe's C sweep in one program against one fit and against scikit-learn's loop (not a test).

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes; no network), written as
a PNG image folder (train/<digit>/, val and test carved by featcache: 15 % each, stratified) and run
through `featcache extract --model resnet18 --weights none --image-size 32` (the CLI, a subprocess);
the probes use the cached 512-d features. `--features pixels` uses the 64 pixel values instead.

Measured in ONE run, repeats interleaved (the machine is shared; ratios of medians and of minimums):
* sweep: featcache.lbfgs.lbfgs_path over the 32 default C values (1e-6 ... 1e6), ONE compiled program;
  compile (first call) reported apart from the warm runs;
* one fit: the same program over the single C the sweep selects;
* scikit-learn: LogisticRegression(C, solver="lbfgs", tol=1e-4, max_iter=1000) fitted for the same 32
  C values one by one (the same objective, stopping rule and float32 features);
* the sweep with the C values side by side (vmapped, --parallel 32) once, to show why a CPU fits them
  one after another (featcache.lbfgs.default_parallel).
Both sides select C by the same rule (best val accuracy; ties: lower val loss, then smaller C); their
selected C's val accuracies must agree within 0.5 points. Issue targets: sweep <= 3x one fit, sweep
>= 10x faster than scikit-learn's loop.

    PYTHONPATH=. python benchmarks/probe_bench.py [--features resnet18|pixels] [--repeat 5]
        [--work /tmp/featcache-probe-bench] [--out benchmarks/results/probe-2cores-cpu.json]
"""

from __future__ import annotations

import argparse
import json
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


def digits_folder(root: Path) -> Path:
    """The digits as 8x8 grayscale PNGs under root/train/<digit>/ (written once)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    done = root / ".complete"
    if done.exists():
        return root
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / "train" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    done.touch()
    return root


def load_splits(a) -> tuple[dict, dict]:
    """{split: (features, labels)} and how they were made."""
    from featcache.cache import list_caches, load_features

    data = digits_folder(Path(a.work) / "digits")
    if a.features == "pixels":
        from featcache.datasets import scan_dataset
        from PIL import Image

        index = scan_dataset(data)
        splits = {}
        for split in ("train", "val", "test"):
            samples = index.splits[split]
            x = np.stack([np.asarray(Image.open(index.root / s.path), np.float32).reshape(-1) / 255
                          for s in samples])
            splits[split] = (x, np.array([s.label for s in samples]))
        return splits, {"features": "64 pixel values / 255", "extract_s": 0.0}
    cache_dir = Path(a.work) / "cache"
    cmd = [sys.executable, "-m", "featcache", "extract", "--model", "resnet18", "--weights", "none",
           "--image-size", "32", "--data", str(data), "--cache-dir", str(cache_dir), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    extract_s = time.perf_counter() - t0
    path = next(c["path"] for c in list_caches(cache_dir) if c.get("model") == "resnet18")
    splits = {s: load_features(path, s)[:2] for s in ("train", "val", "test")}
    return splits, {"features": "resnet18 (random init) penultimate, 32 px", "cache": str(path),
                    "command": " ".join(["featcache"] + cmd[3:]), "extract_s": extract_s}


def sklearn_loop(cs, train, val) -> dict:
    """LogisticRegression fitted for every C one by one: seconds, iterations, val acc/loss per C."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    (x, y), (x_val, y_val) = train, val
    acc, loss, iters = [], [], []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            m = LogisticRegression(C=float(c), tol=1e-4, max_iter=1000).fit(x, y)
            acc.append(float(m.score(x_val, y_val)))
            loss.append(float(log_loss(y_val, m.predict_proba(x_val), labels=m.classes_)))
            iters.append(int(m.n_iter_[0]))
    return {"seconds": time.perf_counter() - t0, "val_acc": acc, "val_loss": loss, "iterations": iters}


def select(val_acc, val_loss) -> int:
    """featcache's rule on any curve: best val acc, ties lower val loss, then the earlier (smaller) C."""
    return min(range(len(val_acc)), key=lambda i: (-val_acc[i], val_loss[i], i))


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def measure(a, splits) -> dict:
    from featcache.lbfgs import DEFAULT_CS, lbfgs_path

    train, val = splits["train"], splits["val"]
    num_classes = int(max(y.max() for _, y in splits.values()) + 1)
    first = lbfgs_path(train, val, num_classes=num_classes, cs=DEFAULT_CS, parallel=1)
    chosen = first.select()
    c = float(first.cs[chosen])
    one_first = lbfgs_path(train, val, num_classes=num_classes, cs=[c], parallel=1)
    sweep_s, one_s, sk_s = [], [], []
    for _ in range(a.repeat):  # interleaved: drift on the shared machine hits all three alike
        sweep_s.append(lbfgs_path(train, val, num_classes=num_classes, cs=DEFAULT_CS, parallel=1).timings["fit_s"])
        one_s.append(lbfgs_path(train, val, num_classes=num_classes, cs=[c], parallel=1).timings["fit_s"])
        sk = sklearn_loop(DEFAULT_CS, train, val)
        sk_s.append(sk["seconds"])
    side = lbfgs_path(train, val, num_classes=num_classes, cs=DEFAULT_CS, parallel=len(DEFAULT_CS))
    side_warm = lbfgs_path(train, val, num_classes=num_classes, cs=DEFAULT_CS, parallel=len(DEFAULT_CS))
    sk_chosen = select(sk["val_acc"], sk["val_loss"])
    return {"eval_ms": eval_ms(train, num_classes, c),
        "num_classes": num_classes, "rows": {s: int(len(y)) for s, (_, y) in splits.items()},
        "dim": int(train[0].shape[1]), "cs": list(DEFAULT_CS),
        "featcache": {"compile_s": first.timings["compile_s"], "first_fit_s": first.timings["fit_s"],
                      "fit_s": _stats(sweep_s), "iterations": first.iterations.tolist(),
                      "converged": first.converged.tolist(), "stalled": first.stalled.tolist(),
                      "val_acc": first.val_acc.tolist(), "val_loss": first.val_loss.tolist(),
                      "selected": chosen, "selected_c": c},
        "one_fit": {"c": c, "compile_s": one_first.timings["compile_s"], "fit_s": _stats(one_s),
                    "iterations": int(one_first.iterations[0])},
        "side_by_side": {"parallel": len(DEFAULT_CS), "compile_s": side.timings["compile_s"],
                         "fit_s": side_warm.timings["fit_s"], "iterations": side.iterations.tolist()},
        "sklearn": {"seconds": _stats(sk_s), "iterations": sk["iterations"], "val_acc": sk["val_acc"],
                    "val_loss": sk["val_loss"], "selected": sk_chosen, "selected_c": float(DEFAULT_CS[sk_chosen])},
    }


def eval_ms(train, num_classes: int, c: float, reps: int = 200) -> float:
    """Milliseconds of one value-and-gradient of the objective over all train rows (min of 3 runs of reps)."""
    import jax
    import jax.numpy as jnp

    from featcache.lbfgs import _objective
    from featcache.plan import num_outputs_for

    x, y = jnp.asarray(train[0], jnp.float32), jnp.asarray(train[1], jnp.int32)
    k = num_outputs_for(num_classes)
    params = {"w": jnp.zeros((k, x.shape[1])), "b": jnp.zeros((k,))}
    grad = jax.value_and_grad(lambda p: _objective(p, x, y, jnp.ones(len(y)), jnp.float32(c)))

    def body(_, p):
        return jax.tree.map(lambda a, g: a - 1e-3 * g, p, grad(p)[1])
    run = jax.jit(lambda p: jax.lax.fori_loop(0, reps, body, p))
    jax.block_until_ready(run(params))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run(params))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times) / reps


def ratios(r: dict) -> dict:
    f, one, sk = r["featcache"]["fit_s"], r["one_fit"]["fit_s"], r["sklearn"]["seconds"]
    fc_acc = r["featcache"]["val_acc"][r["featcache"]["selected"]]
    sk_acc = r["sklearn"]["val_acc"][r["sklearn"]["selected"]]
    return {"sweep_over_one_fit_median": f["median"] / one["median"], "sweep_over_one_fit_min": f["min"] / one["min"],
            "sklearn_over_sweep_median": sk["median"] / f["median"], "sklearn_over_sweep_min": sk["min"] / f["min"],
            "selected_val_acc_featcache": fc_acc, "selected_val_acc_sklearn": sk_acc,
            "selected_val_acc_points_apart": 100 * abs(fc_acc - sk_acc), **_curves_apart(r)}


def _curves_apart(r: dict) -> dict:
    """How far the two val accuracy curves are apart, in points: median, worst (and its C), C values > 0.5 apart."""
    apart = 100 * np.abs(np.array(r["featcache"]["val_acc"]) - np.array(r["sklearn"]["val_acc"]))
    worst = int(np.argmax(apart))
    return {"val_acc_curve_median_points_apart": float(np.median(apart)),
            "val_acc_curve_max_points_apart": float(apart[worst]), "val_acc_curve_worst_c": r["cs"][worst],
            "val_acc_curve_cs_over_half_point": int((apart > 0.5).sum())}


def render(r: dict, q: dict, made: dict) -> str:
    f, one, sk, side = r["featcache"], r["one_fit"], r["sklearn"], r["side_by_side"]
    it, sk_it = sum(f["iterations"]), sum(sk["iterations"])
    lines = [
        f"data: sklearn digits as PNGs, {made['features']}; rows {r['rows']}, dim {r['dim']}, "
        f"{r['num_classes']} classes; 32 C values 1e-6..1e6",
        f"{'':34s} {'median s':>9s} {'min s':>8s} {'compile s':>9s} {'iterations':>10s}",
        f"{'featcache sweep (1 program)':34s} {f['fit_s']['median']:9.3f} {f['fit_s']['min']:8.3f} "
        f"{f['compile_s']:9.1f} {it:10d}  (first call after compile: {f['first_fit_s']:.3f} s)",
        f"{'featcache one fit (C=%.3g)' % one['c']:34s} {one['fit_s']['median']:9.3f} {one['fit_s']['min']:8.3f} "
        f"{one['compile_s']:9.1f} {one['iterations']:10d}",
        f"{'sklearn loop (32 fits)':34s} {sk['seconds']['median']:9.3f} {sk['seconds']['min']:8.3f} "
        f"{'-':>9s} {sk_it:10d}",
        f"{'featcache sweep, 32 C side by side':34s} {side['fit_s']:9.3f} {'':8s} {side['compile_s']:9.1f} "
        f"{max(side['iterations']) * len(side['iterations']):10d}  (every C runs the slowest C's "
        f"{max(side['iterations'])} iterations)",
        f"sweep / one fit: {q['sweep_over_one_fit_median']:.1f}x (median), {q['sweep_over_one_fit_min']:.1f}x (min)"
        f"   [target <= 3x]",
        f"sklearn / sweep: {q['sklearn_over_sweep_median']:.1f}x (median), {q['sklearn_over_sweep_min']:.1f}x (min)"
        f"   [target >= 10x]",
        f"selected C: featcache {f['selected_c']:.4g} (val acc {q['selected_val_acc_featcache']:.4f}), "
        f"sklearn {sk['selected_c']:.4g} (val acc {q['selected_val_acc_sklearn']:.4f}): "
        f"{q['selected_val_acc_points_apart']:.2f} points apart [target <= 0.5]",
        f"val accuracy curves (32 C): median {q['val_acc_curve_median_points_apart']:.2f} points apart, "
        f"{q['val_acc_curve_cs_over_half_point']} C values over 0.5 points, worst "
        f"{q['val_acc_curve_max_points_apart']:.2f} at C={q['val_acc_curve_worst_c']:.3g}",
        f"profile: sweep = {it} L-BFGS iterations, {1e3 * f['fit_s']['min'] / it:.2f} ms each (min run); one fit = "
        f"{one['iterations']} iterations, {1e3 * one['fit_s']['min'] / one['iterations']:.2f} ms each; "
        f"sklearn = {sk_it} iterations, {1e3 * sk['seconds']['min'] / sk_it:.2f} ms each; one objective value + "
        f"gradient (all rows) {r['eval_ms']:.2f} ms, so an iteration is "
        f"{one['fit_s']['min'] / one['iterations'] / (r['eval_ms'] / 1e3):.1f} evaluations' worth (line search, "
        f"L-BFGS two-loop, loop control)",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", choices=("resnet18", "pixels"), default="resnet18")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--work", default="/tmp/featcache-probe-bench")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"probe-{a.features}-{os.cpu_count()}cores-cpu.json")
    load_before = list(os.getloadavg())
    splits, made = load_splits(a)
    result = measure(a, splits)
    q = ratios(result)
    text = render(result, q, made)
    print(text)

    import jax
    import sklearn

    from featcache.environment import library_versions

    doc = {"settings": vars(a), "data": made, "result": result, "ratios": q,
           "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
                       "jax_devices": [str(d) for d in jax.devices()], "load_avg_before": load_before,
                       "load_avg_after": list(os.getloadavg())},
           "versions": {**library_versions(), "scikit-learn": sklearn.__version__}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".txt").write_text(text + "\n")
    print(f"written {out} and {out.with_suffix('.txt')}")


if __name__ == "__main__":
    main()
