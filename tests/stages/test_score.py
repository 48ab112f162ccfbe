"""Stage 2: the counterfactual math by hand, deterministic pools, the stage's glue, resume."""

from __future__ import annotations

import math

import pytest
import torch

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES, SCORES
from mmemb.configs.generate import GenerateConfig
from mmemb.configs.score import ScoreConfig
from mmemb.model.prompts import EmbedInput
from mmemb.stages import generate, score
from mmemb.stages.score import build_pools, counterfactual


def test_counterfactual_matches_a_hand_computed_example():
    q0 = torch.tensor([1.0, 0.0])  # the query alone points at the negative
    qk = torch.tensor([[0.0, 2.0],  # r0: straight at the positive (length is normalised away)
                       [1.0, 1.0]])  # r1: halfway -> a tie between positive and negative
    pool = torch.tensor([[0.0, 1.0],  # positive
                         [3.0, 0.0]])  # negative
    cf = counterfactual(q0, qk, pool, tau=1.0)
    # s(q) = log softmax([0, 1])[0] = -log(1 + e)
    assert float(cf.s_without) == pytest.approx(-math.log(1 + math.e), abs=1e-9)
    assert float(cf.cos_without) == pytest.approx(0.0, abs=1e-12)
    # r0: cos = [1, 0] -> s = 1 - log(e + 1); r1: cos = [.7071, .7071] -> s = -log 2
    assert cf.s_with.tolist() == pytest.approx([1 - math.log(math.e + 1), -math.log(2)])
    assert cf.delta.tolist() == pytest.approx([1.0, math.log(1 + math.e) - math.log(2)])
    assert cf.cos_with.tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert int(cf.rank_without) == 2
    assert cf.rank_with.tolist() == [1, 2]  # a tie counts against the positive
    # tau scales the logits: with tau = 0.5, r0's delta is exactly (1 - 0) / 0.5 = 2.
    cf2 = counterfactual(q0, qk[:1], pool, tau=0.5)
    assert float(cf2.delta[0]) == pytest.approx(2.0)
    assert float(cf2.s_with[0]) == pytest.approx(2 - math.log(math.e ** 2 + 1))


def test_counterfactual_positive_need_not_be_first():
    pool = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a = counterfactual(torch.tensor([0.0, 1.0]), torch.tensor([[1.0, 0.0]]), pool, 1.0, pos=1)
    assert float(a.s_without) == pytest.approx(1 - math.log(1 + math.e))
    assert float(a.delta[0]) == pytest.approx(-1.0)
    assert int(a.rank_without) == 1 and a.rank_with.tolist() == [2]


def _pairs(synth) -> list[dict]:
    return io.read(synth["pairs"], PAIRS).to_pylist()


def test_pools_are_deterministic_and_well_formed(synth):
    pairs = _pairs(synth)
    a = build_pools(pairs, pool_size=5, seed=3)
    assert a == build_pools(list(reversed(pairs)), pool_size=5, seed=3)  # order-independent
    assert a != build_pools(pairs, pool_size=5, seed=4)
    for p in pairs:
        pool = a[p["pair_id"]]
        assert pool[0] == (p["pos_inst"] or "", p["pos_text"], p["pos_img_path"] or "")
        assert pool[1][1] == p["neg_text"][0]  # the mined hard negative comes first
        assert len(pool) == len(set(pool)) <= 5
        assert all(t[1] != p["pos_text"] for t in pool[1:])  # no copy of the positive
        same_ds = {q["pos_text"] for q in pairs if q["dataset"] == p["dataset"]}
        assert all(t[1] in same_ds | set(p["neg_text"]) for t in pool)
    no_hard = build_pools(pairs, pool_size=5, seed=3, hard_negatives=False)
    assert all(t[1] in {q["pos_text"] for q in pairs} for v in no_hard.values() for t in v)


