"""`mmemb run` on real-layout Qwen2-VL and Qwen3-VL folders: every stage, the vLLM teacher,
no manual step (configs/real_smoke.yaml). The folders are what a hub download holds (real
tokenizer without `<emb>`, chat template, processor and generation configs, the padded
151,936-row vocabulary) with small random weights. Slow: minutes per family on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
REPO = Path(__file__).resolve().parents[2]
STAGES = ("prepare", "generate", "score", "select", "train", "gate", "evaluate")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from mmemb.data.synth import generate

    return generate(tmp_path_factory.mktemp("real-data"), size="smoke", seed=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_whole_pipeline_on_a_real_layout(real_layout, data, family, tmp_path):
    src = real_layout(family)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = {"prepare.model": src, "prepare.pairs": data["pairs"], "prepare.eval": data["eval"],
            "prepare.image_root": data["image_root"]}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "configs/real_smoke.yaml",
                          "--run-dir", str(run_dir), "--json", str(tmp_path / "out.json"),
                          *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=3600)
    secs = time.perf_counter() - t0
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    print(f"{family}: whole pipeline {secs:.0f}s")
    res = json.loads((tmp_path / "out.json").read_text())
    assert [res["stages"][s]["status"] for s in STAGES] == ["ran"] * 7

    # the student base: the tokens added once, on padding rows, in the source dtype
    base = run_dir / "base_model"
    info = json.loads((base / "mmemb_prepared.json").read_text())
    assert info["added_tokens"] == (["<emb>"] if family == "qwen3_vl"
                                    else ["<think>", "</think>", "<emb>"])
    assert info["dtype"] == "bfloat16" and info["embedding_rows"] == 151936
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    assert size(base) == size(src)

    # stage 1 ran the vLLM teacher on the base, with its own chat template
    import pyarrow.parquet as pq

    rat = pq.read_table(run_dir / "generate" / "rationales").to_pylist()
    vllm_rows = [r for r in rat if r["backend"] == "vllm"]
    assert vllm_rows and {r["status"] for r in vllm_rows} <= {"ok", "truncated", "empty"}
    # stage 2 scored every non-failed candidate (it stopped here before); stage 4 learned
    assert res["stages"]["score"]["status"] == "ran"
    tr = json.loads((run_dir / "train" / "train_summary.json").read_text())
    assert tr["loss_last"] < tr["loss_first"]
    # Every trainable tensor moved, except (Qwen3-VL) the last deepstack merger's 6: on this
    # 2-layer layout its features are added after the last decoder layer, at image positions
    # only, so no loss reaches it (zero gradient, checked by hand; the real 4B adds them
    # after decoder layers 0-2 of 36).
    assert tr["params_trainable"] - tr["params_changed"] == (6 if family == "qwen3_vl" else 0)
    # students are saved in the source dtype (bf16), the same size as the source
    for model in (run_dir / "train" / "student", run_dir / "gate" / "policy"):
        assert json.loads((model / "config.json").read_text())["dtype"] == "bfloat16", model
        assert size(model) == size(src), model
    modes = {m["mode"] for m in res["modes"]}
    assert modes == {"direct", "reason", "adaptive"}
