"""Stage 3: the right candidate, the margin, counted filters, clear errors, and the demo's
acceptance numbers (the oracle's correct rationales beat wrong ones and vLLM noise)."""

from __future__ import annotations

import json

import pytest

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES, SCORES, SELECTIONS
from mmemb.configs.select import SelectConfig
from mmemb.stages import select


def _rat(pid, idx, text, status="ok", n_tokens=5, teacher="t", label=None, error=None):
    return {"pair_id": pid, "side": "query", "teacher_id": teacher, "cand_idx": idx,
            "text": text, "n_tokens": n_tokens, "finish_reason": "length"
            if status == "truncated" else "stop", "status": status, "error": error,
            "backend": "oracle", "model": None, "sampling": "{}", "prompt_version": "v",
            "seed": 1, "oracle_label": label}


def _score(pid, idx, delta, teacher="t", status="ok"):
    ok = status == "ok"
    return {"pair_id": pid, "teacher_id": teacher, "cand_idx": idx, "pool_size": 4,
            "cos_with": 0.5 if ok else None, "cos_without": 0.4 if ok else None,
            "s_with": -1.0 + delta if ok else None, "s_without": -1.0 if ok else None,
            "delta": delta if ok else None, "rank_with": 1 if ok else None,
            "rank_without": 2 if ok else None, "status": status,
            "error": None if ok else "rationale status 'error'"}


@pytest.fixture
def hand(synth, tmp_path) -> dict:
    """Three pairs with hand-made candidates and deltas."""
    pairs = io.read(synth["pairs"], PAIRS).to_pylist()[:3]
    a, b, c = (p["pair_id"] for p in pairs)
    rat = [
        # pair a: the best delta (0.9) is malformed, 0.8 truncated; 0.6 wins over 0.3
        _rat(a, 0, "first helpful rationale", label="wrong"),
        _rat(a, 1, "second one <emb> inside", label="correct"),
        _rat(a, 2, "the best one", label="correct"),
        _rat(a, 3, "cut off mid", status="truncated"),
        _rat(a, 4, None, status="error", error="engine died"),
        _rat(a, 5, "THE best   one", label="correct"),  # a duplicate of cand 2
        _rat(a, 6, "far too long", n_tokens=999),
        # pair b: every delta is below the margin -> no rationale
        _rat(b, 0, "meh", label="irrelevant"), _rat(b, 1, "worse"),
        # pair c: no candidates at all
    ]
    scores = [_score(a, 0, 0.3), _score(a, 1, 0.9), _score(a, 2, 0.6), _score(a, 3, 0.8),
              _score(a, 4, 0.0, status="skipped"), _score(a, 5, 0.7), _score(a, 6, 2.0),
              _score(b, 0, 0.05), _score(b, 1, -0.4)]
    return {"pairs": io.write(pairs, tmp_path / "pairs", PAIRS).uri,
            "rationales": io.write(rat, tmp_path / "rat", RATIONALES).uri,
            "scores": io.write(scores, tmp_path / "scores", SCORES).uri,
            "ids": (a, b, c), "out": str(tmp_path / "select")}


