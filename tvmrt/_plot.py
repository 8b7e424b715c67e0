"""``tvmrt bench --plot FILE.png``: call latency against region size, loaning vs copying.

Its own sweep over region sizes (:data:`SIZES`; ``--quick``: up to 64 MiB, few calls),
three figures per size, medians:

* ``loan_touch``      tvmrt call loaning the region, every page written by the caller
                      before the call (not timed) and read and written by the server
                      inside it (as ``loan_64m`` of :mod:`tvmrt.bench`);
* ``loan_untouched``  tvmrt call loaning the region, no page touched by either side;
* ``copy``            the bytes through an AF_UNIX stream socket to a server process
                      and back, both sides touching every page (``copy_64m``'s floor).

The copy floors run first, with no tvmrt process alive, then one embedded monitor runs
the loans.  Drawn log-log with matplotlib's Agg backend (an optional extra: ``pip
install 'tvmrt[plot]'``; without it :func:`require` raises BenchError before anything
runs).
"""
from __future__ import annotations

import gc
import os
import statistics

from . import bench

KiB, MiB = bench.KiB, bench.MiB
SIZES = (4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB, 256 * MiB)
QUICK_SIZES = SIZES[:-1]
SERIES = {"loan_touch": "tvmrt loan, both touch every page",
          "loan_untouched": "tvmrt loan, untouched",
          "copy": "socket copy both ways (floor)"}


def require(path: str | None = None) -> None:
    """Raise BenchError (saying how to install it) if matplotlib is missing, or if
    ``path``'s directory does not exist (checked before a sweep, not after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise bench.BenchError("--plot needs matplotlib: pip install 'tvmrt[plot]'") \
            from None
    if path is not None and not os.path.isdir(os.path.dirname(path) or "."):
        raise bench.BenchError(f"--plot {path}: no such directory")


def _calls(size: int, quick: bool) -> tuple[int, int]:
    """(measured calls, warm-up calls) at ``size``."""
    if size <= MiB:
        return (20, 5) if quick else (300, 20)
    return (2, 1) if quick else (8, 1)


def _label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def sweep(quick: bool = False, sandbox: bool = True, progress=None) -> dict:
    """Measure every series at every size; {"sizes": [...], series: [median µs, ...],
    "calls": [...]}.  Every process it starts is gone when it returns or raises."""
    sizes = QUICK_SIZES if quick else SIZES
    plan = [_calls(s, quick) for s in sizes]
    res: dict = {"sizes": list(sizes), "calls": [n for n, _w in plan]}
    if progress is not None:
        progress.total = 3 * sum(n + w for n, w in plan)

    tvm = None

    def timed(key, size, fn, n, warm):
        if progress is not None:
            progress.poll = tvm.live_done if tvm is not None else None
            progress.show(f"plot: {SERIES[key]}, {_label(size)}")
        gc.collect()
        gc.disable()
        try:
            xs = fn(n + warm, warm)[0][warm:]
        finally:
            gc.enable()
        if progress is not None:
            progress.poll = None
            progress.done += n + warm
        res.setdefault(key, []).append(statistics.median(xs) / 1000)

    floors = bench.Floors()             # nothing started: each copy server on demand
    try:
        for size, (n, warm) in zip(sizes, plan, strict=True):
            timed("copy", size, lambda k, w, s=size: floors.copy_block(s, k, w), n, warm)
            floors.drop_copy(size)
    finally:
        floors.stop()
    tvm = bench.Tvm(max(n + w for n, w in plan), sandbox=sandbox)
    try:
        tvm.start()
        for size, (n, warm) in zip(sizes, plan, strict=True):
            for key, mode in (("loan_touch", bench.TOUCH_ALL),
                              ("loan_untouched", bench.UNTOUCHED)):
                timed(key, size, lambda k, w, s=size, m=mode: tvm.calls(m, s, k, w),
                      n, warm)
    finally:
        tvm.stop()
    return res


def draw(res: dict, path: str) -> None:
    """Write the figure of :func:`sweep`'s result to ``path`` (PNG)."""
    require()
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), dpi=110)
    ax = fig.add_subplot()
    for key, label in SERIES.items():
        ax.plot(res["sizes"], res[key], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(res["sizes"], [_label(s) for s in res["sizes"]])
    ax.set_xlabel("region size")
    ax.set_ylabel("median call latency (µs)")
    ax.set_title("tvmrt bench: loaning vs copying (" + bench.placement() + ")")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def format_table(res: dict) -> str:
    lines = [f"{'size':>8} {'calls':>6} " + " ".join(f"{k + ' µs':>18}" for k in SERIES)]
    for i, size in enumerate(res["sizes"]):
        lines.append(f"{_label(size):>8} {res['calls'][i]:>6} " +
                     " ".join(f"{res[k][i]:>18.1f}" for k in SERIES))
    return "\n".join(lines)
