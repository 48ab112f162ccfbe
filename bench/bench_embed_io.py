"""Embedding store round trip: Python lists (the evaluation cache before) vs Arrow buffers.

Writes and reads an ``EMBEDDINGS`` artifact of N x H vectors (``io.write`` / ``io.read``, as
the evaluation cache and ``mmemb embed`` do) two ways, alternating in one process so the
ratio is not a machine-load artifact:

* ``lists``: the earlier code path: each row's vector made a Python list (``tolist``), the
  rows conformed to a ``list<float>`` column, and read back through ``to_pylist`` into an
  [N, H] array, row by row;
* ``arrow``: this release's: the [N, H] array as one ``fixed_size_list<float32, H>`` column
  (:func:`mmemb.eval.harness.embedding_table`) read back as a view
  (:func:`mmemb.eval.harness.read_vectors`); ``--dtype float16`` stores half the bytes.

    python bench/bench_embed_io.py [--n 5000] [--dim 1536] [--repeats 3] [--dtype float32]

It prints the in-memory conversion alone (rows -> table -> [N, H], the part lists made
slow) and the artifact round trip; the last line is
``embed_io: lists=X s arrow=Y s ratio=R`` (artifact write + read, best of repeats; both
ways also pay Parquet's zstd and the sha256 digests of the artifact folder).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data_contracts import io  # noqa: E402
from data_contracts.schemas import EMBEDDINGS  # noqa: E402
from data_contracts.vectors import matrix, vector_array  # noqa: E402
from mmemb.eval.harness import embedding_table, read_vectors  # noqa: E402


def _rows(n: int) -> list[dict]:
    return [{"id": f"i{k}", "task": "t", "side": "candidate", "mode": "direct",
             "reasoned": False, "rationale": None, "n_prompt_tokens": 12, "n_gen_tokens": 0,
             "latency_ms": 1.0, "status": "ok", "error": None, "p_think": None}
            for k in range(n)]


def lists_round_trip(vecs: np.ndarray, path: Path) -> tuple[float, float, np.ndarray]:
    """The earlier path: vectors as Python lists in and out."""
    t0 = time.perf_counter()
    rows = _rows(len(vecs))
    for r, v in zip(rows, vecs, strict=True):
        r["embedding"] = v.tolist()
    io.write(io.conform(rows, EMBEDDINGS), path, EMBEDDINGS)
    t1 = time.perf_counter()
    table = io.read(path, EMBEDDINGS)
    got = table.column("embedding").to_pylist()
    out = np.zeros((len(got), len(got[0])), np.float32)  # [N, H]
    for k, v in enumerate(got):
        out[k] = v
    return t1 - t0, time.perf_counter() - t1, out


def arrow_round_trip(vecs: np.ndarray, path: Path, dtype: str
                     ) -> tuple[float, float, np.ndarray]:
    """This release's path: one fixed-size-list column, read as an [N, H] view."""
    t0 = time.perf_counter()
    io.write(embedding_table(_rows(len(vecs)), vecs, dtype), path, EMBEDDINGS)
    t1 = time.perf_counter()
    out = read_vectors(io.read(path, EMBEDDINGS))  # [N, H]
    return t1 - t0, time.perf_counter() - t1, out


def convert(vecs: np.ndarray, dtype: str) -> tuple[float, float]:
    """In memory only (no Parquet, no digests): vectors -> table -> [N, H], both ways."""
    t0 = time.perf_counter()
    rows = _rows(len(vecs))
    for r, v in zip(rows, vecs, strict=True):
        r["embedding"] = v.tolist()
    got = io.conform(rows, EMBEDDINGS).column("embedding").to_pylist()
    out = np.zeros((len(got), len(got[0])), np.float32)  # [N, H]
    for k, v in enumerate(got):
        out[k] = v
    t1 = time.perf_counter()
    read_vectors(embedding_table(_rows(len(vecs)), vecs, dtype))  # [N, H]
    t2 = time.perf_counter()
    matrix(vector_array(vecs, dtype), np.float32)  # [N, H]: the vectors alone
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((a.n, a.dim)).astype(np.float32)  # [N, H]
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_io_"))
    best = {"lists": (np.inf, np.inf), "arrow": (np.inf, np.inf)}
    conv = [convert(vecs, a.dtype) for _ in range(a.repeats)]
    cl, ca, cv = (min(c[i] for c in conv) for i in range(3))
    print(f"in memory (rows -> table -> [N, H]): lists {cl:.3f} s, arrow {ca:.4f} s "
          f"(ratio {cl / ca:.0f}x), of which the vectors {cv:.5f} s (the rest: the metadata "
          "columns)", flush=True)
    try:
        for r in range(a.repeats):
            for name in ("lists", "arrow"):
                path = tmp / f"{name}-{r}"
                w, rd, got = (lists_round_trip(vecs, path) if name == "lists"
                              else arrow_round_trip(vecs, path, a.dtype))
                tol = 1e-3 if name == "arrow" and a.dtype == "float16" else 0
                np.testing.assert_allclose(got, vecs, rtol=0, atol=tol)
                if w + rd < sum(best[name]):
                    best[name] = (w, rd)
                size = sum(f.stat().st_size for f in path.iterdir())
                print(f"repeat {r} {name}: write {w:.3f} s, read {rd:.3f} s, "
                      f"{size / 2**20:.1f} MiB", flush=True)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lw, lr = best["lists"]
    aw, ar = best["arrow"]
    print(f"{a.n} x {a.dim} vectors ({a.dtype} for arrow), best of {a.repeats}: "
          f"lists write {lw:.3f} s read {lr:.3f} s; arrow write {aw:.4f} s read {ar:.4f} s "
          f"(read ratio {lr / ar:.0f}x)")
    print(f"embed_io: lists={lw + lr:.3f} s arrow={aw + ar:.3f} s "
          f"ratio={(lw + lr) / (aw + ar):.1f}")


if __name__ == "__main__":
    main()
