"""The two protocols end to end: MMEB fixture roots in the official layouts, loaded and scored
with a fake encoder whose vectors are chosen by hand, so each quirk's official and strict
numbers are computable on paper (issue 15); plus the provenance, the partial headline and
the official score files of a run."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mmeb_layout as layout  # tests/data/fixtures, on the path (tests/conftest.py)
import numpy as np
import pyarrow as pa
import pytest

from data_contracts import io
from data_contracts.schemas import EVAL_CORPUS, EVAL_ROWS
from mmemb.data import mmeb
from mmemb.data.mmeb import SOURCES, load_mmeb_eval, load_task
from mmemb.eval.baseline import load_baseline
from mmemb.eval.encoding import EncodeResult
from mmemb.eval.harness import TaskData, evaluate, score_task
from mmemb.eval.tasks import get_task


class KeyEncoder:
    """Vectors from ``key(input)`` looked up in ``table``; records each input's frame count."""

    def __init__(self, key, table):
        self.key, self.table = key, table
        self.n_images: dict[str, int] = {}

    def encode(self, inputs, mode="direct"):
        vecs = []
        for x in inputs:
            k = self.key(x)
            self.n_images[k] = len(x.images)
            vecs.append(self.table[k])
        return EncodeResult(np.array(vecs, dtype=np.float32))


def _score(encoder, root, task, protocol, **kw) -> float:
    rows, corpus = load_task(root, task, protocol=protocol, log=lambda _m: None, **kw)
    (s,) = score_task(encoder, TaskData(get_task(task), rows, corpus), ["direct"],
                      image_root=root, protocol=protocol, log=lambda _m: None)
    return s.score


def _folder(x) -> str:
    return Path(x.images[0]).parent.name if x.images else ""


def _image_task(root: Path, rows: list[dict], task: str = "N24News") -> None:
    it = root / "image-tasks"
    layout.png(it / task / "q.jpg")
    layout.to_parquet([{"qry_inst": "<|image_1|> cls:", "qry_img_path": f"{task}/q.jpg",
                        "tgt_inst": "Represent the answer:", **r} for r in rows],
                      it / task / "test-00000-of-00001.parquet")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return layout.write_mmeb_v2(tmp_path_factory.mktemp("mmeb-proto") / "mmeb-v2")


def test_official_k700_label_corpus_scored(tmp_path, monkeypatch):
    """Corpus [a, b, c] (official) vs [a, b] (strict): q1 prefers c (not a test label)."""
    monkeypatch.setattr(mmeb, "video_cls_labels", lambda task: ["a", "b", "c"])
    fr = tmp_path / SOURCES["K700"].frames
    for v in ("v1", "v2"):
        layout.frames(fr / v, 8)
    layout.to_parquet([{"video_id": "v1", "pos_text": "a"}, {"video_id": "v2", "pos_text": "b"}],
                      tmp_path / "video-tasks" / "Kinetics-700" / "data" / "test-0.parquet")
    table = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1], "v1": [0.5, 0.1, 0.9],
             "v2": [0.2, 0.8, 0.3]}
    enc = KeyEncoder(lambda x: _folder(x) or x.text, table)
    assert _score(enc, tmp_path, "K700", "official") == 0.5
    assert _score(enc, tmp_path, "K700", "strict") == 1.0


def test_official_ties_and_name_identity_scored(tmp_path):
    """q1: positive tied with a negative; q2: a duplicate of the positive's name; q3 clean.
    Official 3/3 (stable ties, the duplicate is the positive); strict 1/3."""
    two, three = ["cat", "dog"], ["cat", "dog", "cat"]
    _image_task(tmp_path, [{"qry_text": "q1", "tgt_text": two, "tgt_img_path": ["", ""]},
                           {"qry_text": "q2", "tgt_text": three, "tgt_img_path": ["", "", ""]},
                           {"qry_text": "q3", "tgt_text": two, "tgt_img_path": ["", ""]}])
    s2 = 1 / np.sqrt(2)
    table = {"cat": [1, 0], "dog": [0, 1], "q1": [s2, s2], "q2": [0.8, 0.6], "q3": [1, 0]}
    enc = KeyEncoder(lambda x: x.text, table)
    assert _score(enc, tmp_path, "N24News", "official") == 1.0
    assert _score(enc, tmp_path, "N24News", "strict") == pytest.approx(1 / 3)


def test_official_bare_candidate_text_scored(tmp_path):
    """Official embeds cls candidates without tgt_inst (one-hot by text): hit; strict embeds
    them with it (both [0.5, 0.5]): a pessimistic tie, a miss."""
    _image_task(tmp_path, [{"qry_text": "q", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}])
    table = {"cat": [1, 0], "dog": [0, 1], "inst": [0.5, 0.5], "q": [1, 0]}
    enc = KeyEncoder(lambda x: "inst" if x.instruction and x.text != "q" else x.text, table)
    assert _score(enc, tmp_path, "N24News", "official") == 1.0
    assert _score(enc, tmp_path, "N24News", "strict") == 0.0


