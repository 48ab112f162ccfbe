"""Global ranking: mmemb.eval.ranking.topk (chunked matmul + running top-k) vs the full
[queries, candidates] matrix + argpartition, time and peak memory (tracemalloc; numpy
reports its buffers to it), alternating in one process.

    python bench/bench_rank_memory.py [--queries 5000] [--cands 20000] [--dim 256] [--k 10]

The last line is ``rank: full=X s Y MB topk=X s Y MB time_ratio=R memory_ratio=M``.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mmemb.eval.ranking import topk  # noqa: E402


def full(q: np.ndarray, c: np.ndarray, k: int) -> np.ndarray:
    sim = q @ c.T  # [Q, C]
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]  # [Q, k] unordered
    order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def measure(fn) -> tuple[float, float, np.ndarray]:
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return dt, peak, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=5000)
    ap.add_argument("--cands", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    q = rng.standard_normal((a.queries, a.dim)).astype(np.float32)  # [Q, H]
    c = rng.standard_normal((a.cands, a.dim)).astype(np.float32)  # [C, H]
    best = {"full": (np.inf, 0.0), "topk": (np.inf, 0.0)}
    for r in range(a.repeats):
        got = {}
        for name, fn in (("full", lambda: full(q, c, a.k)), ("topk", lambda: topk(q, c, a.k)[1])):
            dt, peak, got[name] = measure(fn)
            print(f"repeat {r} {name}: {dt:.2f} s, peak {peak:.0f} MB", flush=True)
            best[name] = (min(best[name][0], dt), peak)
        same = float((got["full"] == got["topk"]).mean())
        print(f"repeat {r}: indices equal for {100 * same:.2f}% of (query, rank)")
    (ft, fm), (tt, tm) = best["full"], best["topk"]
    print(f"rank: full={ft:.2f} s {fm:.0f} MB topk={tt:.2f} s {tm:.0f} MB "
          f"time_ratio={ft / tt:.2f} memory_ratio={fm / tm:.1f}")


if __name__ == "__main__":
    main()
