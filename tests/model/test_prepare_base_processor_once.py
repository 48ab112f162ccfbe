"""prepare_base reads the processor once: to find the missing tokens, then reuses it."""

from __future__ import annotations

import json

from mmemb.model import loading
from mmemb.stages.prepare import PREPARED_FILE, prepare_base


def test_prepare_base_loads_the_processor_once(real_layout, tmp_path, monkeypatch):
    calls = []
    real = loading.load_processor

    def counting(path, *a, **kw):
        calls.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(loading, "load_processor", counting)
    out, info = prepare_base(real_layout("qwen2_vl"), tmp_path / "base")
    assert len(calls) == 1, calls
    assert info["base_tokens_added"] == 3  # <think>, </think>, <emb>: all new on Qwen2-VL
    done = json.loads((out / PREPARED_FILE).read_text())
    assert done["added_tokens"] == ["<think>", "</think>", "<emb>"]
