"""The fast default-run variant of the end-to-end test: stages 0-3 for real through the
pipeline flow (tiny model, smoke data, the oracle teacher), lineage and the stage cache
across them. The full demo (vLLM, DeepSpeed, GRPO, evaluation) is tests/e2e (slow)."""

from __future__ import annotations

import json

import pytest

from tests.flows.conftest import fast_config

STAGES_0_3 = ("prepare", "generate", "score", "select")
SECTIONS = {"generate": {"teachers": [{"id": "oracle", "backend": "oracle", "k": 2}]},
            "score": {}, "select": {}}


@pytest.fixture(scope="module")
def run03(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    cfg = fast_config(tmp_path_factory.mktemp("p03") / "run", stages=STAGES_0_3, **SECTIONS)
    return cfg, pipeline(cfg)


def test_stages_chain_by_artifact_references(run03):
    cfg, out = run03
    st = out["stages"]
    assert [st[s]["status"] for s in STAGES_0_3] == ["ran"] * 4
    # 120 smoke pairs x K=2 oracle candidates, scored one row each, one selection per pair
    assert st["generate"]["outputs"]["rationales"]["rows"] == 240
    assert st["score"]["outputs"]["scores"]["rows"] == 240
    assert st["select"]["outputs"]["selections"]["rows"] == 120
    # score's recorded input digest is generate's output digest: lineage by content
    score_state = json.loads((cfg.run_dir / "score" / "_stage.json").read_text())
    assert score_state["inputs"]["rationales"] == \
        "artifact:" + st["generate"]["outputs"]["rationales"]["digest"]
    assert score_state["inputs"]["pairs"] == \
        "artifact:" + st["prepare"]["outputs"]["pairs"]["digest"]


def test_mlflow_children_with_dataset_lineage(run03):
    from mlflow import MlflowClient

    cfg, out = run03
    c = MlflowClient(f"sqlite:///{cfg.run_dir.resolve()}/mlflow.db")
    for s in STAGES_0_3:
        r = c.get_run(out["stages"][s]["mlflow_run_id"])
        assert r.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
        assert r.info.status == "FINISHED" and r.data.metrics
    score = c.get_run(out["stages"]["score"]["mlflow_run_id"])
    ins = {d.dataset.name: {t.key: t.value for t in d.tags} for d in
           score.inputs.dataset_inputs}
    assert ins["rationales:rationales"]["mlflow.data.context"] == "input"
    assert ins["rationales:rationales"]["mmemb.digest"] == \
        out["stages"]["generate"]["outputs"]["rationales"]["digest"]
    assert ins["scores:scores"]["mlflow.data.context"] == "output"
    assert {a.path for a in c.list_artifacts(score.info.run_id, "data")} == {"data/scores"}


def test_rerun_force_and_config_change_recompute_only_what_changed(run03):
    from flows.pipeline import pipeline

    cfg, first = run03
    again = pipeline(cfg)["stages"]
    assert [again[s]["status"] for s in STAGES_0_3] == ["cached"] * 4
    # forcing generate recomputes it; its output is byte-identical (seeded), so the
    # content-keyed stages after it are still reused
    forced = pipeline(cfg, force=["generate"])["stages"]
    assert [forced[s]["status"] for s in STAGES_0_3] == ["cached", "ran", "cached", "cached"]
    assert forced["generate"]["outputs"]["rationales"]["digest"] == \
        first["stages"]["generate"]["outputs"]["rationales"]["digest"]
    # a changed selection margin reruns select only
    cfg2 = fast_config(cfg.run_dir, stages=STAGES_0_3, **{**SECTIONS, "select": {"margin": 0.0}})
    changed = pipeline(cfg2)["stages"]
    assert [changed[s]["status"] for s in STAGES_0_3] == ["cached"] * 3 + ["ran"]
    assert changed["select"]["key"] != first["stages"]["select"]["key"]
