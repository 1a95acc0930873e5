"""The set-up is clone-safe: every clone runs and tests its own code, and none depends on another clone.

`make venv` keeps the dependencies (torch, jax, ...) in one shared environment outside the clones and
gives each clone a small .venv of its own with its own editable featcache (see the Makefile).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import featcache

ROOT = Path(__file__).resolve().parents[1]
WHERE = "import featcache, pathlib; print(pathlib.Path(featcache.__file__).resolve().parent.parent)"


def test_this_process_and_its_subprocesses_import_this_clones_featcache():
    assert Path(featcache.__file__).resolve().parent.parent == ROOT
    # A subprocess started from another folder finds the same package (not another clone's).
    out = subprocess.run([sys.executable, "-c", WHERE], capture_output=True, text=True, check=True,
                         cwd="/", timeout=60)
    assert Path(out.stdout.strip()) == ROOT


def _make(clone: Path, *targets: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    return subprocess.run(["make", "-s", *targets], cwd=clone, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".git").exists(), reason="needs make and a git clone")
def test_a_second_clone_runs_its_own_code_after_the_first_clone_is_deleted(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(first)], check=True, timeout=120)
    subprocess.run(["git", "clone", "-q", str(first), str(second)], check=True, timeout=120)
    for clone in (first, second):
        done = _make(clone, "venv")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    # Mark the second clone's code so that running it is visible.
    (second / "featcache" / "__init__.py").open("a").write("\nCLONE_MARK = 'second'\n")
    shutil.rmtree(first)
    probe = WHERE + "; print(getattr(featcache, 'CLONE_MARK', None))"
    out = subprocess.run([str(second / ".venv" / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(second.resolve()), "second"]
    # The console script of the second clone runs the second clone's code too.
    cli = subprocess.run([str(second / ".venv" / "bin" / "featcache"), "--version"], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0 and "version" in cli.stdout, cli.stderr[-2000:]
    # `make venv` again is a no-op, and the dependencies were never installed into the clone itself.
    before = (second / ".venv" / "pyvenv.cfg").stat().st_mtime_ns
    again = _make(second, "venv")
    assert again.returncode == 0 and (second / ".venv" / "pyvenv.cfg").stat().st_mtime_ns == before
    assert not list((second / ".venv").glob("lib/python*/site-packages/torch"))
