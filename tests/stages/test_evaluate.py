"""The evaluation stage end to end with the real tiny embedder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_contracts import io
from data_contracts.schemas import EVAL_RESULTS, EVAL_ROWS
from mmemb.configs.base import ConfigError
from mmemb.configs.evaluate import EvaluateConfig
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput
from mmemb.stages.evaluate import PER_TASK_COLUMNS, WORST_COLUMNS, run
from mmemb.tables import cut

REPO = Path(__file__).resolve().parents[2]


def _layout():
    """The MMEB layout writers (tests/data/fixtures/mmeb_layout.py)."""
    import mmeb_layout

    return mmeb_layout


def _independent_hit1(tiny_model, synth, task: str, batch_size: int) -> float:
    """hit@1 of one task computed without the harness (:func:`_independent_hits`)."""
    return float(np.mean(_independent_hits(tiny_model, synth, task, batch_size)))


def _independent_hits(tiny_model, synth, task: str, batch_size: int) -> list[float]:
    """Per-query hit@1 of one task computed without the harness: same inputs, same batches,
    plain numpy ranking (a hit needs the positive strictly above every negative)."""
    emb = Embedder.from_pretrained(tiny_model)
    rows = [r for r in io.read(synth["eval"], EVAL_ROWS).to_pylist() if r["task"] == task]
    cands: dict[tuple, int] = {}
    for r in rows:
        for t, p in zip(r["tgt_text"], r["tgt_img_path"], strict=True):
            cands.setdefault((r["tgt_inst"], t, p), len(cands))

    def enc(inputs):
        out = [emb.encode(inputs[s:s + batch_size], batch_size=batch_size).embeddings
               for s in range(0, len(inputs), batch_size)]
        return np.concatenate([o.numpy() for o in out])

    c = enc([EmbedInput(t, i) for (i, t, _p) in cands])  # text-only candidates
    q = enc([EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"],
                                 synth["image_root"]) for r in rows])
    hits = []
    for k, r in enumerate(rows):
        idx = [cands[(r["tgt_inst"], t, p)] for t, p in zip(r["tgt_text"], r["tgt_img_path"],
                                                             strict=True)]
        s = c[idx] @ q[k]
        hits.append(float(s[0] > s[1:].max()))
    return hits


def _preview(path: Path, columns: list[str]) -> list[dict]:
    """A preview table's rows, after checking MLflow's split layout and JSON-scalar cells."""
    t = json.loads(path.read_text())
    assert set(t) == {"columns", "data"} and t["columns"] == columns
    assert all(len(r) == len(columns) for r in t["data"])
    assert all(v is None or isinstance(v, (str, int, float, bool)) for r in t["data"] for v in r)
    return [dict(zip(columns, r, strict=True)) for r in t["data"]]


def test_tiny_embedder_direct_on_smoke_synthetic(tiny_model, synth, tmp_path):
    cfg = EvaluateConfig(model=str(tiny_model), eval=str(synth["eval"]),
                         image_root=str(synth["image_root"]), out=str(tmp_path / "ev"),
                         modes=["direct"], batch_size=16)
    steps = []
    res = run(cfg, log=lambda s, m: steps.append((s, m)))
    table = io.read(res.outputs["results"].uri, EVAL_RESULTS).to_pylist()
    assert [r["task"] for r in table] == ["syn_cls_shape", "syn_ret_caption", "syn_qa_count",
                                          "syn_qa_absent", "syn_gd_spatial"]
    assert all(r["status"] == "ok" and r["mode"] == "direct" and r["metric"] == "hit@1"
               and r["n_queries"] == 12 and r["reasoning_ratio"] == 0.0 for r in table)
    scores = {r["task"]: r["score"] for r in table}
    assert scores["syn_qa_count"] == pytest.approx(
        _independent_hit1(tiny_model, synth, "syn_qa_count", 16))
    assert res.metrics["direct.overall"] == pytest.approx(np.mean(list(scores.values())))
    assert res.metrics["direct.latency_p95_ms"] >= res.metrics["direct.latency_p50_ms"] > 0
    assert len(steps) == 5 and res.metrics["inputs_embedded"] > 60
    md = res.files["report"].read_text()
    assert "# Evaluation: synthetic" in md and f"{100 * scores['syn_qa_count']:.1f} (hit@1)" in md
    assert res.files["plot"].is_file()
    _check_previews(res, table, tiny_model, synth)
    # Rerun: every task comes from the embedding cache, same numbers.
    again = run(cfg)
    assert again.metrics["inputs_embedded"] == 0
    assert again.metrics["direct.overall"] == res.metrics["direct.overall"]


def _check_previews(res, table, tiny_model, synth) -> None:
    """The per-task table repeats the results; the worst queries are the lowest per-query
    scores (as computed without the harness), lowest first, with their gold and top hits."""
    assert res.files["per_task"].name == "per_task.table.json"
    per_task = _preview(res.files["per_task"], PER_TASK_COLUMNS)
    assert [(r["task"], r["mode"], r["score"], r["n_queries"]) for r in per_task] == [
        (r["task"], r["mode"], r["score"], r["n_queries"]) for r in table]
    assert res.files["worst_queries"].name == "worst_queries.table.json"
    worst = _preview(res.files["worst_queries"], WORST_COLUMNS)
    assert len(worst) == 5 * len(table)  # 5 per task (12 queries each), one mode
    for t in {r["task"] for r in table}:
        got = [w["score"] for w in worst if w["task"] == t]
        assert got == sorted(got)
    task = "syn_qa_count"
    hits = _independent_hits(tiny_model, synth, task, 16)
    rows = [r for r in io.read(synth["eval"], EVAL_ROWS).to_pylist() if r["task"] == task]
    mine = [w for w in worst if w["task"] == task]
    assert [w["score"] for w in mine] == sorted(hits)[:5]
    assert [w["row_id"] for w in mine] == [rows[k]["row_id"]
                                           for k in np.argsort(hits, kind="stable")[:5]]
    by_id = {r["row_id"]: r for r in rows}
    for w in mine:
        r = by_id[w["row_id"]]
        assert w["mode"] == "direct" and w["query"] == cut(r["qry_text"])
        assert w["gold"] == cut(r["tgt_text"][0])  # the positive is the first target
        assert {w["top1"], w["top2"], w["top3"]} <= {cut(x) for x in r["tgt_text"]}
        assert (w["top1"] == w["gold"]) == (w["score"] == 1.0)


def test_stage_on_mmeb_download_layout(tiny_model, tmp_path):
    root = _layout().write_mmeb_v2(tmp_path / "mmeb-v2")
    cfg = EvaluateConfig(model=str(tiny_model), eval=str(root), out=str(tmp_path / "ev"),
                         modes=["direct"], skip_missing=True, modalities=["video", "visdoc"],
                         image_cache=str(tmp_path / "pages"), num_frames=4)
    res = run(cfg)
    table = {r["task"]: r for r in io.read(res.outputs["results"].uri,
                                           EVAL_RESULTS).to_pylist()}
    assert sorted(table) == ["HMDB51", "MSR-VTT", "QVHighlight", "ViDoRe_arxivqa", "Video-MME"]
    assert all(r["status"] == "ok" for r in table.values())
    assert table["ViDoRe_arxivqa"]["metric"] == "ndcg@5"
    assert 0 < table["ViDoRe_arxivqa"]["score"] <= 1  # graded NDCG of two queries
    assert table["HMDB51"]["metric"] == "hit@1" and table["HMDB51"]["n_queries"] == 3
    assert io.exists(tmp_path / "ev" / "data" / "eval_rows")
    assert io.exists(tmp_path / "ev" / "data" / "eval_corpus")
    md = res.files["report"].read_text()
    assert "Partial run" in md and "(ndcg@5)" in md and "(hit@1)" in md
    assert "missing 37 tasks" in res.summary  # 18 video + 24 visdoc - 5
    # Fewer than 5 queries per task: all are shown, so their mean is the task's score; a
    # globally ranked task names its gold and top hits from the corpus.
    worst = _preview(res.files["worst_queries"], WORST_COLUMNS)
    for t, r in table.items():
        got = [w["score"] for w in worst if w["task"] == t]
        assert got == sorted(got) and len(got) == r["n_queries"]
        assert np.mean(got) == pytest.approx(r["score"])
    from data_contracts.schemas import EVAL_CORPUS

    corpus = {c["cand_text"] or c["cand_img_path"] or c["cand_id"]
              for c in io.read(tmp_path / "ev" / "data" / "eval_corpus", EVAL_CORPUS).to_pylist()
              if c["task"] == "ViDoRe_arxivqa"}
    for w in (w for w in worst if w["task"] == "ViDoRe_arxivqa"):
        assert w["gold"].split(" (+")[0] in corpus and {w["top1"], w["top2"], w["top3"]} <= corpus


def test_adaptive_encoder_plugs_into_the_stage(tiny_model, synth, tmp_path):
    cfg = EvaluateConfig(model=str(tiny_model), eval=str(synth["eval"]),
                         image_root=str(synth["image_root"]), out=str(tmp_path / "ev"),
                         modes=["direct", "reason", "adaptive"], tasks=["syn_qa_count"],
                         max_queries=3, budget=3, batch_size=4)
    res = run(cfg)
    table = {r["mode"]: r for r in io.read(res.outputs["results"].uri,
                                           EVAL_RESULTS).to_pylist()}
    assert table["direct"]["reasoning_ratio"] == 0.0 and table["direct"]["mean_gen_tokens"] == 0
    assert table["reason"]["reasoning_ratio"] == 1.0
    assert 0 < table["reason"]["mean_gen_tokens"] <= 3
    assert 0.0 <= table["adaptive"]["reasoning_ratio"] <= 1.0
    # Latency is reported for every mode (its size is a benchmark's business, not a test's).
    assert all(res.metrics[f"{m}.latency_mean_ms"] > 0 for m in ("direct", "reason", "adaptive"))


def test_config_from_pipeline_yaml_is_wired():
    from mmemb.configs.pipeline import load_stage_config

    cfg = load_stage_config("evaluate", REPO / "configs" / "demo.yaml")
    assert (cfg.model, cfg.eval, cfg.image_root, cfg.out) == (
        "runs/demo/gate/policy", "runs/demo/data/eval", "runs/demo/data", "runs/demo/evaluate")
    cfg = load_stage_config("evaluate", REPO / "configs" / "demo.yaml",
                            fields={"modes": ["direct"], "out": "elsewhere"})
    assert cfg.modes == ["direct"] and cfg.out == "elsewhere"


@pytest.mark.parametrize("bad, why", [
    ({"modes": []}, "modes is empty"),
    ({"modes": ["direct", "direct"]}, "repeats a mode"),
    ({"baseline_mode": "direct"}, "baseline_mode is set but baseline is not"),
    ({"modes": ["direct"], "reason_on_candidates": True}, "has no effect"),
    ({"modez": ["direct"]}, "unknown key"),
])
def test_config_rejects_bad_combinations(bad, why):
    with pytest.raises(ConfigError, match=why):
        EvaluateConfig.from_dict({"model": "m", "eval": "e", **bad})


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generation_gives_the_transformers_scores(tiny_model, synth, tmp_path):
    """generation='vllm' writes the rationales with an engine on the same checkpoint; greedy
    decoding then gives the same reason-mode scores as transformers (the tiny model may
    break one near-tie differently, hence the tolerance)."""
    common = dict(model=str(tiny_model), eval=str(synth["eval"]),
                  image_root=str(synth["image_root"]), modes=["reason"],
                  tasks=["syn_qa_count", "syn_cls_shape"], max_queries=6, budget=6)
    hf = run(EvaluateConfig(**common, out=str(tmp_path / "hf")))
    vl = run(EvaluateConfig(**common, out=str(tmp_path / "vllm"), generation="vllm"))
    assert vl.metrics["reason.overall"] == pytest.approx(hf.metrics["reason.overall"], abs=20)
    table = {r["mode"]: r for r in io.read(vl.outputs["results"].uri,
                                           EVAL_RESULTS).to_pylist()}
    assert table["reason"]["reasoning_ratio"] == 1.0
    assert 0 < table["reason"]["mean_gen_tokens"] <= 6
