"""deploy/: every deployment's entrypoint is a real flow that accepts its parameters, the
Kubernetes work-pool template declares every placeholder it uses, the scripts parse."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _deployments():
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["deployments"]


def test_a_deployment_per_stage_and_pipeline_on_both_pools():
    names = {d["name"] for d in _deployments()}
    for stage in ("pipeline", "prepare", "generate", "score", "select", "train", "gate",
                  "evaluate"):
        assert {f"{stage}-process", f"{stage}-k8s"} <= names, stage
    pools = {d["work_pool"]["name"] for d in _deployments()}
    assert pools == {"mmemb-process", "mmemb-k8s"}
    gpus = {d["name"]: d["work_pool"]["job_variables"].get("gpu_count")
            for d in _deployments() if d["work_pool"]["name"] == "mmemb-k8s"}
    assert gpus["train-k8s"] == 8 and gpus["evaluate-k8s"] == 1 and gpus["prepare-k8s"] == 0


@pytest.mark.parametrize("dep", _deployments(), ids=lambda d: d["name"])
def test_entrypoints_are_flows_that_take_the_parameters(dep, monkeypatch):
    import inspect

    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(DEPLOY.parent)  # entrypoints are relative to the repository root
    fl = load_flow_from_entrypoint(dep["entrypoint"])
    params = inspect.signature(fl.fn).parameters
    assert set(dep.get("parameters") or {}) <= set(params), dep["name"]
    cfg = (dep.get("parameters") or {}).get("config_path")
    assert cfg is None or (DEPLOY.parent / cfg).is_file()


def test_kubernetes_template_declares_its_placeholders():
    tpl = json.loads((DEPLOY / "kubernetes" / "base-job-template.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(tpl["job_configuration"])))
    declared = set(tpl["variables"]["properties"])
    assert used <= declared, used - declared
    assert {"gpu_count", "cpu_request", "memory_request", "image"} <= declared
    res = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert res["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    jv = {k for d in _deployments() if d["work_pool"]["name"] == "mmemb-k8s"
          for k in d["work_pool"]["job_variables"]}
    assert jv <= declared, jv - declared


@pytest.mark.parametrize("script", sorted((DEPLOY / "slurm").glob("*.sbatch")),
                         ids=lambda p: p.name)
def test_slurm_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH" in script.read_text()


def test_mlflow_compose_uses_postgres_and_s3_and_binds_loopback():
    c = yaml.safe_load((DEPLOY / "mlflow" / "docker-compose.yaml").read_text())
    cmd = " ".join(c["services"]["mlflow"]["command"].split())
    assert "--artifacts-destination s3://" in cmd and "--serve-artifacts" in cmd
    assert "postgresql" in c["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    for svc in c["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_prefect_deploy_registers_deployments(prefect_harness, tmp_path):
    """`prefect deploy` itself reads deploy/prefect.yaml against a real API (the harness)."""
    import os

    import prefect.settings
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as c:
        c.create_work_pool(WorkPoolCreate(name="mmemb-process", type="process"))
    # The venv's bin may not be on PATH (CI runs .venv/bin/python without activating it).
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(),
           "PREFECT_HOME": str(tmp_path), "MMEMB_HOME": str(DEPLOY.parent),
           "MLFLOW_TRACKING_URI": "http://mlflow.test:5000"}
    prefect_cli = str(Path(venv_bin) / "prefect")
    out = subprocess.run([prefect_cli, "--no-prompt", "deploy", "--prefect-file",
                          str(DEPLOY / "prefect.yaml"), "--name", "pipeline-process",
                          "--name", "train-process"], cwd=DEPLOY.parent, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with get_client(sync_client=True) as c:
        deps = {d.name: d for d in c.read_deployments()}
    assert {"pipeline-process", "train-process"} <= set(deps)
    d = deps["train-process"]
    assert d.entrypoint == "flows/train.py:flow"
    assert d.parameters == {"config_path": "configs/single_gpu.yaml"}
    assert d.job_variables["env"]["MLFLOW_TRACKING_URI"] == "http://mlflow.test:5000"
    assert d.pull_steps[0]["prefect.deployments.steps.set_working_directory"]["directory"] \
        == str(DEPLOY.parent)
