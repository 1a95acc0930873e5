"""`featcache study`: backbones x modes x solvers x seeds as one resumable plan, run cheap first, one report.

plan.py (options or TOML -> the runs, checked before any starts; plan.toml written back), store.py (the study
folder: where each run lives, what finished), commands.py (one featcache command line per run, `--list`),
runner.py (extract -> heads -> frozen loops -> fine-tunes, resumed by key, live overview), report.py and
figures.py (report.md / report.html / report.csv / report.json and their figures).
"""
