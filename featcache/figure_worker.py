"""A run's figures drawn off its critical path: a child process imports matplotlib while the parent fits, then
draws what it is sent; the parent waits for it before it marks the run finished (metrics.json last).

    figures = FigureWorker.start()      # at the start of head-train: the child begins importing matplotlib
    ...                                 # load the cache, compile, train (the parent's work)
    figures.call(plot_curves, history, run_dir / "curves.png", title=...)   # picklable function + arguments
    figures.wait()                      # every figure is written (or the child's error is raised here)

A call whose function or arguments cannot be pickled (a lambda) is drawn in this process, and so is every call
when the child could not start: the figures are the same either way, only where they are drawn differs.
Run as `python -m featcache.figure_worker` it is the child: it reads (function, args, kwargs) tuples from stdin
until EOF and calls each. Core layer: stdlib only; the child imports featcache.plots' matplotlib.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Callable

CHILD_ENV = {"MPLBACKEND": "Agg"}  # no display probing in the child
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child imports this featcache


class FigureWorker:
    """The child process that draws a run's figures; `call` sends one, `wait` waits for all of them."""

    def __init__(self, process: subprocess.Popen | None):
        self._process = process
        self.drawn_here = 0  # calls that could not be sent and were drawn in this process

    @classmethod
    def start(cls) -> "FigureWorker":
        """Start the child (it imports matplotlib at once); a worker drawing in this process if it cannot start."""
        try:
            process = subprocess.Popen([sys.executable, "-m", "featcache.figure_worker"], stdin=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=_child_env())
        except OSError:
            process = None
        return cls(process)

    @classmethod
    def here(cls) -> "FigureWorker":
        """A worker that draws every call in this process (no child)."""
        return cls(None)

    def call(self, draw: Callable, *args, **kwargs) -> None:
        """draw(*args, **kwargs) in the child (or here, when it cannot be sent)."""
        if self._process is not None and self._process.poll() is None:
            try:
                payload = pickle.dumps((draw, args, kwargs))
            except (pickle.PicklingError, AttributeError, TypeError):
                payload = None
            if payload is not None:
                try:
                    self._process.stdin.write(len(payload).to_bytes(8, "little") + payload)
                    self._process.stdin.flush()
                    return
                except (BrokenPipeError, OSError):
                    pass  # the child died: wait() reports why; this figure is drawn here
        self.drawn_here += 1
        draw(*args, **kwargs)

    def wait(self) -> None:
        """Block until the child has drawn everything it was sent; its error (if any) is raised here."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
        except OSError:
            pass
        err = process.stderr.read()
        process.stderr.close()
        process.wait()
        if process.returncode != 0:
            raise _child_error(err, process.returncode)

    def close(self) -> None:
        """End the child without waiting for figures (the run failed before it had any to draw)."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for pipe in (process.stdin, process.stderr):
                try:
                    pipe.close()
                except OSError:
                    pass

    def __enter__(self) -> "FigureWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _child_env() -> dict:
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **CHILD_ENV, "PYTHONPATH": path}


def _serve(stream) -> None:
    """The child: import matplotlib now, then call every (function, args, kwargs) read from `stream` until EOF."""
    import importlib

    for module in ("featcache.plots", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        importlib.import_module(module)  # what the calls use: the import the parent does not wait for

    while header := stream.read(8):
        draw, args, kwargs = pickle.loads(stream.read(int.from_bytes(header, "little")))
        try:
            draw(*args, **kwargs)
        except Exception as exc:  # sent to the parent, which raises it as if it had drawn the figure itself
            try:
                payload = pickle.dumps(exc)
            except Exception:
                raise exc from None
            sys.stderr.buffer.write(ERROR_MARK + payload.hex().encode() + b"\n")
            sys.stderr.flush()
            sys.exit(1)


ERROR_MARK = b"featcache-figure-error:"  # the child's last stderr line: its exception, pickled, in hex


def _child_error(err: bytes, returncode: int) -> BaseException:
    """The exception the child raised (a NoSpaceError stays one, so the CLI gives its exit code and message);
    a RuntimeError with its last stderr line when it died otherwise."""
    lines = err.strip().splitlines()
    if lines and lines[-1].startswith(ERROR_MARK):
        try:
            return pickle.loads(bytes.fromhex(lines[-1][len(ERROR_MARK):].decode()))
        except Exception:
            pass
    last = lines[-1].decode(errors="replace") if lines else returncode
    return RuntimeError(f"drawing the run's figures failed: {last}")


if __name__ == "__main__":
    _serve(sys.stdin.buffer)
