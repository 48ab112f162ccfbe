"""The evaluation on Ray Data (local Ray, 2 actors): one embedding pass per mode up front,
then the harness answered by content key; the results equal the in-process evaluation's."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import io
from data_contracts.schemas import EMBEDDINGS, EVAL_RESULTS, EVAL_ROWS
from mmemb.configs.evaluate import EvaluateConfig
from mmemb.stages.evaluate import run

TASKS = ["syn_cls_shape", "syn_qa_count"]
BROKEN = "images/eval/broken.png"
FD = re.compile(r"name=\d+")
COMPARED = ["task", "mode", "metric", "score", "n_queries", "reasoning_ratio",
            "mean_gen_tokens", "status"]


@pytest.fixture(scope="module")
def eval_data(synth, tmp_path_factory) -> tuple[Path, Path]:
    """Two synthetic tasks, 4 queries each, one query's image an undecodable file (its
    error row must come out the same on both backends); an image root of copies."""
    root = tmp_path_factory.mktemp("ray_eval")
    for t in TASKS:
        shutil.copytree(Path(synth["image_root"]) / "images" / "eval" / t,
                        root / "images" / "eval" / t)
    (root / BROKEN).write_bytes(b"not a png")
    rows = io.read(synth["eval"], EVAL_ROWS).to_pylist()
    keep = [r for t in TASKS for r in [x for x in rows if x["task"] == t][:4]]
    keep[1] = {**keep[1], "qry_img_path": BROKEN}
    io.write(keep, root / "eval", EVAL_ROWS)
    return root / "eval", root


def _config(model, data, out: Path, **kw) -> EvaluateConfig:
    ev, root = data
    return EvaluateConfig(model=str(model), eval=str(ev), image_root=str(root), out=str(out),
                          modes=["direct", "reason", "adaptive"], budget=3, batch_size=4,
                          **kw)


def _embeddings(out: Path) -> dict[str, tuple]:
    """Every harness cache artifact under ``out/cache``: relative path -> (rows, vectors)."""
    got = {}
    for m in (out / "cache").rglob(io.MANIFEST):
        t = io.read(m.parent, EMBEDDINGS)
        rows = [{**r, "error": r["error"] and FD.sub("name=<fd>", r["error"])}  # PIL's fd
                for r in t.drop_columns(["embedding", "latency_ms"]).to_pylist()]
        got[str(m.parent.relative_to(out))] = (rows, t.column("embedding").to_pylist())
    return got


@pytest.mark.slow  # ~55 s on 2 busy cores: `make test-slow`
def test_ray_evaluation_equals_in_process(local_ray, tiny_model, eval_data, tmp_path):
    here = run(_config(tiny_model, eval_data, tmp_path / "here"))
    ray = run(_config(tiny_model, eval_data, tmp_path / "ray",
                      distributed={"backend": "ray", "actors": 2, "rows_per_task": 8}))
    a = io.read(here.outputs["results"].uri, EVAL_RESULTS).select(COMPARED).to_pylist()
    b = io.read(ray.outputs["results"].uri, EVAL_RESULTS).select(COMPARED).to_pylist()
    assert len(a) == len(TASKS) * 3 and a == b  # scores, ratios, tokens, statuses equal
    assert [r["status"] for r in a if r["task"] == TASKS[0]] == ["error"] * 3  # the broken one
    ea, eb = _embeddings(tmp_path / "here"), _embeddings(tmp_path / "ray")
    assert sorted(ea) == sorted(eb) and len(ea) == len(TASKS) * 4  # direct cands + 3 queries
    for k in ea:
        (rows_a, va), (rows_b, vb) = ea[k], eb[k]
        assert rows_a == rows_b  # ids, statuses, errors, rationales, tokens
        ok = [i for i, r in enumerate(rows_a) if r["status"] == "ok"]
        np.testing.assert_allclose(np.array([va[i] for i in ok]),
                                   np.array([vb[i] for i in ok]), rtol=1e-4, atol=1e-5)
    broken = [r for k in ea for r in ea[k][0] if r["status"] == "error"]
    assert len(broken) == 3 and all("broken.png" in r["error"] for r in broken)
    # The pre-pass tables hold fixed-size vectors; a rerun reuses them and the harness cache.
    lookup = tmp_path / "ray" / "distributed" / "embeddings"
    part = next(lookup.glob("part-*.parquet"))
    assert pa.types.is_fixed_size_list(pq.read_schema(part).field("embedding").type)
    stamp = (lookup / io.MANIFEST).stat().st_mtime_ns
    again = run(_config(tiny_model, eval_data, tmp_path / "ray",
                        distributed={"backend": "ray", "actors": 2, "rows_per_task": 8}))
    assert again.metrics["inputs_embedded"] == 0.0
    assert (lookup / io.MANIFEST).stat().st_mtime_ns == stamp
