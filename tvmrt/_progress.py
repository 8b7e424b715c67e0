"""A one-line live progress display on stderr for the long ``tvmrt bench`` runs.

``Progress(enabled)`` shows nothing unless ``enabled`` is true *and* stderr is a tty
(``--json`` runs pass ``enabled=False``).  :meth:`show` rewrites the line (``\\r`` and
erase-to-end-of-line, no dependency): what is running, its round, calls done / total
and the elapsed time; :meth:`clear` erases it (call it before printing results, also on
error paths: the object is a context manager that clears on exit).
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        self.enabled = bool(enabled and tty)
        self.t0 = time.monotonic()
        self.done = 0           # calls (or items) done so far, over the whole run
        self.total = 0          # calls (or items) planned for the whole run
        self._shown = False

    def show(self, what: str, rnd: str = "", done: int | None = None,
             total: int | None = None, unit: str = "calls") -> None:
        """Rewrite the line: ``what`` [``rnd``], ``done``/``total`` ``unit``, elapsed
        seconds (``done``/``total`` default to the run's counters)."""
        if not self.enabled:
            return
        done = self.done if done is None else done
        total = self.total if total is None else total
        parts = [what]
        if rnd:
            parts.append(rnd)
        if total:
            parts.append(f"{done}/{total} {unit}")
        parts.append(f"{time.monotonic() - self.t0:.1f} s")
        cols = 100
        line = " | ".join(parts)[:cols]
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()
