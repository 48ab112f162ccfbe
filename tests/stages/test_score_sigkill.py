"""Stage 2 killed with SIGKILL while embedding, and again while scoring: every file left is
whole, the rerun resumes the finished shards and its artifacts equal an uninterrupted
run's byte for byte (the vectors store and the scores)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_contracts import io
from mmemb.configs.generate import GenerateConfig
from mmemb.stages import generate
from tests.faults.harness import audit

pytestmark = pytest.mark.slow


def _cmd(pairs: str, rationales: str, model: Path, image_root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mmemb.stages.score", "--pairs", pairs, "--rationales",
            rationales, "--model", str(model), "--image-root", str(image_root), "--out",
            str(out), "--shard-size", "16", "--torch-threads", "1", "--no-progress"]


def _digests(out: Path) -> dict[str, str]:
    return {a: json.loads((out / a / io.MANIFEST).read_text())["digest"]
            for a in ("vectors", "scores")}


def test_sigkill_while_embedding_or_scoring_loses_nothing(tiny_model, synth, tmp_path):
    gen = generate.run(GenerateConfig.from_dict({
        "pairs": str(synth["pairs"]), "image_root": str(synth["image_root"]),
        "out": str(tmp_path / "gen"), "teachers": [{"id": "oracle", "backend": "oracle",
                                                     "k": 4}]}))
    args = (str(synth["pairs"]), gen.outputs["rationales"].uri, tiny_model,
            synth["image_root"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref = subprocess.run(_cmd(*args, tmp_path / "ref"), env=env, capture_output=True,
                         text=True, timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    for what, shards, wait_for in (("vectors", "vectors/_shards/*.parquet", 2),
                                   ("scores", "scores/_shards/*.parquet", 1)):
        out = tmp_path / f"killed-{what}"
        p = subprocess.Popen(_cmd(*args, out), env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while len(list(out.glob(shards))) < wait_for and p.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, f"the run ended before {wait_for} {what} shard(s) existed"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        left = audit(out)
        assert left.broken == [] and left.shards >= wait_for
        rerun = subprocess.run(_cmd(*args, out), env=env, capture_output=True, text=True,
                               timeout=900)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "[shards] resuming:" in rerun.stdout
        assert _digests(out) == _digests(tmp_path / "ref")
