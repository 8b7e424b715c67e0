"""Compare trees (checkouts with their own ``.venv``) by running ``tvmrt bench --json``
alternately, a fresh bench per run, and taking the median of each row's ratio.

    python tools/bench_pairs.py PAIRS [--pin] [--calls N] TREE [TREE ...]

One run of the bench carries a bias of its own (where its processes' memory lands in the
caches: +-15% on this VM), so a before/after comparison needs many fresh runs in
alternation, in a random order per pair; ``--pin`` runs each under ``taskset -c 0``.
Prints, per tree and row, the median of the runs' medians and p99s (µs) and the median
and quartiles of the ratios to the floor measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pairs", type=int)
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--pin", action="store_true", help="taskset -c 0 every run")
    ap.add_argument("--calls", type=int, default=4000)
    ns = ap.parse_args()
    rows: dict[str, dict[str, list[dict]]] = {t: {} for t in ns.trees}
    for i in range(ns.pairs):
        order = list(ns.trees)
        random.Random(i).shuffle(order)
        for tree in order:
            cmd = (["taskset", "-c", "0"] if ns.pin else []) + [
                os.path.join(tree, ".venv", "bin", "tvmrt"), "bench", "--calls",
                str(ns.calls), "--json"]
            out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True,
                                 timeout=900)
            for r in json.loads(out.stdout)["rows"]:
                rows[tree].setdefault(r["config"], []).append(r)
    where = "pinned (taskset -c 0)" if ns.pin else "unpinned"
    print(f"{ns.pairs} runs per tree, --calls {ns.calls}, {where}")
    for tree in ns.trees:
        print(tree)
        for k, rs in rows[tree].items():
            med = statistics.median(r["median_us"] for r in rs)
            p99 = statistics.median(r["p99_us"] for r in rs)
            ratios = [r["ratio"] for r in rs if r["ratio"] is not None]
            text = ""
            if len(ratios) >= 2:
                q = statistics.quantiles(ratios, n=4)
                text = (f"ratio median {statistics.median(ratios):.3f} "
                        f"(quartiles {q[0]:.3f}-{q[2]:.3f})")
            print(f"  {k:12s} median {med:9.1f} µs  p99 {p99:9.1f} µs  {text}")


if __name__ == "__main__":
    main()