def test_picks_the_best_kept_candidate_and_respects_the_margin(hand):
    ids = hand.pop("ids")
    res = select.run(SelectConfig(**hand, margin=0.1, max_rationale_tokens=64))
    rows = {r["pair_id"]: r for r in io.read(res.outputs["selections"].uri,
                                            SELECTIONS).to_pylist()}
    a, b, c = (rows[i] for i in ids)
    assert (a["rationale"], a["cand_idx"], a["teacher_id"]) == ("the best one", 2, "t")
    assert a["utility"] == pytest.approx(0.6)
    assert (a["n_candidates"], a["n_kept"]) == (7, 2)
    assert b["rationale"] is None and b["cand_idx"] is None
    assert b["utility"] == pytest.approx(0.05)  # the best delta, below the margin
    assert (b["n_candidates"], b["n_kept"]) == (2, 2)
    assert c["rationale"] is None and c["utility"] is None and c["n_candidates"] == 0
    # Pair fields are copied from the pairs artifact unchanged.
    pair = io.read(hand["pairs"], PAIRS).to_pylist()[0]
    assert {k: a[k] for k in pair} == pair
    summary = json.loads(res.files["summary"].read_text())
    assert summary["filtered"] == {"status": 1, "truncated": 1, "malformed": 1,
                                   "too_long": 1, "duplicate": 1, "unscored": 0}
    assert summary["selected"] == 1 and summary["selected_share"] == pytest.approx(1 / 3)
    assert summary["oracle_selection_rate_by_label"]["correct"]["rate"] == 1.0
    assert summary["oracle_selection_rate_by_label"]["wrong"]["rate"] == 0.0
    assert res.files["delta_hist"].stat().st_size > 1000
    assert res.files["selection_by_task"].stat().st_size > 1000
    # A margin of 0.0 lets pair b's 0.05 through; a margin of 0.7 leaves nothing.
    loose = select.run(SelectConfig(**hand, margin=0.0, max_rationale_tokens=64))
    assert loose.metrics["selected_share"] == pytest.approx(2 / 3)
    strict = select.run(SelectConfig(**hand, margin=0.7, max_rationale_tokens=64))
    assert strict.metrics["selected_share"] == 0.0
    # Raising the token budget readmits the long candidate, whose delta 2.0 then wins.
    roomy = select.run(SelectConfig(**hand, margin=0.1, max_rationale_tokens=1000))
    top = {r["pair_id"]: r for r in io.read(roomy.outputs["selections"].uri,
                                           SELECTIONS).to_pylist()}[ids[0]]
    assert top["cand_idx"] == 6 and roomy.metrics["filtered_too_long"] == 0


def _decisions(res) -> list[dict]:
    """The decisions preview table as row dicts, after checking its split layout."""
    path = res.files["decisions"]
    assert path.name == "decisions.table.json"
    t = json.loads(path.read_text())
    assert set(t) == {"columns", "data"} and t["columns"] == select.DECISION_COLUMNS
    assert all(len(r) == len(t["columns"]) for r in t["data"])
    assert all(v is None or isinstance(v, (str, int, float, bool)) for r in t["data"] for v in r)
    return [dict(zip(t["columns"], r, strict=True)) for r in t["data"]]


def test_decisions_table_shows_every_verdict_with_its_reason(hand):
    a, b, _c = hand.pop("ids")
    res = select.run(SelectConfig(**hand, margin=0.1, max_rationale_tokens=64))
    rows = _decisions(res)
    got = {(r["pair_id"], r["cand_idx"]): (r["verdict"], r["reason"].split(" ")[0])
           for r in rows}
    assert got == {(a, 0): ("not_best", "below"), (a, 1): ("filtered", "malformed"),
                   (a, 2): ("selected", "best"), (a, 3): ("filtered", "truncated"),
                   (a, 4): ("filtered", "status"), (a, 5): ("filtered", "duplicate"),
                   (a, 6): ("filtered", "too_long"), (b, 0): ("below_margin", "best"),
                   (b, 1): ("not_best", "below")}  # 9 candidates < 50: all of them
    summary = json.loads(res.files["summary"].read_text())
    filtered = [r["reason"].split(" ")[0] for r in rows if r["verdict"] == "filtered"]
    assert {f: filtered.count(f) for f in select.FILTERS} == summary["filtered"]
    assert sum(r["verdict"] == "selected" for r in rows) == summary["selected"]
    by = {(r["pair_id"], r["cand_idx"]): r for r in rows}
    assert by[(a, 2)]["delta"] == pytest.approx(0.6) and by[(a, 2)]["text"] == "the best one"
    assert by[(a, 4)]["reason"] == "status (engine died)" and by[(a, 4)]["text"] is None
    assert by[(a, 0)]["task"] == io.read(hand["pairs"], PAIRS).to_pylist()[0]["dataset"]


