"""Every command block of README.md and docs/*.md runs, as written, on the demo data: the documentation cannot rot.

The pages are run in reading order (README.md, then the pages in the order docs/README.md links them, then any
other docs/*.md by name), their ```sh / ```bash / ```python blocks in file order, all in ONE scratch folder where
`featcache demo-data demo --image-size 32` has been run: a later block may use the caches and runs of an earlier
one. A block preceded by `<!-- docs-test: skip (reason) -->` is not run; the reason is required and printed.

Speed: each `featcache ...` call inside a shell block runs IN THIS PROCESS (click's CliRunner on featcache.cli's
group) instead of starting python, torch and jax again: the scratch folder's bin/featcache on PATH is a small
client that sends its arguments and working directory over a Unix socket to this test, which runs them in its
main thread (signal handlers need it) and sends back the output and exit code. So pipes, `&&`, `$(...)`, globs and
variables keep their bash meaning. ```python blocks are exec'd in this process with the scratch folder as the
working directory.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250  # the README is a door, not a manual
RUN_LANGUAGES = {"sh", "bash", "python"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: where it is, its language, its text and, if skipped, why."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    skip_reason: str | None

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """README.md, then docs/*.md in the order docs/README.md (or docs/index.md) links them, then the rest by name."""
    found = sorted(DOCS.glob("*.md")) if DOCS.is_dir() else []
    index = next((p for p in (DOCS / "README.md", DOCS / "index.md") if p.exists()), None)
    ordered = [index] if index else []
    if index:
        for name in re.findall(r"\]\(([\w.-]+\.md)(?:#[\w-]*)?\)", index.read_text()):
            page = DOCS / name
            if page.exists() and page not in ordered:
                ordered.append(page)
    return [README] + ordered + [p for p in found if p not in ordered]


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown page (any language), with the skip marker right before each, if any."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, ticks, language = match.groups()
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip() == ticks and lines[j].startswith(indent)), None)
        if end is None:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a code fence that is never closed")
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = SKIP.search(previous)
        reason = marker.group(1).strip().strip("()").strip() if marker else None
        if marker and not reason:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i}: a docs-test skip marker without a reason; "
                                 "write <!-- docs-test: skip (why it cannot run here) -->")
        body = textwrap.dedent("\n".join(line[len(indent):] if line.startswith(indent) else line
                                         for line in lines[i + 1:end]))
        blocks.append(Block(path, i + 1, language.lower(), body + "\n", reason))
        i = end + 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [b for page in pages() for b in blocks_of(page) if b.language in RUN_LANGUAGES]


# --------------------------------------------------------------------------- in-process featcache for bash

CLIENT = r'''
import os, socket, struct, sys
def send(sock, data):
    sock.sendall(struct.pack("!I", len(data)) + data)
def recv(sock):
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            sys.exit("featcache docs shim: the test went away")
        head += chunk
    size, data = struct.unpack("!I", head)[0], b""
    while len(data) < size:
        data += sock.recv(size - len(data))
    return data
sock = socket.socket(socket.AF_UNIX)
sock.connect(os.environ["FEATCACHE_DOCS_SOCKET"])
send(sock, os.getcwd().encode())
send(sock, b"\0".join(a.encode() for a in sys.argv[1:]))
out, err, code = recv(sock), recv(sock), int(recv(sock))
sys.stdout.buffer.write(out); sys.stdout.flush()
sys.stderr.buffer.write(err); sys.stderr.flush()
sys.exit(code)
'''


def _send(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack("!I", len(data)) + data)


def _recv(conn: socket.socket) -> bytes:
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            raise ConnectionError("the featcache shim closed the connection")
        head += chunk
    size, data = struct.unpack("!I", head)[0], b""
    while len(data) < size:
        data += conn.recv(size - len(data))
    return data


def run_featcache(args: list[str], cwd: str) -> tuple[bytes, bytes, int]:
    """`featcache ARGS` in this process, in `cwd`: stdout, stderr, exit code (a traceback is printed, code 1)."""
    from click.testing import CliRunner

    from featcache.cli import cli

    before = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(cli, args, prog_name="featcache", catch_exceptions=True)
    finally:
        os.chdir(before)
    err = result.stderr_bytes or b""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        err += "".join(traceback.format_exception(*result.exc_info)).encode()
    return result.stdout_bytes, err, result.exit_code


class Shell:
    """Runs bash blocks with `featcache` on PATH answered in-process (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = folder
        bin_dir = folder.parent / f"{folder.name}-bin"
        bin_dir.mkdir()
        shim = bin_dir / "featcache"
        shim.write_text(f"#!{sys.executable} -S\n{CLIENT}")
        shim.chmod(0o755)
        self.socket_dir = tempfile.mkdtemp(prefix="fcdocs-")  # short: a Unix socket path holds at most 107 bytes
        self.socket_path = os.path.join(self.socket_dir, "featcache.sock")
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.socket_path)
        self.server.listen()
        venv_bin = str(Path(sys.executable).parent)
        self.env = dict(os.environ, FEATCACHE_DOCS_SOCKET=self.socket_path, MPLBACKEND="Agg",
                        PATH=os.pathsep.join([str(bin_dir), venv_bin, os.environ.get("PATH", "")]))
        self.calls = 0

    def run(self, script: str, first_line: int = 0) -> tuple[int, str]:
        """Run `script` with bash -e in the folder, tracing each command with its page line; code and output."""
        # PS4 is set in the script (bash ignores it in the environment when run as root): lines 1-2
        script = f"PS4='+ [line $((LINENO + {first_line - 2}))] '\nset -x\n{script}"
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.folder, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        chunks: list[bytes] = []
        selector = selectors.DefaultSelector()
        selector.register(self.server, selectors.EVENT_READ, "call")
        selector.register(proc.stdout, selectors.EVENT_READ, "output")
        deadline = time.monotonic() + BLOCK_TIMEOUT_S
        open_output = True
        while open_output or proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                chunks.append(f"\n[killed after {BLOCK_TIMEOUT_S} s]\n".encode())
                break
            for key, _ in selector.select(timeout=0.1):
                if key.data == "output":
                    data = os.read(proc.stdout.fileno(), 65536)
                    if not data:
                        selector.unregister(proc.stdout)
                        open_output = False
                    chunks.append(data)
                else:
                    self._answer()
        proc.wait()
        selector.close()
        return proc.returncode, b"".join(chunks).decode(errors="replace")

    def _answer(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            cwd = _recv(conn).decode()
            raw = _recv(conn)
            args = [a.decode() for a in raw.split(b"\0")] if raw else []
            out, err, code = run_featcache(args, cwd)
            self.calls += 1
            _send(conn, out)
            _send(conn, err)
            _send(conn, str(code).encode())

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def run_python(block: Block, folder: Path) -> tuple[int, str]:
    """Exec a ```python block in a fresh namespace with `folder` as the working directory."""
    before, output = os.getcwd(), io.StringIO()
    os.chdir(folder)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            exec(compile(block.text, block.where(), "exec"), {"__name__": "__docs__"})
        return 0, output.getvalue()
    except BaseException:  # noqa: BLE001 - any failure of the block is the test's failure, shown with its output
        return 1, output.getvalue() + traceback.format_exc()
    finally:
        os.chdir(before)


# --------------------------------------------------------------------------- the tests


def test_readme_is_a_door():
    """README.md stays short, and its first screen (60 lines) has set-up and the own-data commands."""
    lines = README.read_text().splitlines()
    assert len(lines) < README_MAX_LINES, (f"README.md has {len(lines)} lines; keep it under {README_MAX_LINES} "
                                           "and move reference material into docs/")
    first_screen = "\n".join(lines[:60])
    for needed in ("make demo", "make test", "featcache extract", "featcache head-train", "featcache finetune",
                   "featcache report", "docs/"):
        assert needed in first_screen, f"`{needed}` is not in the first 60 lines of README.md"
    assert not re.search(r"-[0-9a-f]{12}\.h5", README.read_text()), "README.md names a cache by its key hash"


def test_collector_reads_markers_and_indented_blocks(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("text\n\n<!-- docs-test: skip (needs a GPU) -->\n```sh\nfeatcache x\n```\n"
                    "* item:\n\n  ```python\n  print(1)\n  ```\n```text\nout\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    got = [(b.line, b.language, b.text, b.skip_reason) for b in blocks_of(page)]
    assert got == [(4, "sh", "featcache x\n", "needs a GPU"), (9, "python", "print(1)\n", None),
                   (12, "text", "out\n", None)]
    page.write_text("<!-- docs-test: skip -->\n```sh\nfeatcache x\n```\n")
    with pytest.raises(AssertionError, match="without a reason"):
        blocks_of(page)


def test_every_page_is_reachable_from_the_index():
    """Every docs page is linked from docs/README.md, and every page README.md links exists."""
    index = DOCS / "README.md"
    assert index.exists(), "docs/README.md (the index of the reference pages) is missing"
    linked = set(re.findall(r"\]\(([\w.-]+\.md)", index.read_text()))
    unlinked = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.name not in linked)
    assert not unlinked, f"docs pages not linked from docs/README.md: {unlinked}"


def test_every_command_block_runs(tmp_path_factory, capsys):
    """The blocks of all pages, in reading order, in one scratch folder with the demo data."""
    blocks = runnable_blocks()
    assert any(b.path == README for b in blocks) and any(b.path.parent == DOCS for b in blocks)
    folder = tmp_path_factory.mktemp("docs") / "scratch"
    folder.mkdir()
    shell = Shell(folder)
    timings = []
    try:
        code, output = shell.run("featcache demo-data demo --image-size 32")
        assert code == 0, output
        for block in blocks:
            if block.skip_reason:
                timings.append((block.where(), f"skipped: {block.skip_reason}"))
                continue
            start = time.perf_counter()
            if block.language == "python":
                code, output = run_python(block, folder)
            else:
                code, output = shell.run(block.text, block.line)
            timings.append((block.where(), f"{time.perf_counter() - start:.1f} s"))
            assert code == 0, (f"{block.where()} ({block.language} block) failed with exit code {code}.\n"
                               f"--- block ---\n{block.text}--- output ---\n{output[-6000:]}")
    finally:
        shell.close()
        with capsys.disabled():
            print(f"\ndocs blocks ({shell.calls} featcache calls in-process):")
            for where, what in timings:
                print(f"  {where:32s} {what}")


def test_shell_runs_featcache_in_process_and_names_the_failing_line(tmp_path):
    """`featcache` in a bash block is answered by this process; a failure names the page line and command."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    shell = Shell(folder)
    try:
        code, output = shell.run("featcache --version | grep -c featcache\n", first_line=10)
        assert (code, output.splitlines()[-1], shell.calls) == (0, "1", 1), output
        code, output = shell.run("featcache models > models.txt\nfeatcache head-train --epochs 0\necho not reached\n",
                                 first_line=20)
    finally:
        shell.close()
    assert code == 2 and "not reached" not in output, output
    assert "+ [line 22] featcache head-train --epochs 0" in output, output  # fence at 20: commands at 21, 22
    assert "Error: " in output and "resnet18" in (folder / "models.txt").read_text()