def test_official_moment_single_positive_scored(root):
    """The encoder prefers the positive that is not the last in directory order."""
    vdir = root / SOURCES["QVHighlight"].frames / "qv_001"
    listed = [d for d in os.listdir(vdir) if (vdir / d).is_dir() and d != "query"]
    pos = [d for d in listed if d.startswith("positive")]
    other = pos[0]  # not the last: officially a negative
    table = {d: [1.0, 0.0] if d == other else [0.0, 1.0] for d in listed}
    table["query"] = [1.0, 0.0]
    enc = KeyEncoder(_folder, table)
    assert _score(enc, root, "QVHighlight", "official") == 0.0
    assert _score(enc, root, "QVHighlight", "strict") == 1.0


def test_official_ssv2_first_1000_scored(tmp_path):
    rows = [{"video_id": f"v{k}", "pos_text": "b", "neg_text": ["a", "b", "c"]}
            for k in range(1001)]
    layout.to_parquet(rows, tmp_path / "video-tasks" / "SmthSmthV2" / "data" / "test-0.parquet")
    table = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [0, 0, 1], "hit": [0, 1, 0], "miss": [1, 0, 0]}
    enc = KeyEncoder(lambda x: x.text or ("miss" if x.images[0].endswith("v1000") else "hit"),
                     table)
    assert _score(enc, tmp_path, "SmthSmthV2", "official", check_media=False) == 1.0
    assert _score(enc, tmp_path, "SmthSmthV2", "strict", check_media=False) == pytest.approx(
        1000 / 1001)


def test_official_graded_ndcg_pairing_scored(tmp_path):
    """ViDoRe (int corpus-ids): qrels 3 -> 1, 10 -> 2; ranking 3, 7, 10, 4, 5, ...:
    strict 0.76019 (= trec_eval), official 0.95023 (grades re-paired after set())."""
    from datasets import Features, Value
    from datasets import Image as HFImage

    base = tmp_path / SOURCES["ViDoRe_arxivqa"].data
    layout.to_parquet([{"corpus-id": k, "image": {"bytes": layout.png_bytes(layout.COLOURS[k % 10]),
                                                  "path": None}} for k in range(11)],
                      base / "corpus" / "test-0.parquet",
                      Features({"corpus-id": Value("int64"), "image": HFImage()}))
    layout.to_parquet([{"query-id": 1, "query": "q"}], base / "queries" / "test-0.parquet")
    layout.to_parquet([{"query-id": 1, "corpus-id": 3, "score": 1},
                       {"query-id": 1, "corpus-id": 10, "score": 2}],
                      base / "qrels" / "test-0.parquet")
    rank = {3: 10, 7: 9, 10: 8, 4: 7, 5: 6}
    table = {str(k): [1.0, rank.get(k, 0) / 10] for k in range(11)}
    table["q"] = [0.0, 1.0]
    enc = KeyEncoder(lambda x: x.text or Path(x.images[0]).name.split("_")[0], table)
    kw = {"image_cache": tmp_path / "pages"}
    assert _score(enc, tmp_path, "ViDoRe_arxivqa", "strict", **kw) == pytest.approx(
        0.7601875334318685, abs=1e-12)
    assert _score(enc, tmp_path, "ViDoRe_arxivqa", "official", **kw) == pytest.approx(
        0.9502344167898356, abs=1e-12)
    rows, corpus = load_task(tmp_path, "ViDoRe_arxivqa", protocol="official", **kw)
    (s,) = score_task(enc, TaskData(get_task("ViDoRe_arxivqa"), rows, corpus), ["direct"],
                      image_root=tmp_path, protocol="official", log=lambda _m: None)
    assert s.official["ndcg_linear@5"] == pytest.approx(0.9502344167898356, abs=1e-12)
    # exponential gains 2^g - 1 with the same pairing: DCG = 3 + 1/2, IDCG = 3 + 1/log2 3
    assert s.official["ndcg_exponential@5"] == pytest.approx(3.5 / (3 + 1 / np.log2(3)))


def test_official_frames_not_padded_scored(tmp_path):
    fr = tmp_path / SOURCES["HMDB51"].frames
    layout.frames(fr / "short", 5)
    layout.to_parquet([{"video_id": "short", "pos_text": "run"}],
                      tmp_path / "video-tasks" / "HMDB51" / "data" / "test-0.parquet")
    labels = mmeb.video_cls_labels("HMDB51")
    table = {lb: [1.0, 0.0] for lb in labels} | {"short": [1.0, 0.0]}
    for protocol, n in (("official", 5), ("strict", 8)):
        enc = KeyEncoder(lambda x: _folder(x) or x.text, table)
        _score(enc, tmp_path, "HMDB51", protocol)
        assert enc.n_images["short"] == n


