"""Harness logic on a hand-built embedding set (a fake deterministic encoder, tests only).

Vectors (2-D, unit length unless noted):
  local task 'loc' (hit@1): candidates A=[1,0], B=[0,1], C=[-1,0]
    row0 q0=[1,0]  cands [A,B,C] pos A -> sims [1,0,-1]        hit
    row1 q1=[0,1]  cands [A,B]   pos A -> sims [0,1]           miss
    row2 q2=[1,1]/sqrt2 [A,B]    pos A -> sims [.71,.71] tie   miss (pessimistic)
    row3 q1=[0,1]  cands [B,C]   pos B -> sims [1,0]           hit        => 2/4 = 0.5
  In 'reason' mode q1 becomes [1,0]: row1 hit, row3 sims [0,-1] still hit => 3/4 = 0.75.
  global task 'glob' (ndcg@5): corpus d0=[1,0], d1=[.8,.6], d2=[0,1], d3=[-1,0]
    g0=[1,0]: order d0,d1,d2,d3; gains d1=2, d2=1
       DCG = 2/log2(3) + 1/log2(4) = 1.761860; IDCG = 2 + 1/log2(3) = 2.630930 -> 0.669672
    g1=[0,1]: order d2,d1,...; gain d2=1 -> 1.0                      => 0.834836
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import EMBEDDINGS, EVAL_CORPUS, EVAL_RESULTS, EVAL_ROWS
from mmemb.eval.baseline import load_baseline
from mmemb.eval.harness import (
    EmbedItem,
    Encoder,
    EncodeResult,
    encode_cached,
    evaluate,
)
from mmemb.eval.tasks import TaskSpec, register_suite
from mmemb.model.prompts import EmbedInput

SUITE = "harness-test"
register_suite(SUITE, [TaskSpec("loc", "image", "CLS", "hit@1", "local", suite=SUITE),
                       TaskSpec("glob", "visdoc", "DOC", "ndcg@5", "global", suite=SUITE),
                       TaskSpec("extra", "image", "QA", "hit@1", "local", suite=SUITE)],
               replace=True)

S2 = 1 / math.sqrt(2)
VEC = {"A": [1, 0], "B": [0, 1], "C": [-1, 0], "q0": [1, 0], "q1": [0, 1], "q2": [S2, S2],
       "d0": [1, 0], "d1": [0.8, 0.6], "d2": [0, 1], "d3": [-1, 0], "g0": [1, 0], "g1": [0, 1],
       "x0": [1, 0], "X": [1, 0], "Y": [0, 1]}
NDCG_G0 = (2 / math.log2(3) + 1 / math.log2(4)) / (2 + 1 / math.log2(3))


class FakeEncoder:
    """Looks vectors up by text; records every call (inputs, mode)."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_after = fail_after

    def encode(self, inputs: list[EmbedInput], mode: str) -> EncodeResult:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # simulates a killed run (not an input failure)
        self.calls.append((mode, [x.text for x in inputs]))
        for x in inputs:
            if x.images and "broken" in x.images[0]:
                raise OSError(f"cannot identify image file {x.images[0]!r}")
        vec = [VEC["A"] if (mode == "reason" and x.text == "q1") else VEC[x.text]
               for x in inputs]
        r = mode == "reason"
        return EncodeResult(np.array(vec, dtype=np.float32), reasoned=[r] * len(inputs),
                            rationales=["because"] * len(inputs) if r else [None] * len(inputs),
                            n_gen_tokens=[5 if r else 0] * len(inputs),
                            latency_ms=[10.0 if r else 1.0] * len(inputs))

    def n_inputs(self, mode: str | None = None) -> int:
        return sum(len(t) for m, t in self.calls if mode is None or m == mode)


def _row(task, rid, qtext, cands, rel, metric="hit@1", modality="image", category="CLS",
         tgt_id=None, qimg=""):
    return {"row_id": rid, "task": task, "suite": SUITE, "category": category,
            "modality": modality, "metric": metric, "qry_inst": "inst", "qry_text": qtext,
            "qry_img_path": qimg, "tgt_inst": "", "tgt_id": tgt_id or [f"c{j}" for j in
                                                                        range(len(cands))],
            "tgt_text": cands, "tgt_img_path": [""] * len(cands), "tgt_rel": rel,
            "family": None}