def test_decisions_sample_agrees_with_select_pair_and_is_seeded(run23_oracle, tmp_path):
    from collections import Counter

    cfg, res = run23_oracle["select"]
    rows = _decisions(res)
    _, by_pair = select._join(cfg)
    verdicts = {}
    for pid, cands in by_pair.items():
        select.select_pair(cands, cfg, Counter())
        verdicts.update({(pid, c["teacher_id"], c["cand_idx"]): c["verdict"] for c in cands})
    assert 0 < len(rows) <= 50 < len(verdicts)
    assert all(verdicts[(r["pair_id"], r["teacher_id"], r["cand_idx"])] == r["verdict"]
               for r in rows)
    # Stratified: every outcome the run produced appears in the sample.
    assert {r["verdict"] for r in rows} == set(verdicts.values())
    assert {"selected", "not_best"} <= {r["verdict"] for r in rows}
    # Same seed, same sample; another seed, another one.
    again = select.run(cfg.model_copy(update={"out": str(tmp_path / "again")}))
    assert again.files["decisions"].read_bytes() == res.files["decisions"].read_bytes()
    other = select.run(cfg.model_copy(update={"out": str(tmp_path / "other"), "seed": 1}))
    assert [r["pair_id"] for r in _decisions(other)] != [r["pair_id"] for r in rows]


def test_bad_input_files_name_file_column_and_row(hand, tmp_path):
    ids = hand.pop("ids")
    scores = io.read(hand["scores"], SCORES).to_pylist()
    scores[3]["cand_idx"] = 42  # a score row without a rationale
    bad = io.write(scores, tmp_path / "bad_scores", SCORES).uri
    with pytest.raises(io.ContractError) as e:
        select.run(SelectConfig(**{**hand, "scores": bad}))
    msg = str(e.value)
    assert "bad_scores" in msg and "'cand_idx'" in msg and "row 3" in msg
    # A file that is not a scores artifact at all.
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"pair_id": [ids[0]], "teacher_id": ["t"]}), f)
    with pytest.raises(io.ContractError, match=r"scores\.parquet.*missing column"):
        select.run(SelectConfig(**{**hand, "scores": str(f)}))
    # A null in a required column is reported with its row.
    rat = io.read(hand["rationales"], RATIONALES)
    tbl = rat.set_column(rat.schema.get_field_index("status"), "status",
                         pa.array(["ok"] * 4 + [None] + ["ok"] * (rat.num_rows - 5)))
    f2 = tmp_path / "rat.parquet"
    pq.write_table(tbl, f2)
    with pytest.raises(io.ContractError, match=r"rat\.parquet.*'status'.*row 4"):
        select.run(SelectConfig(**{**hand, "rationales": str(f2)}))


