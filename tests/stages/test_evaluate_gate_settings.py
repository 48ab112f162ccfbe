"""The gate's budget and threshold travel with its model into the evaluate stage."""

from __future__ import annotations

import json
import shutil

import pytest

from data_contracts import io
from data_contracts.schemas import EMBEDDINGS
from mmemb.configs.evaluate import EvaluateConfig
from mmemb.model.gate_settings import GATE_FILE, GateSettings
from mmemb.stages.evaluate import build_encoder, gate_settings, run


@pytest.fixture
def gated_model(tiny_model, tmp_path):
    """The tiny checkpoint as a gate stage leaves it: ``mmemb_gate.json`` beside it."""
    policy = tmp_path / "policy"
    shutil.copytree(tiny_model, policy)
    (policy / GATE_FILE).write_text(json.dumps({"threshold": 0.0, "budget": 7}))
    return policy


def test_settings_file_defaults_and_explicit_values(tmp_path, gated_model):
    assert GateSettings.load(tmp_path / "no-gate") == GateSettings(64, 0.5)
    assert GateSettings.load("Qwen/some-hub-id").budget == 64
    got = GateSettings.load(gated_model)
    assert (got.budget, got.threshold) == (7, 0.0) and got.budget_from.endswith(GATE_FILE)
    mixed = got.override(budget=3)
    assert (mixed.budget, mixed.threshold, mixed.budget_from) == (3, 0.0, "set")
    assert "budget 3 (set explicitly)" in mixed.describe()
    assert "threshold 0 (from the gate" in mixed.describe()
    (tmp_path / GATE_FILE).write_text('{"budget": 0}')
    with pytest.raises(ValueError, match="expected"):
        GateSettings.load(tmp_path)


def test_evaluation_adaptive_mode_uses_the_gates_budget(gated_model, synth, tmp_path):
    common = dict(model=str(gated_model), eval=str(synth["eval"]),
                  image_root=str(synth["image_root"]), modes=["direct", "adaptive"],
                  tasks=["syn_qa_count"], max_queries=3, batch_size=4)
    cfg = EvaluateConfig(**common, out=str(tmp_path / "ev"))
    assert (cfg.budget, cfg.threshold) == (None, None)  # unset: the gate's
    enc, _ = build_encoder(cfg)
    assert (enc.budget, enc.threshold) == (7, 0.0)
    res = run(cfg)
    assert res.metrics["gate.budget"] == 7.0 and res.metrics["gate.threshold"] == 0.0
    assert "budget 7, threshold 0 (from the gate" in res.summary
    assert res.metrics["adaptive.reasoning_ratio"] == 1.0  # threshold 0: every query reasons
    rows = [r for p in (tmp_path / "ev" / "cache").rglob("query/embeddings")
            for r in io.read(p, EMBEDDINGS).to_pylist() if r["mode"] == "adaptive"]
    assert rows and all(0 < r["n_gen_tokens"] <= 7 and r["reasoned"] for r in rows)
    assert all(r["p_think"] is not None and r["p_think"] > 0.0 for r in rows)
    # An explicit setting wins and is reported.
    explicit = EvaluateConfig(**common, out=str(tmp_path / "ev2"), budget=2)
    assert (gate_settings(explicit).budget, gate_settings(explicit).threshold) == (2, 0.0)
    res2 = run(explicit)
    assert res2.metrics["gate.budget"] == 2.0 and "budget 2 (set explicitly)" in res2.summary