def _data(extra: bool = False):
    rows = [_row("loc", "r0", "q0", ["A", "B", "C"], [1.0, 0.0, 0.0]),
            _row("loc", "r1", "q1", ["A", "B"], [1.0, 0.0]),
            _row("loc", "r2", "q2", ["A", "B"], [1.0, 0.0]),
            _row("loc", "r3", "q1", ["B", "C"], [1.0, 0.0]),
            _row("glob", "g0", "g0", ["", ""], [2.0, 1.0], "ndcg@5", "visdoc", "DOC",
                 ["d1", "d2"]),
            _row("glob", "g1", "g1", [""], [1.0], "ndcg@5", "visdoc", "DOC", ["d2"])]
    if extra:
        rows += [_row("extra", "e0", "x0", ["X", "Y"], [1.0, 0.0], category="QA")]
    corpus = [{"task": "glob", "cand_id": f"d{k}", "cand_inst": "", "cand_text": f"d{k}",
               "cand_img_path": ""} for k in range(4)]
    return io.conform(rows, EVAL_ROWS), io.conform(corpus, EVAL_CORPUS)


def _scores(run, mode):
    return {r["task"]: r["score"] for r in run.results.to_pylist() if r["mode"] == mode}


def test_fake_encoder_is_an_encoder():
    """The fake keeps the contract the real encoders keep: the protocol's signature (so a
    change to the protocol breaks this test, not silently the fakes) and an EncodeResult
    with one entry per input in each per-input field it fills."""
    from mmemb.eval.encoding import EngineEncoder
    from mmemb.eval.harness import EmbedderEncoder
    from mmemb.inference import AdaptiveEncoder, GateProbe

    assert isinstance(FakeEncoder(), Encoder) and not isinstance(object(), Encoder)
    proto = inspect.signature(Encoder.encode)
    for cls in (FakeEncoder, EmbedderEncoder, AdaptiveEncoder, EngineEncoder, GateProbe):
        sig = inspect.signature(cls.encode)
        assert list(sig.parameters)[:3] == list(proto.parameters) == ["self", "inputs", "mode"]
        assert sig.return_annotation in ("EncodeResult", EncodeResult), cls
        extra = list(sig.parameters.values())[3:]
        assert all(p.default is not p.empty for p in extra), cls  # callable as (inputs, mode)
    inputs = [EmbedInput("A"), EmbedInput("q1"), EmbedInput("B")]
    for mode in ("direct", "reason"):
        res = FakeEncoder().encode(inputs, mode)
        assert isinstance(res, EncodeResult) and res.embeddings.shape == (3, 2)
        filled = {f.name: getattr(res, f.name) for f in dataclasses.fields(EncodeResult)
                  if f.name != "embeddings" and getattr(res, f.name)}
        assert set(filled) == {"reasoned", "rationales", "n_gen_tokens", "latency_ms"}
        assert all(len(v) == 3 for v in filled.values())


def test_hand_computed_local_and_global_scores(tmp_path):
    rows, corpus = _data()
    enc = FakeEncoder()
    run = evaluate(enc, rows, corpus, tmp_path, modes=["direct", "reason"], model_id="m1",
                   log=lambda s: None)
    direct, reason = _scores(run, "direct"), _scores(run, "reason")
    assert direct["loc"] == pytest.approx(0.5)
    assert reason["loc"] == pytest.approx(0.75)
    assert NDCG_G0 == pytest.approx(0.669672, abs=1e-6)
    assert direct["glob"] == pytest.approx((NDCG_G0 + 1.0) / 2)
    agg = run.aggregates["direct"]
    assert agg["overall"]["score"] == pytest.approx((0.5 + (NDCG_G0 + 1) / 2) / 2)
    assert agg["overall"]["metric"] == "hit@1/ndcg@5" and agg["missing"] == ["extra"]
    # Results contract: one row per (task, mode) with the query-side reasoning stats.
    res = io.read(run.files["results"], EVAL_RESULTS).to_pylist()
    by = {(r["task"], r["mode"]): r for r in res}
    assert len(res) == 4 and all(r["status"] == "ok" for r in res)
    assert by[("loc", "reason")]["reasoning_ratio"] == 1.0
    assert by[("loc", "reason")]["mean_gen_tokens"] == 5.0
    assert by[("loc", "reason")]["latency_p95_ms"] == pytest.approx(10.0)
    assert by[("loc", "direct")]["reasoning_ratio"] == 0.0
    assert by[("glob", "direct")]["n_queries"] == 2 and by[("glob", "direct")]["metric"] == \
        "ndcg@5"


