"""`featcache bench`'s tables: one result document as text (times, ratios, scaling), and two side by side."""

from __future__ import annotations

from featcache.bench.results import PATH_LABELS, med

GOAL_FRACTION_OF_THEORY = 0.85  # issue 6: classic / cached-cold >= 85 % of the theoretical ratio
GOAL_TORCH_OVER_JAX = 30.0  # issue 6: warm head-train >= 30x faster than the PyTorch head
GOAL_OVER_FP32_NCHW = 2.0  # issue 21: extraction at --precision auto >= 2x the float32 NCHW forward limit
TORCH_PATHS = ("classic", "extract", "forward", "finetune")  # the paths whose backbone runs at the bench's precision


def _console(file=None):
    from rich.console import Console

    return Console(width=176, record=True, file=file)


def _table(title: str, columns: tuple[str, ...], *, left: tuple[str, ...]):
    """A rich Table with these columns, the ones named in `left` left-justified, the others right."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def render(doc: dict) -> str:
    """The benchmark tables of one result document, as text."""
    import io

    console = _console(io.StringIO())
    console.print(_header(doc))
    console.print(_times_table(doc))
    console.print(_ratios_table(doc))
    console.print(_scaling_table(doc))
    return console.export_text()


def _times_table(doc: dict):
    """Per model and path: median wall time, its spread, the in-process time, images/s, classic ÷ path."""
    s = doc["settings"]
    times = _table(f"featcache bench: {s['epochs']} epochs, batch {s['batch_size']}, "
                   f"{'native crop' if not s['image_size'] else str(s['image_size']) + ' px'}, "
                   f"weights {s['weights']}, {s['device']}, median of {s['repeat']} "
                   f"(wall = whole process, start-up included)",
                   ("model", "path", "precision", "wall s", "min-max", "in-process s", "img/s", "to 1st batch s",
                    "after last s", "classic ÷ path"),
                   left=("model", "path", "precision"))
    for model, record in doc["models"].items():
        summ = record["summary"]
        classic = med(record["paths"]["classic"])
        for name, label in PATH_LABELS.items():
            if name not in record["paths"]:
                continue
            rec, entry = record["paths"][name], summ["paths"][name]
            inproc = _inproc_text(name, rec)
            rate = f"{entry['images_per_s']:.1f}" if "images_per_s" in entry else "-"
            note = "" if entry.get("complete", True) else " (stopped early!)"
            ratio = f"{classic / med(rec):.2f}x" if not label.startswith(" ") else ""
            first, last = (f"{med(rec, k):.2f}" if k in rec else "-" for k in ("to_first_batch_s", "after_last_batch_s"))
            arithmetic = record.get("precision", "fp32") if name in TORCH_PATHS else "-"
            times.add_row(model, label + note, arithmetic, f"{med(rec):.2f}",
                          f"{min(rec['wall_s']):.2f}-{max(rec['wall_s']):.2f}", inproc, rate, first, last, ratio)
            if name == "forward":
                for limit, text in _limit_rows(rec, summ["paths"]["forward"]["images"]):
                    times.add_row(model, f"    forward limit, {limit}", limit.split("_")[0], "", "", text[0],
                                  text[1], "", "", "")
        times.add_section()
    return times


def _limit_rows(rec: dict, images: int) -> list[tuple[str, tuple[str, str]]]:
    """(precision, (seconds, img/s)) of each forward limit the forward worker timed (newer results only)."""
    names = [k[:-2] for k in rec if k.endswith("_s") and k[:-2] in ("fp32_nchw", "fp32", "bf16")]
    return [(n, (f"{med(rec, n + '_s'):.2f}", f"{images / med(rec, n + '_s'):.1f}")) for n in names]


def _ratios_table(doc: dict):
    """Per model: the ratios of medians against their theoretical values and goals."""
    ratios = _table("Ratios (of medians)", ("model", "ratio", "value", "reference", "verdict"),
                    left=("model", "ratio", "reference"))
    for model, record in doc["models"].items():
        for row in _ratio_rows(doc, record):
            ratios.add_row(model, *row)
        ratios.add_section()
    return ratios


def _ratio_rows(doc: dict, record: dict) -> list[tuple[str, str, str, str]]:
    """(ratio, value, reference, verdict) rows of one model."""
    counts, e = doc["data"]["counts"], doc["settings"]["epochs"]
    r = record["summary"]["ratios"]
    theory = r["theoretical_classic_over_cold"]
    rows = [
        ("theoretical classic ÷ cached-cold", f"{theory:.2f}x",
         f"({e}·({counts['train']}+{counts['val']}) + {counts['test']}) / {doc['data']['n']}", ""),
        ("classic ÷ cached-cold (wall)", f"{r['classic_over_cold']:.2f}x",
         f"{100 * r['classic_over_cold_of_theory']:.0f} % of theoretical (goal ≥ 85 %)",
         _verdict(r["classic_over_cold_of_theory"] >= GOAL_FRACTION_OF_THEORY)),
        ("classic ÷ cached-cold (in-process)", f"{r['classic_over_cold_inproc']:.2f}x",
         f"{100 * r['classic_over_cold_inproc_of_theory']:.0f} % of theoretical", ""),
    ]
    if "torch_head_over_jax_warm" in r:  # older result files lack it
        rows.append(("PyTorch head ÷ JAX head (both warm, median of 3)", f"{r['torch_head_over_jax_warm']:.1f}x",
                     "goal ≥ 30x", _verdict(r["torch_head_over_jax_warm"] >= GOAL_TORCH_OVER_JAX)))
    rows += [
        ("PyTorch head ÷ head-train's program (1st run)", f"{r['torch_head_over_jax_train']:.1f}x",
         "train_s of path 3", ""),
        ("PyTorch head ÷ JAX head (compile + program)", f"{r['torch_head_over_jax_compile_train']:.2f}x",
         "JIT compile counted (path 3)", ""),
        ("extraction ÷ forward limit (images/s)", f"{100 * r['extract_over_forward']:.0f} %", "in-process", ""),
        *([("extraction ÷ fp32 NCHW forward limit (images/s)", f"{r['extract_over_fp32_nchw_forward']:.2f}x",
            f"goal ≥ {GOAL_OVER_FP32_NCHW:.0f}x (precision {record.get('precision', 'fp32')})",
            _verdict(r["extract_over_fp32_nchw_forward"] >= GOAL_OVER_FP32_NCHW)),
           ("forward limit ÷ fp32 NCHW forward limit", f"{r['forward_over_fp32_nchw_forward']:.2f}x", "", "")]
          if "extract_over_fp32_nchw_forward" in r else []),
        ("classic ÷ cached-warm (wall)", f"{r['classic_over_warm']:.1f}x", "", ""),
    ]
    if "finetune_over_cold" in r:
        rows.append(("full fine-tune ÷ cached-cold (wall)", f"{r['finetune_over_cold']:.1f}x", "", ""))
    fixed, fw = record["summary"]["fixed_s"], record["paths"]["forward"]
    rows.append(("fixed cost in cached-cold (wall - in-process)", f"{fixed['extract'] + fixed['head_cold']:.1f} s",
                 f"extract {fixed['extract']:.1f} s (torch+torchvision import {med(fw, 'import_s'):.1f} s, "
                 f"model build {med(fw, 'build_s'):.1f} s) + head-train {fixed['head_cold']:.1f} s; "
                 f"classic: {fixed['classic']:.1f} s", ""))
    return rows


def _scaling_table(doc: dict):
    """Per model: extraction at each image factor and head-train at each epoch count, with their growth."""
    scaling = _table("Scaling of the cached path (growth = time / time at the first point)",
                     ("model", "step", "size", "wall s", "in-process s", "growth (wall)", "growth (in-process)",
                      "ideal"), left=("model", "step"))
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
    return scaling


def _inproc_text(name: str, rec: dict) -> str:
    if name == "torch_head":
        return f"{med(rec, 'inproc_s'):.4f}"
    if name == "jax_head":
        return f"{med(rec, 'inproc_s'):.4f} (compile {med(rec, 'compile_s'):.2f})"
    if name in ("head_cold", "warm"):
        return (f"load {med(rec, 'load_s'):.2f} + compile {med(rec, 'compile_s'):.2f} "
                f"+ train {med(rec, 'train_s'):.3f}")
    return f"{med(rec, 'inproc_s'):.2f}"


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

    names = ("A", "B")
    console = _console(io.StringIO())
    for name, doc, source in zip(names, (a, b), sources):
        console.print(f"{name} = {source or '(result)'}: {doc['command'] or '(no command recorded)'}", highlight=False)
        console.print(_header(doc), highlight=False)
    table = _table(f"{names[1]} against {names[0]} (medians)",
                   ("model", "path / ratio", names[0], names[1], f"{names[1]} ÷ {names[0]}"),
                   left=("model", "path / ratio"))
    for model in [m for m in a["models"] if m in b["models"]]:
        ra, rb = a["models"][model], b["models"][model]
        for name, label in PATH_LABELS.items():
            if name in ra["paths"] and name in rb["paths"]:
                wa, wb = med(ra["paths"][name]), med(rb["paths"][name])
                table.add_row(model, label.strip() + " (wall s)", f"{wa:.2f}", f"{wb:.2f}", f"{wb / wa:.2f}")
        for key in ra["summary"]["ratios"]:
            if key in rb["summary"]["ratios"]:
                xa, xb = ra["summary"]["ratios"][key], rb["summary"]["ratios"][key]
                table.add_row(model, key, f"{xa:.3f}", f"{xb:.3f}", f"{xb / xa:.2f}")
        table.add_section()
    console.print(table)
    return console.export_text()
