"""A one-line live progress display on stderr for the long ``tvmrt bench`` runs.

``Progress(enabled)`` shows nothing unless ``enabled`` is true *and* stderr is a tty
(``--json`` runs pass ``enabled=False``).  :meth:`show` rewrites the line (``\\r`` and
erase-to-end-of-line, no dependency): what is running, its round, calls done / total
and the elapsed time; :meth:`clear` erases it (call it before printing anything else).

While a line is shown a daemon thread redraws it twice a second, so that the elapsed
time moves during a long block, adding ``poll()`` to the calls done when the caller set
:attr:`poll` (e.g. a count an enclave writes as it goes).  Use it as a context manager:
on exit, also on error paths, the thread stops and the line is erased.
"""
from __future__ import annotations

import sys
import threading
import time

TICK = 0.5                      # seconds between redraws of the same line
#: held while a line is written, and by the bench around every fork: a child is never
#: forked while the thread is inside a write to stderr (whose lock it would inherit held)
LOCK = threading.Lock()


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
        self.poll = None        # () -> calls done so far in the current block, or None
        self._shown = False
        self._last: tuple | None = None
        self._lock = LOCK
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def show(self, what: str, rnd: str = "", done: int | None = None,
             total: int | None = None, unit: str = "calls") -> None:
        """Rewrite the line: ``what`` [``rnd``], ``done``/``total`` ``unit``, elapsed
        seconds (``done``/``total`` default to the run's counters, :attr:`done` plus
        what :attr:`poll` says, and :attr:`total`)."""
        if not self.enabled:
            return
        with self._lock:
            self._last = (what, rnd, done, total, unit)
            self._draw()
            self._shown = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._tick, name="progress",
                                            daemon=True)
            self._thread.start()

    def _draw(self) -> None:
        assert self._last is not None
        what, rnd, done, total, unit = self._last
        if done is None:
            done = self.done
            poll = self.poll
            if poll is not None:
                try:
                    done += poll()
                except Exception:       # the block just ended: its count is gone
                    pass
        total = self.total if total is None else total
        parts = [what]
        if rnd:
            parts.append(rnd)
        if total:
            parts.append(f"{min(done, total)}/{total} {unit}")
        parts.append(f"{time.monotonic() - self.t0:.1f} s")
        line = " | ".join(parts)[:100]
        self.stream.write(f"\r\033[K{line}")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                if self._shown and self._last is not None:
                    try:
                        self._draw()
                    except (OSError, ValueError):   # stderr closed under us
                        return

    def next_phase(self) -> None:
        """The next part of a run counts its own calls from zero."""
        self.done = 0
        self.total = 0
        self.poll = None

    def clear(self) -> None:
        """Erase the line (the thread does not redraw it until the next :meth:`show`)."""
        with self._lock:
            if self.enabled and self._shown:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._shown = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.clear()
