"""Stage 1: real vLLM generation, statuses, sharding, resume after SIGKILL, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from data_contracts import io
from data_contracts.schemas import RATIONALES
from mmemb.configs.base import ConfigError
from mmemb.configs.generate import GenerateConfig
from mmemb.stages import generate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.vllm
def test_vllm_generation_k_rows_per_prompt_with_statuses(vllm_run):
    cfg, res = vllm_run
    rows = io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()
    n_pairs = 24
    per = Counter((r["pair_id"], r["teacher_id"]) for r in rows)
    k = {t.id: t.k for t in cfg.teachers}
    assert len(per) == n_pairs * 3
    assert all(n == k[t] for (_, t), n in per.items())  # exactly K rows per prompt
    assert len(rows) == n_pairs * (2 + 2 + 4)
    for r in rows:
        if r["backend"] != "vllm":
            assert r["prompt_tokens"] is None and r["raw_text"] is None  # the oracle
            continue
        sampling = json.loads(r["sampling"])
        assert sampling["n"] == 2 and r["prompt_version"] == "rationale-query-v1"
        assert sampling["top_k"] == 0 and sampling["think_output"] == "answer"
        assert r["model"] == str(cfg.teachers[0].model)
        assert 0 < r["prompt_tokens"] < cfg.teachers[0].max_model_len  # measured, submitted
        if r["raw_text"] is not None:  # noise that wrote a </think>: the text after it
            assert r["text"] == r["raw_text"].partition("</think>")[2].strip() or \
                "</think>" not in r["raw_text"]
        if r["status"] == "truncated":
            assert r["finish_reason"] == "length"
            assert r["n_tokens"] == sampling["max_tokens"] or r["raw_text"] is not None
        elif r["status"] == "ok":
            assert r["finish_reason"] == "stop" and r["text"].strip()
            assert r["n_tokens"] <= sampling["max_tokens"] or r["raw_text"] is not None
        else:
            assert r["status"] == "empty" and r["finish_reason"] == "stop"
            assert not (r["text"] or "").strip()
        if "a" in sampling.get("stop", []):
            assert "a" not in (r["text"] or "")  # the stop string ends the text, excluded
        if any(t in (r["text"] or "") for t in ("<think>", "<emb>", "<|im_start|>")):
            assert r["error"].startswith("malformed:")
    by = Counter((r["teacher_id"], r["status"]) for r in rows)
    assert by[("tiny-vllm", "truncated")] > 0.5 * n_pairs * 2  # random LM: rarely stops
    assert by[("tiny-vllm-stop", "ok")] > 0 and by[("tiny-vllm-stop", "truncated")] > 0
    assert by[("oracle", "ok")] == n_pairs * 4
    # Per-request seeds: the two teachers' seeds differ, and each row records its own.
    seeds = {(r["pair_id"], r["teacher_id"]): r["seed"] for r in rows}
    assert len(set(seeds.values())) == len(seeds)
    # Same prompt, same seed, same engine settings -> the same samples (texts differ
    # between candidates of one prompt: they are samples, not copies).
    texts = [r["text"] for r in rows if r["teacher_id"] == "tiny-vllm"]
    assert len(set(texts)) > 0.9 * len(texts)
    assert res.metrics["shards"] == 3 * 2  # 3 teachers x ceil(24 / 16) blocks


def _hf_config(synth, out: Path, **kw) -> dict:
    return {"pairs": str(synth["pairs"]), "image_root": str(synth["image_root"]),
            "out": str(out), "shard_size": 1, "limit": 12, "torch_threads": 1,
            "teachers": [{"id": "hf", "backend": "hf", "model": kw.pop("model"), "k": 2,
                          "batch_size": 8, "sampling": {"max_tokens": 6}}], **kw}


def test_resume_after_sigkill_gives_the_same_rows(tiny_model, synth, tmp_path):
    """Kill -9 the stage mid-run, rerun: finished shards are skipped, rows are identical."""
    import yaml

    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(yaml.safe_dump(
        {"generate": _hf_config(synth, tmp_path / "killed", model=str(tiny_model))}))
    shards = tmp_path / "killed" / "rationales" / "_shards"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "mmemb.stages.generate", "--config",
                             str(cfg_path), "--section", "generate"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.parquet"))) < 3:
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in shards.glob("*.parquet"))
    assert 3 <= len(done) < 12, f"kill landed outside the run ({len(done)} of 12 shards)"
    assert not (tmp_path / "killed" / "rationales" / io.MANIFEST).exists()
    import pyarrow.parquet as pq

    for p in shards.glob("*.parquet"):  # every visible shard is whole (temp file + rename)
        assert pq.read_table(p).num_rows == 2

    resumed = generate.run(GenerateConfig.from_yaml(cfg_path, "generate"))
    assert resumed.metrics["shards_skipped"] == len(done)
    assert resumed.metrics["shards_processed"] == 12 - len(done)
    straight = generate.run(GenerateConfig.from_dict(
        _hf_config(synth, tmp_path / "straight", model=str(tiny_model))))
    a = io.read(resumed.outputs["rationales"].uri, RATIONALES).to_pylist()
    b = io.read(straight.outputs["rationales"].uri, RATIONALES).to_pylist()
    assert len(a) == 24 and a == b
    assert {r["status"] for r in a} <= {"ok", "truncated", "empty"}
    # A third run finds the complete artifact and does nothing.
    again = generate.run(GenerateConfig.from_yaml(cfg_path, "generate"))
    assert again.metrics["shards_processed"] == 0


def test_cli_runs_alone_with_direct_flags(synth, tmp_path, capsys):
    generate.main(["--pairs", str(synth["pairs"]), "--image-root", str(synth["image_root"]),
                   "--oracle-k", "3", "--out", str(tmp_path / "g"), "--limit", "10",
                   "--shard-size", "4"])
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert out["outputs"]["rationales"]["rows"] == 30
    rows = io.read(tmp_path / "g" / "rationales", RATIONALES).to_pylist()
    labels = Counter(r["oracle_label"] for r in rows)
    # K=3, shares 0.5/0.25/0.25 -> 1.5/0.75/0.75: floors 1/0/0, the two largest remainders
    # (.75, .75) get the two left -> one of each per pair.
    assert labels == {"correct": 10, "wrong": 10, "irrelevant": 10}
    assert all(r["status"] == "ok" and r["backend"] == "oracle" for r in rows)


def test_config_errors_say_what_to_do(synth):
    base = {"pairs": str(synth["pairs"])}
    with pytest.raises(ConfigError, match="needs 'model'"):
        GenerateConfig.from_dict({**base, "teachers": [{"id": "v", "backend": "vllm"}]})
    with pytest.raises(ConfigError, match="appear twice"):
        GenerateConfig.from_dict({**base, "teachers": [{"id": "o", "backend": "oracle"},
                                                       {"id": "o", "backend": "oracle"}]})
    with pytest.raises(ConfigError, match="prompt_version"):
        GenerateConfig.from_dict({**base, "teachers": [{"id": "o", "backend": "oracle",
                                                        "prompt_version": "v0"}]})
    with pytest.raises(ConfigError, match="unknown key"):
        GenerateConfig.from_dict({**base, "teachers": [{"id": "o", "backend": "oracle",
                                                        "temprature": 1.0}]})


def test_bad_pairs_file_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"pair_id": ["a"], "dataset": ["x"]}), bad)
    with pytest.raises(io.ContractError, match=r"pairs\.parquet.*missing column"):
        generate.run(GenerateConfig.from_dict({"pairs": str(bad), "out": str(tmp_path / "o"),
                                               "teachers": [{"id": "o",
                                                             "backend": "oracle"}]}))


def test_prompts_over_the_budget_are_rows_not_generations(tiny_model, synth, tmp_path):
    """max_model_len below every prompt: nothing is generated, every row is too_long with
    its measured length, and the stage reports the share."""
    cfg = _hf_config(synth, tmp_path / "tight", model=str(tiny_model), limit=4)
    cfg["teachers"][0]["max_model_len"] = 64
    res = generate.run(GenerateConfig.from_dict(cfg))
    rows = io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()
    assert len(rows) == 8 and {r["status"] for r in rows} == {"too_long"}
    assert all(r["prompt_tokens"] >= 64 and r["text"] is None for r in rows)
    assert all(r["error"].startswith(f"prompt of {r['prompt_tokens']:,} tokens ")
               for r in rows)
    assert res.metrics["share_too_long"] == 1.0 and res.metrics["share_ok"] == 0.0