@pytest.fixture(scope="module")
def small(synth, tmp_path_factory) -> dict:
    """4 pairs per task; oracle rationales (K=3) plus failed, truncated, malformed rows."""
    root = tmp_path_factory.mktemp("score")
    pairs = [p for p in _pairs(synth) if int(p["pair_id"].rsplit("-", 1)[1]) < 4]
    pairs_uri = io.write(pairs, root / "pairs", PAIRS).uri
    res = generate.run(GenerateConfig.from_dict({
        "pairs": pairs_uri, "image_root": str(synth["image_root"]), "out": str(root / "gen"),
        "teachers": [{"id": "oracle", "backend": "oracle", "k": 3}]}))
    rows = io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()
    rows[0].update(status="error", text=None, error="engine died")
    rows[1].update(status="truncated", finish_reason="length")
    rows[4].update(text=rows[4]["text"] + " <|image_pad|>")  # would break the prompt
    rows.append({**rows[5], "side": "target", "text": "a target-side rationale"})
    return {"pairs": pairs_uri, "rationales": io.write(rows, root / "rationales", RATIONALES).uri,
            "image_root": str(synth["image_root"])}


def test_score_stage_rows_match_a_direct_recomputation(tiny_model, small, tmp_path):
    cfg = ScoreConfig(**small, model=str(tiny_model), out=str(tmp_path / "s"), pool_size=4,
                      tau=0.1, shard_size=8, progress=False, torch_threads=1)
    res = score.run(cfg)
    rows = io.read(res.outputs["scores"].uri, SCORES).to_pylist()
    assert len(rows) == 60  # every query-side candidate has a row (the target one is not)
    assert res.metrics["other_side_rows"] == 1
    by = {(r["pair_id"], r["cand_idx"]): r for r in rows}
    rat = io.read(small["rationales"], RATIONALES).to_pylist()
    assert by[(rat[0]["pair_id"], 0)]["status"] == "skipped"
    assert "'error'" in by[(rat[0]["pair_id"], 0)]["error"]
    assert by[(rat[1]["pair_id"], 1)]["status"] == "skipped"
    assert "malformed" in by[(rat[4]["pair_id"], rat[4]["cand_idx"])]["error"]
    assert sum(r["status"] == "ok" for r in rows) == 57
    # Recompute one pair in the middle of a shard by hand with the embedder.
    from mmemb.model.embedder import Embedder

    emb = Embedder.from_pretrained(tiny_model)
    pairs = {p["pair_id"]: p for p in io.read(small["pairs"], PAIRS).to_pylist()}
    pid = rat[30]["pair_id"]  # in the middle of the second shard
    p = pairs[pid]
    q = EmbedInput.from_row(p["qry_inst"], p["qry_text"], p["qry_img_path"], small["image_root"])
    pool_keys = build_pools(list(pairs.values()), 4, 0)[pid]
    pool = emb.encode([EmbedInput.from_row(i, t, im, small["image_root"])
                       for i, t, im in pool_keys]).embeddings
    cands = [r for r in rat if r["pair_id"] == pid and r["side"] == "query"]
    q0 = emb.encode([q]).embeddings[0]
    qk = emb.encode([EmbedInput(q.text, q.instruction, q.images, c["text"]) for c in cands],
                    mode="reason").embeddings
    cos = torch.nn.functional.normalize(pool, dim=-1) @ torch.nn.functional.normalize(
        torch.cat([q0[None], qk]), dim=-1).T  # [P, 1 + K]
    logp = torch.log_softmax(cos / 0.1, dim=0)[0]  # [1 + K]
    for j, c in enumerate(cands):
        r = by[(pid, c["cand_idx"])]
        assert r["pool_size"] == 4
        assert r["s_without"] == pytest.approx(float(logp[0]), abs=1e-4)
        assert r["s_with"] == pytest.approx(float(logp[1 + j]), abs=1e-4)
        assert r["delta"] == pytest.approx(float(logp[1 + j] - logp[0]), abs=1e-4)
        assert r["cos_with"] == pytest.approx(float(cos[0, 1 + j]), abs=1e-5)
        assert r["rank_without"] == 1 + int((cos[1:, 0] >= cos[0, 0]).sum())