def _hash_encoder():
    def vec(x):
        h = hashlib.sha256(json.dumps([x.instruction, x.text, x.images]).encode()).digest()
        return list(np.frombuffer(h[:16], dtype=np.uint8).astype(np.float32) - 127.5)

    class E:
        n = 0

        def encode(self, inputs, mode="direct"):
            E.n += len(inputs)
            return EncodeResult(np.array([vec(x) for x in inputs], dtype=np.float32))

    return E()


def _run(root, out, protocol, tasks=("MSCOCO_t2i", "MSR-VTT"), cache=None):
    ev = load_mmeb_eval(root, list(tasks), protocol=protocol, log=lambda _m: None)
    return evaluate(_hash_encoder(), ev.rows, ev.corpus if ev.corpus.num_rows else None, out,
                    model_id="m" * 64, image_root=root, protocol=protocol,
                    data_digests=ev.digests, missing=[], cache_dir=cache, log=lambda _m: None)


def test_partial_headline_and_no_overall(root, tmp_path):
    run = _run(root, tmp_path / "out", "official")
    agg = run.aggregates["direct"]
    assert agg["partial"] == "2/78" and agg["overall"]["score"] is None
    md = (tmp_path / "out" / "report.md").read_text().splitlines()
    assert md[0] == "# Evaluation: mmeb-v2"
    assert md[2].startswith("**partial: 2/78** — missing: ImageNet-1K, N24News, ")
    assert "Protocol: **official**" in "\n".join(md)


def test_results_carry_protocol_and_digests(root, tmp_path):
    run = _run(root, tmp_path / "out", "strict")
    prov = json.loads(run.files["provenance"].read_text())
    assert prov["protocol"] == "strict" and prov["model_digest"] == "m" * 64
    by = {p["task"]: p for p in prov["tasks"]}
    assert by["MSCOCO_t2i"]["n_queries"] == 2 and by["MSCOCO_t2i"]["n_candidates"] == 4
    assert by["MSR-VTT"]["n_candidates"] == 2 and by["MSR-VTT"]["candidates"] == "corpus"
    ev = load_mmeb_eval(root, ["MSCOCO_t2i"], log=lambda _m: None)
    assert by["MSCOCO_t2i"]["data_digest"] == ev.digests["MSCOCO_t2i"]
    assert by["MSCOCO_t2i"]["data_digest_of"] == "source files"
    assert {p["protocol"] for p in prov["tasks"]} == {"strict"}


def test_official_score_json_layout(root, tmp_path):
    run = _run(root, tmp_path / "out", "official")
    path = run.files["official"] / "direct" / "image" / "MSCOCO_t2i_score.json"
    text = path.read_text()
    body = json.loads(text)
    # the key order of the published all_scores/*.json task entries
    assert list(body) == [f"{m}@{k}" for m in ("hit", "ndcg_linear", "ndcg_exponential",
                                               "precision", "recall", "f1", "map", "mrr")
                          for k in (1, 5, 10)] + ["num_pred", "num_data"]
    assert body["num_data"] == body["num_pred"] == 2 and text == json.dumps(body, indent=4)
    scores = {r["task"]: r["score"] for r in run.results.to_pylist()}
    assert body["hit@1"] == pytest.approx(scores["MSCOCO_t2i"])
    vd = json.loads((run.files["official"] / "direct" / "video" / "MSR-VTT_score.json")
                    .read_text())
    assert vd["hit@1"] == pytest.approx(scores["MSR-VTT"])
    strict = _run(root, tmp_path / "strict", "strict")
    assert "official" not in strict.files  # only an official run writes official files


