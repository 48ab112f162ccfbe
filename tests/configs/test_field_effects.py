"""What a field changes is declared on the field and read by every digest."""

from __future__ import annotations

from data_contracts.files import atomic_write_json, json_digest, sha256_file
from mmemb.configs.base import field_effect
from mmemb.configs.generate import GenerateConfig
from mmemb.configs.score import ScoreConfig
from mmemb.configs.train import TrainConfig
from tasks import cache


def _score(**kw) -> ScoreConfig:
    return ScoreConfig(pairs="p", rationales="r", model="m", **kw)


def test_declared_effects():
    assert field_effect(ScoreConfig, "torch_threads") == "none"
    assert field_effect(ScoreConfig, "out") == "report"
    assert field_effect(ScoreConfig, "tau") == "result"
    assert field_effect(TrainConfig, "eval") == "report"


def test_cache_key_ignores_runtime_fields_only():
    base = cache.cache_key("score", _score(), {}, "code")
    assert cache.cache_key("score", _score(torch_threads=3, progress=False, batch_size=7),
                           {}, "code") == base
    assert cache.cache_key("score", _score(out="elsewhere"), {}, "code") != base
    assert cache.cache_key("score", _score(tau=0.07), {}, "code") != base


def test_resume_view_keeps_result_fields_only():
    t = TrainConfig(model="m", data="d")
    view = t.digest_view("resume")
    assert "lr" in view and "lora" in view
    for name in ("out", "eval", "log_every", "save_every", "resume", "eval_batch_size"):
        assert name not in view, name
    assert t.model_copy(update={"log_every": 99}).digest_view("resume") == view
    assert t.model_copy(update={"lr": t.lr * 2}).digest_view("resume") != view


def test_nested_configs_filtered_by_their_own_declarations():
    g = GenerateConfig(pairs="p", teachers=[{"id": "t", "model": "m"}])
    view = g.digest_view("resume")
    assert "replica" not in view and "out" not in view
    assert isinstance(view["teachers"], list) and view["teachers"][0]["id"] == "t"


def test_file_digest_and_atomic_json(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(p, {"b": 1, "a": [1, 2]})
    import hashlib
    import json

    assert json.loads(p.read_text()) == {"b": 1, "a": [1, 2]}
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert json_digest({"a": 1, "b": 2}) == json_digest({"b": 2, "a": 1})
    assert [f.name for f in p.parent.iterdir()] == ["x.json"]  # no temp file left