def test_oracle_correct_rationales_are_selected_far_more_than_wrong_ones(run23_oracle):
    """Issue 4's acceptance numbers without an engine (the oracle alone), smoke world.

    Measured (seed 0): inference pairs select the correct rationale in 83%, a wrong one in
    1%, an irrelevant one in 10%. Thresholds leave room for other CPUs' numerics.
    """
    _, res = run23_oracle["select"]
    s = json.loads(res.files["summary"].read_text())
    fam = s["oracle_selection_rate_by_family_label"]
    correct = fam["inference/correct"]["rate"]
    assert correct >= 0.6
    assert correct >= 3 * fam["inference/wrong"]["rate"]
    assert correct >= 3 * fam["inference/irrelevant"]["rate"]
    overall = s["oracle_selection_rate_by_label"]
    assert overall["correct"]["rate"] >= 3 * max(overall["wrong"]["rate"],
                                                 overall["irrelevant"]["rate"])
    by_fam = s["selected_share_by_family"]
    assert by_fam["inference"] >= 0.6 and by_fam["easy"] <= 0.4
    # Deltas carry the signal, not only the argmax: correct >> irrelevant > wrong on average.
    _, sres = run23_oracle["score"]
    rat = {(r["pair_id"], r["cand_idx"]): r["oracle_label"] for r in io.read(
        run23_oracle["generate"][1].outputs["rationales"].uri, RATIONALES).to_pylist()}
    by: dict[str, list[float]] = {}
    for r in io.read(sres.outputs["scores"].uri, SCORES).to_pylist():
        if r["pair_id"].startswith(("syn_qa_", "syn_gd_")):
            by.setdefault(rat[(r["pair_id"], r["cand_idx"])], []).append(r["delta"])
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    assert mean["correct"] > mean["irrelevant"] + 1.0 > mean["wrong"] + 1.0


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_selects_correct_rationales_far_more_than_wrong_and_noise(run13):
    """The acceptance numbers of issue 4 with real vLLM noise in the mix (smoke world).

    Measured (seed 0): inference-family pairs select the oracle's correct rationale in 83%
    of cases, a wrong one in 1%, an irrelevant one in 10%, vLLM noise in 0-1%.
    """
    cfg, res = run13["select"]
    s = json.loads(res.files["summary"].read_text())
    fam = s["oracle_selection_rate_by_family_label"]
    correct = fam["inference/correct"]["rate"]
    assert correct >= 0.6
    assert correct >= 3 * fam["inference/wrong"]["rate"]
    assert correct >= 3 * fam["inference/irrelevant"]["rate"]
    noise = [s["selection_rate_by_teacher"][t]["rate"] for t in ("tiny-vllm", "tiny-vllm-stop")]
    assert all(correct >= 3 * n for n in noise)
    overall = s["oracle_selection_rate_by_label"]
    assert overall["correct"]["rate"] >= 3 * max(overall["wrong"]["rate"],
                                                 overall["irrelevant"]["rate"])
    by_fam = s["selected_share_by_family"]
    assert by_fam["inference"] >= 0.6 and by_fam["easy"] <= 0.4
    # The filters saw the vLLM statuses, and every pair got exactly one row.
    assert s["filtered"]["truncated"] > 0 and s["filtered"]["duplicate"] > 0
    rows = io.read(res.outputs["selections"].uri, SELECTIONS).to_pylist()
    assert len(rows) == s["pairs"] == 120
    assert all(r["n_candidates"] == 8 for r in rows)


def test_the_simulated_pretraining_taught_word_overlap(pretrained_tiny):
    """The held-out check the warm-up records: random weights ~0.70, after it >= 0.85."""
    info = json.loads((pretrained_tiny / "mmemb_pretrain.json").read_text())
    assert info["overlap_accuracy_after"] >= 0.85
    assert info["overlap_accuracy_after"] >= info["overlap_accuracy_before"] + 0.1


def test_cli_runs_alone_with_flags_and_reads_a_pipeline_yaml(hand, tmp_path, capsys):
    ids = hand.pop("ids")
    select.main(["--pairs", hand["pairs"], "--rationales", hand["rationales"], "--scores",
                 hand["scores"], "--out", hand["out"], "--margin", "0.0"])
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert out["metrics"]["selected_share"] == pytest.approx(2 / 3)
    rows = io.read(out["outputs"]["selections"]["uri"], SELECTIONS).to_pylist()
    assert [r["pair_id"] for r in rows] == list(ids)
    # A pipeline YAML: the section's paths are wired from run.run_dir, flags still win.
    from mmemb.configs.pipeline import load_stage_config

    y = tmp_path / "pipe.yaml"
    y.write_text("run: {run_dir: R}\nprepare: {source: tiny}\nselect: {margin: 0.3}\n"
                 "score: {tau: 0.02}\ngenerate: {teachers: [{id: o, backend: oracle}]}\n"
                 "train: {no_such_key: 1}\n")  # an invalid other section does not matter
    sel = load_stage_config("select", y, fields={"out": "X"})
    assert (sel.scores, sel.rationales, sel.pairs, sel.out, sel.margin) == (
        "R/score/scores", "R/generate/rationales", "R/data/pairs", "X", 0.3)
    sc = load_stage_config("score", y)
    assert (sc.model, sc.image_root, sc.tau) == ("R/base_model", "R/data", 0.02)
    assert load_stage_config("generate", y).out == "R/generate"
