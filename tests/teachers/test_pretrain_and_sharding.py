"""The simulated pretraining (seeded, it learns word overlap) and the shard runner."""

from __future__ import annotations

import random

import pytest
import torch

from data_contracts import io
from data_contracts.schemas import SCORES
from mmemb.model.pretrain import _vocab, make_example, pretrain_tiny
from mmemb.sharding import run_sharded, split


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_pretraining_is_seeded_and_keeps_the_files_vllm_needs(tiny_model, tmp_path):
    """(That it teaches word overlap is checked on the full warm-up: test_select.py.)"""
    a = pretrain_tiny(tiny_model, steps=4, seed=1, batch_size=4, out=tmp_path / "a",
                      check=False)
    b = pretrain_tiny(tiny_model, steps=4, seed=1, batch_size=4, out=tmp_path / "b",
                      check=False)
    wa, wb, w0 = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tiny_model)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    assert any(not torch.equal(wa[k], w0[k]) for k in wa)  # and they did move
    assert a["curve"] == b["curve"] and len(a["curve"]) == 2  # steps 0 and 3
    for f in ("config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "mmemb_embedding.json", "mmemb_pretrain.json"):
        assert (tmp_path / "a" / f).is_file(), f


def test_pretraining_examples_share_words_only_with_the_positive():
    rng, vocab = random.Random(0), _vocab()
    for _ in range(200):
        _, query, pos, neg = make_example(rng, vocab)
        strip = lambda s: [w for w in s.split() if w not in ("the", "a")]  # noqa: E731
        assert all(w in query.split() for w in strip(pos))  # the positive's words are in it
        extra = [w for w in strip(neg) if w not in strip(pos)]
        assert len(extra) <= 1 and all(w not in query.split() for w in extra)


def _row(pid: str, i: int) -> dict:
    return {"pair_id": pid, "teacher_id": "t", "cand_idx": i, "pool_size": 2, "cos_with": 0.1,
            "cos_without": 0.0, "s_with": -1.0, "s_without": -1.5, "delta": 0.5,
            "rank_with": 1, "rank_without": 2, "status": "ok", "error": None}


def test_shards_resume_and_a_changed_fingerprint_discards_them(tmp_path):
    items = [f"p{i}" for i in range(10)]
    shards = [(f"{i:03d}", b) for i, b in enumerate(split(items, 3))]
    seen: list[str] = []

    def process(name, block, fail_at=None):
        if name == fail_at:
            raise RuntimeError("boom")
        seen.append(name)
        return [_row(p, 0) for p in block]

    with pytest.raises(RuntimeError):
        run_sharded(shards, tmp_path / "s", SCORES, lambda n, b: process(n, b, "002"), "fp1")
    assert seen == ["000", "001"]
    res = run_sharded(shards, tmp_path / "s", SCORES, process, "fp1")
    assert seen == ["000", "001", "002", "003"] and res.skipped == ["000", "001"]
    assert [r["pair_id"] for r in io.read(res.ref.uri, SCORES).to_pylist()] == items
    again = run_sharded(shards, tmp_path / "s", SCORES, process, "fp1")
    assert again.reused and len(seen) == 4
    other = run_sharded(shards, tmp_path / "s", SCORES, process, "fp2")  # config changed
    assert not other.reused and other.processed == ["000", "001", "002", "003"]


def test_replicas_split_the_shards_and_replica_zero_assembles(tmp_path):
    shards = [(f"{i:03d}", [f"p{i}"]) for i in range(5)]
    mk = lambda n, b: [_row(b[0], 0)]  # noqa: E731
    r1 = run_sharded(shards, tmp_path / "s", SCORES, mk, "fp", replica=1, replicas=2)
    assert r1.processed == ["001", "003"] and r1.ref is None
    r0 = run_sharded(shards, tmp_path / "s", SCORES, mk, "fp", replica=0, replicas=2)
    assert r0.processed == ["000", "002", "004"] and r0.ref.rows == 5
    with pytest.raises(ValueError, match="replica"):
        run_sharded(shards, tmp_path / "t", SCORES, mk, "fp", replica=2, replicas=2)
