"""Embeddings stored as Arrow fixed-size lists (float32, or float16 on request) and read as
[N, H] arrays; caches written as list<float> by earlier releases still read, and give the
same task scores as the new store."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import EMBEDDINGS, EVAL_CORPUS, EVAL_ROWS
from data_contracts.vectors import matrix
from mmemb.eval.harness import (
    EmbedItem,
    EncodeResult,
    concat_embeddings,
    embedding_table,
    encode_cached,
    encode_rows,
    evaluate,
    read_vectors,
)
from mmemb.eval.tasks import TaskSpec, register_suite
from mmemb.model.prompts import EmbedInput

VEC = {"A": [0.6, 0.8, 0.0], "B": [0.0, 1.0, 0.0], "C": [1.0, 0.0, 0.0]}


class _Enc:
    """Vectors by text; the text 'bad' embeds to NaN (an error row)."""

    def __init__(self):
        self.n = 0

    def encode(self, inputs, mode):
        self.n += len(inputs)
        v = [[np.nan] * 3 if x.text == "bad" else VEC[x.text] for x in inputs]
        return EncodeResult(np.array(v, np.float32))


def _items(texts):
    return [EmbedItem(f"i{k}", EmbedInput(t) if t else None, None if t else "unreadable")
            for k, t in enumerate(texts)]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_stores_fixed_size_lists_and_reads_them_back(tmp_path, dtype):
    items = _items(["A", "bad", "B", None, "C"])
    got = encode_cached(_Enc(), items, tmp_path, "direct", "t", "candidate", chunk_size=2,
                        log=lambda s: None, vector_dtype=dtype)
    t = io.read(tmp_path / "embeddings", EMBEDDINGS)
    assert t.schema.field("embedding").type == pa.list_(getattr(pa, dtype)(), 3)
    assert t.column("status").to_pylist() == ["ok", "error", "ok", "error", "ok"]
    want = np.array([VEC["A"], [0, 0, 0], VEC["B"], [0, 0, 0], VEC["C"]], np.float32)
    np.testing.assert_allclose(got.emb, want, atol=1e-3 if dtype == "float16" else 1e-7)
    np.testing.assert_allclose(matrix(t.column("embedding"), np.float32), want,
                               atol=1e-3 if dtype == "float16" else 0)
    again = encode_cached(_Enc(), items, tmp_path, "direct", "t", "candidate",
                          log=lambda s: None, vector_dtype=dtype)
    assert again.computed == 0 and np.array_equal(again.emb, got.emb)


def test_a_chunk_without_any_vector_joins_the_others(tmp_path):
    """Every input of the first chunk fails: that chunk has no dimension; the artifact
    still has one fixed-size column, zeros on the failed rows."""
    got = encode_cached(_Enc(), _items(["bad", None, "A", "B"]), tmp_path, "direct", "t",
                        "query", chunk_size=2, log=lambda s: None)
    t = io.read(tmp_path / "embeddings", EMBEDDINGS)
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    np.testing.assert_allclose(got.emb, [[0, 0, 0], [0, 0, 0], VEC["A"], VEC["B"]])
    _, rows = encode_rows(_Enc(), _items([None]), "direct", "t", "query")
    alone = embedding_table(rows, None)
    assert alone.column("embedding").null_count == 1 and read_vectors(alone).shape == (1, 1)


def _legacy(table: pa.Table) -> pa.Table:
    """The table as an earlier release wrote it: list<float>, [] on failed rows."""
    vecs = [v if s == "ok" else [] for v, s in zip(table.column("embedding").to_pylist(),
                                                    table.column("status").to_pylist(),
                                                    strict=True)]
    return table.set_column(table.schema.get_field_index("embedding"), "embedding",
                            pa.array(vecs, pa.list_(pa.float32())))


def test_an_older_list_cache_still_reads_with_the_same_vectors(tmp_path):
    items = _items(["A", "bad", "C"])
    new = encode_cached(_Enc(), items, tmp_path / "new", "direct", "t", "query",
                        log=lambda s: None)
    old_t = _legacy(io.read(tmp_path / "new" / "embeddings", EMBEDDINGS))
    io.write(old_t, tmp_path / "old" / "embeddings", EMBEDDINGS)
    enc = _Enc()
    old = encode_cached(enc, items, tmp_path / "old", "direct", "t", "query",
                        log=lambda s: None)
    assert enc.n == 0 and old.ok.tolist() == [True, False, True]
    np.testing.assert_array_equal(old.emb, new.emb)
    # an interrupted older run's chunk files join new ones
    mixed = concat_embeddings([old_t, embedding_table(*reversed(encode_rows(
        _Enc(), _items(["B"]), "direct", "t", "query")))], "float32")
    assert mixed.schema.field("embedding").type == pa.list_(pa.float32(), 3)
    np.testing.assert_allclose(read_vectors(mixed)[[0, 3]], [VEC["A"], VEC["B"]])


def test_vectors_of_different_lengths_name_the_file_and_column(tmp_path):
    t = _legacy(embedding_table(*reversed(encode_rows(_Enc(), _items(["A", "B"]), "direct",
                                                      "t", "query"))))
    bad = t.set_column(t.schema.get_field_index("embedding"), "embedding",
                       pa.array([[1.0, 0.0, 0.0], [1.0, 0.0]], pa.list_(pa.float32())))
    pq.write_table(bad, tmp_path / "e.parquet")
    with pytest.raises(ContractError, match=r"e\.parquet.*column 'embedding', row 1"):
        read_vectors(io.read(tmp_path / "e.parquet", EMBEDDINGS), str(tmp_path / "e.parquet"))
    with pytest.raises(ContractError, match="column 'embedding'"):
        io.conform(t.set_column(t.schema.get_field_index("embedding"), "embedding",
                                pa.array(["x", "y"])), EMBEDDINGS, "f")


SUITE = "store-test"
register_suite(SUITE, [TaskSpec("loc", "image", "CLS", "hit@1", "local", suite=SUITE),
                       TaskSpec("glob", "visdoc", "DOC", "ndcg@5", "global", suite=SUITE)],
               replace=True)


def _eval_data() -> tuple[pa.Table, pa.Table]:
    base = {"suite": SUITE, "qry_inst": "", "qry_img_path": "", "tgt_inst": "",
            "family": None, "modality": "image", "category": "CLS", "metric": "hit@1"}
    rows = [{**base, "row_id": "r0", "task": "loc", "qry_text": "A", "tgt_id": ["a", "b"],
             "tgt_text": ["A", "B"], "tgt_img_path": ["", ""], "tgt_rel": [1.0, 0.0]},
            {**base, "row_id": "r1", "task": "loc", "qry_text": "B", "tgt_id": ["a", "c"],
             "tgt_text": ["A", "C"], "tgt_img_path": ["", ""], "tgt_rel": [1.0, 0.0]},
            {**base, "row_id": "g0", "task": "glob", "qry_text": "C", "modality": "visdoc",
             "category": "DOC", "metric": "ndcg@5", "tgt_id": ["d1"], "tgt_text": [""],
             "tgt_img_path": [""], "tgt_rel": [1.0]}]
    corpus = [{"task": "glob", "cand_id": f"d{k}", "cand_inst": "", "cand_text": t,
               "cand_img_path": ""} for k, t in enumerate(["A", "B", "C"])]
    return io.conform(rows, EVAL_ROWS), io.conform(corpus, EVAL_CORPUS)


def test_task_scores_equal_from_new_float16_and_older_list_caches(tmp_path):
    rows, corpus = _eval_data()

    def run(enc, **kw):
        res = evaluate(enc, rows, corpus, tmp_path / "out", model_id="m", log=lambda s: None,
                       plots=False, **kw)
        return res, dict(zip(res.results.column("task").to_pylist(),
                             res.results.column("score").to_pylist(), strict=True))

    first, scores = run(_Enc())
    assert first.computed > 0 and scores == {"loc": 1.0, "glob": 0.5}  # B ranks 3rd: 1/log2(4)
    for art in (tmp_path / "out" / "cache").rglob("embeddings"):  # as an older release wrote
        io.write(_legacy(io.read(art, EMBEDDINGS)), art, EMBEDDINGS)
    enc = _Enc()
    again, from_old = run(enc)
    assert enc.n == 0 and again.computed == 0 and from_old == scores
    half, from_f16 = run(_Enc(), vector_dtype="float16")
    assert half.computed > 0 and from_f16 == pytest.approx(scores)  # a cache of its own
    assert not (tmp_path / "out" / "accuracy_latency.png").exists()  # plots=False


def test_plots_false_writes_the_points_and_the_plot_can_be_drawn_later(tmp_path):
    pytest.importorskip("matplotlib")
    from mmemb.eval import report

    rows, corpus = _eval_data()
    res = evaluate(_Enc(), rows, corpus, tmp_path, model_id="m", log=lambda s: None,
                   plots=False)
    assert "plot" not in res.files and not (tmp_path / "accuracy_latency.png").exists()
    points = json.loads((tmp_path / report.PLOT_POINTS).read_text())
    assert [(p["mode"], p["score"]) for p in points] == [("direct", 0.75)]  # (1.0 + 0.5) / 2
    assert "python -m mmemb.eval.report" in res.files["report"].read_text()
    report.main([str(tmp_path)])
    assert (tmp_path / "accuracy_latency.png").read_bytes()[:4] == b"\x89PNG"