def test_score_resumes_by_shard(tiny_model, small, tmp_path, monkeypatch):
    """A crash in the second embedding shard keeps the first; the rerun embeds only the
    shards left and equals an uninterrupted run; a complete run, and a rescoring at another
    tau (same inputs: the vectors are reused), load no model."""
    kw = dict(**small, model=str(tiny_model), pool_size=3, shard_size=8, progress=False,
              torch_threads=1)
    calls = {"n": 0, "crash": True}
    real = score.embed_sorted

    def crash_in_second_shard(emb, inputs, mode, batch_size, desc, *a, **k):
        calls["n"] += 1  # two passes (direct, reason) per vectors shard
        if calls["crash"] and desc.startswith("00001 "):
            raise RuntimeError("simulated crash")
        return real(emb, inputs, mode, batch_size, desc, *a, **k)

    monkeypatch.setattr(score, "embed_sorted", crash_in_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        score.run(ScoreConfig(out=str(tmp_path / "a"), **kw))
    assert len(list((tmp_path / "a" / "vectors" / "_shards").glob("*.parquet"))) == 1
    assert not (tmp_path / "a" / "scores").exists()
    calls.update(n=0, crash=False)  # count the passes of the rerun
    resumed = score.run(ScoreConfig(out=str(tmp_path / "a"), **kw))
    n_shards = len(score.plan_inputs(score.load_score_inputs(ScoreConfig(
        out=str(tmp_path / "a"), **kw)), 8).shards)
    assert resumed.metrics["vector_shards_skipped"] == 1
    assert calls["n"] == 2 * (n_shards - 1)  # only the shards left were embedded
    monkeypatch.setattr(score, "embed_sorted", real)
    straight = score.run(ScoreConfig(out=str(tmp_path / "b"), **kw))
    a = io.read(resumed.outputs["scores"].uri, SCORES).to_pylist()
    b = io.read(straight.outputs["scores"].uri, SCORES).to_pylist()
    assert a == b and len(a) == 60

    def no_model(cfg):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(score, "_load_embedder", no_model)
    again = score.run(ScoreConfig(out=str(tmp_path / "b"), **kw))
    assert io.read(again.outputs["scores"].uri, SCORES).to_pylist() == b
    hotter = score.run(ScoreConfig(out=str(tmp_path / "b"), **{**kw, "tau": 0.5}))
    assert hotter.metrics["vector_shards_skipped"] == n_shards
    c = io.read(hotter.outputs["scores"].uri, SCORES).to_pylist()
    assert [r["cos_with"] for r in c] == [r["cos_with"] for r in b]  # same vectors
    assert [r["s_with"] for r in c] != [r["s_with"] for r in b]  # another temperature


def test_rationales_of_unknown_pairs_are_a_clear_error(tiny_model, small, tmp_path):
    rows = io.read(small["rationales"], RATIONALES).to_pylist()
    rows[7]["pair_id"] = "no-such-pair"
    bad = io.write(rows, tmp_path / "bad", RATIONALES).uri
    with pytest.raises(io.ContractError) as e:
        score.run(ScoreConfig(pairs=small["pairs"], rationales=bad, model=str(tiny_model),
                              out=str(tmp_path / "s")))
    msg = str(e.value)
    assert "bad" in msg and "'pair_id'" in msg and "row 7" in msg and "no-such-pair" in msg


def test_resume_stamp_of_a_real_layout_base_is_hashed_once(real_layout, tmp_path):
    """The score stage's weights identity is the checkpoint's content, memoised in its out
    folder: a rerun reads no weights (the memo is not rewritten), a changed weight file
    changes the stamp."""
    import json
    import shutil

    from mmemb.stages.score import _model_stamp

    base = tmp_path / "base"
    shutil.copytree(real_layout("qwen2_vl"), base)
    out = tmp_path / "score"
    first = _model_stamp(str(base), str(out))
    memo = out / "_digests.json"
    hashed = json.loads(memo.read_text())
    assert any(k.endswith("model.safetensors") for k in hashed)
    mtime = memo.stat().st_mtime_ns
    assert _model_stamp(str(base), str(out)) == first
    assert memo.stat().st_mtime_ns == mtime  # nothing hashed again
    with open(base / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert _model_stamp(str(base), str(out)) != first
    assert _model_stamp("Qwen/Qwen2-VL-2B-Instruct", str(out)) == ["Qwen/Qwen2-VL-2B-Instruct"]
