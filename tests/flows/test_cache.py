"""The stage cache: keys move with config, input content and code; stale outputs miss."""

from __future__ import annotations

import json
from pathlib import Path

from data_contracts import io
from data_contracts.schemas import EVAL_ROWS
from mmemb.configs.prepare import PrepareConfig
from mmemb.stages.base import StageResult
from tasks import cache


def test_code_files_follow_project_imports_only():
    files = cache.code_files("mmemb.stages.prepare")
    assert {"mmemb.stages.prepare", "mmemb.configs.prepare", "mmemb.stages.base",
            "data_contracts.io", "data_contracts.schemas", "mmemb.configs.base"} <= set(files)
    assert not any(m.startswith(("torch", "prefect", "mlflow", "tasks")) for m in files)
    # the gate's closure includes what it really uses, e.g. the GRPO loss
    assert "mmemb.losses.grpo" in cache.code_files("mmemb.stages.gate")


def test_code_version_changes_with_a_dependency(tmp_path, monkeypatch):
    pkg = tmp_path / "mmemb_fake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "dep.py").write_text("X = 1\n")
    (pkg / "stage.py").write_text("from mmemb_fake.dep import X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cache, "PROJECT_PACKAGES", ("mmemb_fake",))
    v1 = cache.code_version("mmemb_fake.stage")
    assert set(cache.code_files("mmemb_fake.stage")) == {"mmemb_fake.stage", "mmemb_fake.dep",
                                                         "mmemb_fake"}
    (pkg / "dep.py").write_text("X = 2\n")
    assert cache.code_version("mmemb_fake.stage") != v1


def test_key_moves_with_config_inputs_and_code():
    cfg = PrepareConfig(out="a", model_out="b")
    k = cache.cache_key("prepare", cfg, {"pairs": "artifact:1"}, "code1")
    assert k == cache.cache_key("prepare", PrepareConfig(out="a", model_out="b"),
                                {"pairs": "artifact:1"}, "code1")
    assert k != cache.cache_key("prepare", PrepareConfig(out="a", model_out="b", seed=1),
                                {"pairs": "artifact:1"}, "code1")
    assert k != cache.cache_key("prepare", cfg, {"pairs": "artifact:2"}, "code1")
    assert k != cache.cache_key("prepare", cfg, {"pairs": "artifact:1"}, "code2")


def test_path_digest_kinds(tmp_path):
    ref = io.write([{"row_id": "0", "task": "t", "suite": "s", "tgt_id": ["a"],
                     "tgt_text": ["x"], "tgt_img_path": [""], "tgt_rel": [1.0]}],
                   tmp_path / "ev", EVAL_ROWS)
    assert cache.path_digest(tmp_path / "ev") == "artifact:" + ref.digest
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"abc")
    memo = cache.DigestMemo(tmp_path / "memo.json")
    d1 = cache.path_digest(model, memo)
    memo.save()
    assert d1.startswith("dir:")
    assert len(json.loads((tmp_path / "memo.json").read_text())) == 2
    (model / "mmemb_pretrain.json").write_text('{"seconds": 93.1}')  # a log, not the model
    (model / "checkpoints").mkdir()
    (model / "checkpoints" / "optimizer.pt").write_bytes(b"state")
    assert cache.path_digest(model, memo) == d1
    (model / "model.safetensors").write_bytes(b"abd")
    assert cache.path_digest(model, memo) != d1
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"x")
    assert cache.path_digest(images) is None  # identified by its path, not hashed
    assert cache.path_digest(tmp_path / "missing") is None


def test_lookup_hits_and_misses(tmp_path):
    ref = io.write([{"row_id": "0", "task": "t", "suite": "s", "tgt_id": ["a"],
                     "tgt_text": ["x"], "tgt_img_path": [""], "tgt_rel": [1.0]}],
                   tmp_path / "out" / "ev", EVAL_ROWS)
    res = StageResult("prepare", outputs={"eval": ref}, metrics={"m": 1.5},
                      step_metrics=[(1, {"loss": 2.0})], summary="s")
    cache.write_state(tmp_path, "prepare", "K", res, inputs={}, code="c", config={},
                      duration_s=1.0)
    hit, why = cache.lookup(tmp_path, "prepare", "K")
    assert hit is not None and why == ""
    assert hit.outputs["eval"] == ref and hit.metrics == {"m": 1.5}
    assert hit.step_metrics == [(1, {"loss": 2.0})]
    assert cache.lookup(tmp_path, "prepare", "OTHER") == (None, "inputs, config or code changed")
    # an output rewritten with other content: the cached result is stale
    io.write([{"row_id": "1", "task": "t", "suite": "s", "tgt_id": ["a"], "tgt_text": ["y"],
               "tgt_img_path": [""], "tgt_rel": [1.0]}], tmp_path / "out" / "ev", EVAL_ROWS)
    miss, why = cache.lookup(tmp_path, "prepare", "K")
    assert miss is None and "changed since it was written" in why
    # a torn state file is a miss, not a crash
    cache.state_path(tmp_path, "prepare").write_text("{not json")
    assert cache.lookup(tmp_path, "prepare", "K") == (None, "no previous result")
    assert Path(tmp_path, "prepare", "_stage.json").is_file()