def test_candidates_embedded_once_and_in_direct_mode(tmp_path):
    rows, corpus = _data()
    enc = FakeEncoder()
    evaluate(enc, rows, corpus, tmp_path, modes=["direct", "reason"], model_id="m1",
             log=lambda s: None)
    cand_calls = [(m, t) for m, t in enc.calls if t and t[0] in ("A", "B", "C", "d0")]
    # 3 unique local candidates (A, B, C across 4 rows) + the 4-item corpus, direct only.
    assert sorted(x for _, t in cand_calls for x in t) == ["A", "B", "C", "d0", "d1", "d2",
                                                            "d3"]
    assert {m for m, _ in cand_calls} == {"direct"}
    assert enc.n_inputs("reason") == 4 + 2  # only the queries
    enc2 = FakeEncoder()
    evaluate(enc2, rows, corpus, tmp_path / "b", modes=["direct", "reason"], model_id="m1",
             reason_on_candidates=True, log=lambda s: None)
    assert enc2.n_inputs("reason") == 4 + 2 + 3 + 4


def test_finished_task_is_not_recomputed(tmp_path):
    rows, corpus = _data()
    evaluate(FakeEncoder(), rows, corpus, tmp_path, modes=["direct"], model_id="m1",
             log=lambda s: None)
    again = FakeEncoder()
    run = evaluate(again, rows, corpus, tmp_path, modes=["direct"], model_id="m1",
                   log=lambda s: None)
    assert again.calls == [] and run.computed == 0
    assert _scores(run, "direct")["loc"] == pytest.approx(0.5)
    # A new task is computed, the finished ones come from the cache.
    rows2, _ = _data(extra=True)
    more = FakeEncoder()
    run = evaluate(more, rows2, corpus, tmp_path, modes=["direct"], model_id="m1",
                   log=lambda s: None)
    assert sorted(x for _, t in more.calls for x in t) == ["X", "Y", "x0"]
    assert _scores(run, "direct")["extra"] == 1.0
    # Another model digest, or another mode, is computed afresh.
    other = FakeEncoder()
    evaluate(other, rows, corpus, tmp_path, modes=["direct"], model_id="m2", log=lambda s: None)
    assert other.n_inputs() == 13
    reason = FakeEncoder()
    evaluate(reason, rows, corpus, tmp_path, modes=["reason"], model_id="m1",
             log=lambda s: None)
    assert reason.n_inputs("reason") == 6 and reason.n_inputs("direct") == 0


def test_interrupted_task_resumes_from_finished_chunks(tmp_path):
    rows, corpus = _data()
    with pytest.raises(KeyboardInterrupt):
        evaluate(FakeEncoder(fail_after=2), rows, corpus, tmp_path, modes=["direct"],
                 model_id="m1", chunk_size=2, log=lambda s: None)
    # Calls 1-2 were loc's candidate chunks [A, B] and [C]: kept on disk.
    resumed = FakeEncoder()
    run = evaluate(resumed, rows, corpus, tmp_path, modes=["direct"], model_id="m1",
                   chunk_size=2, log=lambda s: None)
    assert resumed.n_inputs() == 13 - 3
    assert _scores(run, "direct")["loc"] == pytest.approx(0.5)