def test_official_score_dict_single_label_values(tmp_path):
    """3 queries, one label each, 2 hits at rank 1 and one at rank 2: every @1 metric is
    2/3; @5: hit 1, precision 1/5, recall 1, mrr (1 + 1 + 1/2)/3, ndcg (2 + 1/log2 3)/3."""
    _image_task(tmp_path, [{"qry_text": f"q{k}", "tgt_text": ["cat", "dog"],
                            "tgt_img_path": ["", ""]} for k in range(3)])
    table = {"cat": [1, 0], "dog": [0, 1], "q0": [1, 0], "q1": [0.9, 0.1], "q2": [0.1, 0.9]}
    enc = KeyEncoder(lambda x: x.text, table)
    rows, _ = load_task(tmp_path, "N24News", protocol="official")
    (s,) = score_task(enc, TaskData(get_task("N24News"), rows, []), ["direct"],
                      protocol="official", log=lambda _m: None)
    b = s.official
    for key in ("hit@1", "precision@1", "recall@1", "map@1", "mrr@1", "ndcg_linear@1",
                "ndcg_exponential@1", "f1@1"):
        assert b[key] == pytest.approx(2 / 3), key
    assert b["hit@5"] == b["recall@5"] == 1.0 and b["precision@5"] == pytest.approx(1 / 5)
    assert b["mrr@5"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert b["map@5"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert b["ndcg_linear@5"] == pytest.approx((2 + 1 / np.log2(3)) / 3)
    assert b["num_pred"] == b["num_data"] == 3


def test_protocol_changes_cache_key_only_for_frames(root, tmp_path):
    cache = tmp_path / "cache"
    _run(root, tmp_path / "a", "strict", cache=cache)
    again = _run(root, tmp_path / "b", "official", tasks=("MSCOCO_t2i",), cache=cache)
    assert again.computed == 0  # same inputs: embeddings shared across protocols
    video = _run(root, tmp_path / "c", "official", tasks=("MSR-VTT",), cache=cache)
    assert video.computed > 0  # the frame policy differs: its own cache entry


def test_benchmark_report_fixed_keys_alias(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"metrics": {"visdoc": {
        "ViDoSeek-page-fixed": {"ndcg_linear@5": 0.803},
        "MMLongBench-page-fixed": {"ndcg_linear@5": 0.447}}}}))
    assert load_baseline(path) == {"ViDoSeek-page": 0.803, "MMLongBench-page": 0.447}
    for first, second in ((("ViDoSeek-page", 0.209), ("ViDoSeek-page-fixed", 0.803)),
                          (("ViDoSeek-page-fixed", 0.803), ("ViDoSeek-page", 0.209))):
        path.write_text(json.dumps({"metrics": {"visdoc": {
            first[0]: {"ndcg_linear@5": first[1]}, second[0]: {"ndcg_linear@5": second[1]}}}}))
        assert load_baseline(path) == {"ViDoSeek-page": 0.803}


def test_benchmark_report_old_page_keys_and_markers_named(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({
        "metadata": {"report_generated_date": "2025-07-01T10:00:00"},
        "metrics": {"visdoc": {"ViDoSeek-page": {"ndcg_linear@5": 0.209}},
                    "video": {"MomentSeeker_1k8": {"hit@1": 0.1}, "K700": "FILE_N/A"}}}))
    got = load_baseline(path)
    assert got["ViDoSeek-page"] == 0.209 and "K700" not in got
    out = capsys.readouterr().out
    assert "before the 2025-11-03 fix of ViDoSeek-page" in out
    assert "MomentSeeker_1k8" in out and "K700 (FILE_N/A)" in out


def test_eval_rows_of_both_protocols_satisfy_the_contract(root):
    for protocol in ("official", "strict"):
        ev = load_mmeb_eval(root, skip_missing=True, protocol=protocol, log=lambda _m: None)
        io.validate(ev.rows, EVAL_ROWS, "rows")
        io.validate(ev.corpus, EVAL_CORPUS, "corpus")
        assert isinstance(ev.rows, pa.Table)


def test_protocol_is_a_result_field_in_the_cache_key():
    from mmemb.configs.base import field_effect
    from mmemb.configs.evaluate import EvaluateConfig
    from tasks import cache

    cfg = EvaluateConfig(model="m", eval="e")
    assert cfg.protocol == "official" and field_effect(EvaluateConfig, "protocol") == "result"
    strict = cfg.model_copy(update={"protocol": "strict"})
    assert cache.cache_key("evaluate", cfg, {}, "c") != cache.cache_key("evaluate", strict, {},
                                                                       "c")
    assert "protocol" in cfg.digest_view("resume")


def test_official_short_retrieval_video_warned(tmp_path):
    fr = tmp_path / SOURCES["MSR-VTT"].frames
    layout.frames(fr / "v1", 5)
    layout.frames(fr / "v2", 8)
    layout.to_parquet([{"video_id": "v1", "caption": "a"}, {"video_id": "v2", "caption": "b"}],
                      tmp_path / "video-tasks" / "MSR-VTT" / "test_1k" / "test-0.parquet")
    rows, corpus = load_task(tmp_path, "MSR-VTT", protocol="official")
    enc = KeyEncoder(lambda x: _folder(x) or x.text,
                     {"v1": [1, 0], "v2": [0, 1], "a": [1, 0], "b": [0, 1]})
    lines: list[str] = []
    (s,) = score_task(enc, TaskData(get_task("MSR-VTT"), rows, corpus), ["direct"],
                      image_root=tmp_path, protocol="official", log=lines.append)
    assert s.score == 1.0 and enc.n_images["v1"] == 5
    assert lines == ["[evaluate] MSR-VTT: 1 videos have < 8 frames; the official loader "
                     "would fail on them"]
