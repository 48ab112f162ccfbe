"""First contact on a busy machine (issue 13, items 1 and 2): the commands that run no model
import no model stack, and start-up waits are generous, configurable and explained."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "vllm", "deepspeed", "transformers")

_PROBE = """
import json, sys
from flows.cli import main
try:
    rc = main(json.loads(sys.argv[1]))
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _probe(args: list[str], cwd: Path = ROOT) -> dict:
    """Run ``main(args)`` in a fresh interpreter; which heavy modules did it import?"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", [
    ["--help"], ["run", "--help"], ["ui", "--help"],
    ["config", "configs/demo.yaml"], ["config", "configs/demo.yaml", "--stage", "train"],
])
def test_help_and_config_import_no_model_stack(args):
    out = _probe(args)
    assert out["rc"] == 0
    assert out["loaded"] == [], f"mmemb {' '.join(args)} imported {out['loaded']}"


def test_status_imports_no_model_stack(tmp_path):
    from data_contracts.io import ArtifactRef  # noqa: F401  (the state's own types)
    from mmemb.stages.base import StageResult
    from tasks.cache import write_state

    model = tmp_path / "prepare" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    write_state(tmp_path, "prepare", "k" * 64, StageResult(stage="prepare",
                                                          models={"base": model},
                                                          summary="a base"),
                inputs={}, code="c", config={}, duration_s=1.0)
    out = _probe(["status", "--run-dir", str(tmp_path)])
    assert out["rc"] == 0 and out["loaded"] == [], out


def test_import_mmemb_defers_the_torchvision_shim():
    """``import mmemb`` is light, and the CPU torchvision shim still applies on the first
    ``import torchvision`` (what transformers' Qwen-VL processors do)."""
    code = ("import sys, mmemb\nfrom mmemb import _compat\n"
            "light = 'torch' not in sys.modules\n"
            "import torch\n"
            "need = '+cpu' in torch.__version__\n"
            "import torchvision.transforms\n"
            "print(light, need, _compat._APPLIED)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    light, need, applied = p.stdout.split()
    assert light == "True"
    assert applied == need  # applied exactly where torch is a +cpu build