def test_global_ranking_is_over_the_whole_corpus(tmp_path):
    """g1's only relevant document is d2; with d1 made [0, 1] too it ties, pessimistically
    ranked second: NDCG = 1/log2(3) — possible only if d1 (not in g1's targets) is ranked."""
    rows, corpus = _data()
    VEC["d1"], old = [0.0, 1.0], VEC["d1"]
    try:
        run = evaluate(FakeEncoder(), rows, corpus, tmp_path, modes=["direct"], model_id="m3",
                       tasks=["glob"], log=lambda s: None)
    finally:
        VEC["d1"] = old
    # g0 = [1,0]: d0 first (gain 0), then d1/d2 tied at 0 (gains 2, 1; pessimistic: d2, d1).
    g0 = (1 / math.log2(3) + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
    assert _scores(run, "direct")["glob"] == pytest.approx((g0 + 1 / math.log2(3)) / 2)


def test_global_task_without_corpus_or_unknown_target_fails_clearly(tmp_path):
    rows, corpus = _data()
    with pytest.raises(ContractError, match="task glob.*needs its corpus"):
        evaluate(FakeEncoder(), rows, None, tmp_path, model_id="m", tasks=["glob"],
                 log=lambda s: None)
    bad = corpus.filter(pa.compute.not_equal(corpus.column("cand_id"), "d2"))
    with pytest.raises(ContractError, match="row 'g0': target 'd2' is not in the task's corpus"):
        evaluate(FakeEncoder(), rows, bad, tmp_path, model_id="m", tasks=["glob"],
                 log=lambda s: None)


def test_failed_inputs_are_kept_and_count_as_misses(tmp_path):
    rows, corpus = _data()
    empty = tmp_path / "frames" / "empty_video"
    empty.mkdir(parents=True)
    t = rows.to_pylist()
    t[0]["qry_img_path"] = "broken.png"  # the encoder raises on it
    t[3]["qry_img_path"] = "frames/empty_video"  # a frame folder without frames
    rows = io.conform(t, EVAL_ROWS)
    enc = FakeEncoder()
    run = evaluate(enc, rows, corpus, tmp_path / "out", modes=["direct"], model_id="m1",
                   image_root=tmp_path, tasks=["loc"], log=lambda s: None)
    (res,) = run.results.to_pylist()
    assert res["score"] == pytest.approx(0.0)  # r0 and r3 (the hits) failed -> misses
    assert res["status"] == "error" and "2 of 4 query inputs failed" in res["error"]
    assert "holds no" in res["error"] or "cannot identify" in res["error"]
    emb = io.read(next((tmp_path / "out" / "cache").rglob("query/embeddings")), EMBEDDINGS)
    st = {r["id"]: (r["status"], r["error"]) for r in emb.to_pylist()}
    assert st["r1"] == ("ok", None) and st["r0"][0] == "error" and "broken.png" in st["r0"][1]
    assert "frame folder" in st["r3"][1]
    assert "⚠" in (tmp_path / "out" / "report.md").read_text()


def test_nan_and_zero_norm_embeddings_are_kept_as_errors_or_misses(tmp_path):
    """A NaN query embedding: its row is kept with status=error and counts as a miss; a
    zero-norm one scores 0 against every candidate, a tie, which pessimistic tie handling
    counts as a miss; the other queries score as usual."""
    rows, corpus = _data()
    VEC["qnan"], VEC["qzero"] = [float("nan"), 0.0], [0.0, 0.0]
    try:
        t = rows.to_pylist()
        t[0]["qry_text"], t[3]["qry_text"] = "qnan", "qzero"  # r0 and r3: the two hits
        run = evaluate(FakeEncoder(), io.conform(t, EVAL_ROWS), corpus, tmp_path,
                       modes=["direct"], model_id="m1", tasks=["loc"], log=lambda s: None)
    finally:
        del VEC["qnan"], VEC["qzero"]
    (res,) = run.results.to_pylist()
    assert res["score"] == pytest.approx(0.0)  # was 0.5 (r0, r3); r1, r2 were misses
    assert res["status"] == "error" and "1 of 4 query inputs failed" in res["error"]
    emb = io.read(next(tmp_path.joinpath("cache").rglob("query/embeddings")), EMBEDDINGS)
    st = {r["id"]: (r["status"], r["error"]) for r in emb.to_pylist()}
    assert st["r0"] == ("error", "non-finite embedding") and st["r3"] == ("ok", None)


def test_report_plot_and_baseline(tmp_path, monkeypatch):
    from mmemb.eval import report

    drawn = []
    real_plot = report.plot_accuracy_latency

    def plot(points, path):
        drawn.extend(points)
        return real_plot(points, path)

    monkeypatch.setattr(report, "plot_accuracy_latency", plot)
    rows, corpus = _data()
    base_file = tmp_path / "published.json"
    base_file.write_text('{"loc": 40.0, "glob": 90.0}')
    run = evaluate(FakeEncoder(), rows, corpus, tmp_path / "out", modes=["direct", "reason"],
                   model_id="m1", baseline=load_baseline(base_file),
                   baseline_name="Published", log=lambda s: None)
    md = run.files["report"].read_text()
    assert "| direct | 2 | 66.7 (hit@1/ndcg@5) | 0.0% | 0.0 | 1.0 | 1.0 | 1.0 |" in md
    assert "| reason | 2 | 79.2 (hit@1/ndcg@5) | 100.0% | 5.0 | 10.0 | 10.0 | 10.0 |" in md
    assert "| task | metric | direct | reason | Published |" in md
    assert "| loc | hit@1 | 50.0 | 75.0 | 40.0 |" in md
    assert "| loc | image | CLS | 50.0 (hit@1) | 40.0 (hit@1) | +10.0 |" in md
    assert "## Mode: reason" in md and "### Mode: reason" in md  # reasoning per mode
    assert run.files["plot"].stat().st_size > 1000
    # The plot is a real image of the modes' points: 5x4 in at 120 dpi, not blank, drawn
    # from each mode's overall score and mean latency.
    with Image.open(run.files["plot"]) as im:
        assert im.format == "PNG" and im.size == (600, 480)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 10
    assert drawn == [
        {"mode": "direct", "score": pytest.approx(run.aggregates["direct"]["overall"]["score"]),
         "metric": "hit@1/ndcg@5", "latency_mean_ms": pytest.approx(1.0)},
        {"mode": "reason", "score": pytest.approx((0.75 + (NDCG_G0 + 1) / 2) / 2),
         "metric": "hit@1/ndcg@5", "latency_mean_ms": pytest.approx(10.0)}]
    assert "reasoning ratio" in run.files["reasoning"].read_text()
    # An earlier run's results folder is a baseline too.
    assert load_baseline(run.files["results"], "reason") == {
        "loc": pytest.approx(0.75), "glob": pytest.approx((NDCG_G0 + 1) / 2)}


def test_encode_cached_writes_embeddings_contract(tmp_path):
    items = [EmbedItem("a", EmbedInput("A")), EmbedItem("b", EmbedInput("B")),
             EmbedItem("c", None, "bad")]
    got = encode_cached(FakeEncoder(), items, tmp_path, "direct", "loc", "candidate",
                        log=lambda s: None)
    np.testing.assert_allclose(got.emb, [[1, 0], [0, 1], [0, 0]])
    assert got.ok.tolist() == [True, True, False] and got.computed == 3
    t = io.read(tmp_path / "embeddings", EMBEDDINGS).to_pylist()
    assert [(r["id"], r["side"], r["status"]) for r in t] == [
        ("a", "candidate", "ok"), ("b", "candidate", "ok"), ("c", "candidate", "error")]
    assert not (tmp_path / "chunks").exists()


def test_mixed_suites_and_unknown_tasks_are_rejected(tmp_path):
    rows, corpus = _data()
    t = rows.to_pylist()
    t[0]["suite"] = "synthetic"
    with pytest.raises(ContractError, match="mix suites"):
        evaluate(FakeEncoder(), io.conform(t, EVAL_ROWS), corpus, tmp_path, model_id="m",
                 log=lambda s: None)
    t = rows.to_pylist()
    for r in t:
        r["task"] = "lok" if r["task"] == "loc" else r["task"]
    with pytest.raises(ValueError, match="did you mean loc"):
        evaluate(FakeEncoder(), io.conform(t, EVAL_ROWS), corpus, tmp_path, model_id="m",
                 log=lambda s: None)
    with pytest.raises(ValueError, match="modes"):
        evaluate(FakeEncoder(), rows, corpus, tmp_path, modes=["fast"], model_id="m")


def test_benchmark_score_report_is_a_baseline(tmp_path):
    """The benchmark's own per-model score file (VLM2Vec all_scores/*.json layout): the
    value under each task's metric is taken; NDCG is the linear-gain one."""
    f = tmp_path / "VLM2Vec-V2.0-Qwen2VL-2B.json"
    f.write_text(json.dumps({"metadata": {"model_name": "x"}, "metrics": {
        "image": {"CIRR": {"hit@1": 0.47, "hit@5": 0.8, "ndcg_linear@5": 0.6}},
        "visdoc": {"ViDoRe_arxivqa": {"hit@1": 0.5, "ndcg_linear@5": 0.802,
                                      "ndcg_exponential@5": 0.7}}}}))
    assert load_baseline(f) == {"CIRR": 0.47, "ViDoRe_arxivqa": 0.802}
    f.write_text(json.dumps({"metrics": {"image": {"CIRR": {"hit@5": 0.8}}}}))
    with pytest.raises(ContractError, match=r"metrics.image.CIRR has no 'hit@1'"):
        load_baseline(f)
