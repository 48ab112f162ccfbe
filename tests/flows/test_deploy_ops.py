"""Issue 13, item 19: the GPU image the deployments use, the Kubernetes worker's extra, and
`prefect deploy` refusing unset template variables instead of shipping their literal text."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_gpu_image_the_deployments_name():
    ins = _instructions()
    froms = [v for k, v in ins if k == "FROM"]
    args = dict(v.split("=", 1) for k, v in ins if k == "ARG" and "=" in v)
    base = froms[0].replace("${CUDA_IMAGE}", args.get("CUDA_IMAGE", ""))
    assert re.match(r"nvidia/cuda:\d+\.\d+.*-devel-", base), base  # nvcc for DeepSpeed ops
    # the working directory is the MMEMB_HOME the docs and the pull step use
    assert [v for k, v in ins if k == "WORKDIR"] == ["/opt/mmemb"]
    assert "MMEMB_HOME=/opt/mmemb" in " ".join(v for k, v in ins if k == "ENV")
    assert "export MMEMB_IMAGE=registry/mmemb:0.1.0 MMEMB_HOME=/opt/mmemb" in \
        (ROOT / "docs" / "deploy.md").read_text()
    runs = " ".join(v for k, v in ins if k == "RUN")
    assert args["EXTRAS"] == "gpu,kubernetes,ray" and 'pip install ".[${EXTRAS}]"' in runs
    # every package setuptools installs is copied, and the configs the deployments name
    pkgs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = {v.split()[0] for k, v in ins if k == "COPY"}
    assert {p.rstrip("*") for p in pkgs} | {"configs", "deploy"} <= copied
    for d in yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]:
        cfg = (d.get("parameters") or {}).get("config_path")
        assert cfg is None or cfg.split("/")[0] in copied
    users = [v for k, v in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0")
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().split()
    assert {"runs", ".venv", ".git"} <= set(ignore)


def test_kubernetes_worker_extra_is_declared():
    opt = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (req,) = opt["kubernetes"]
    assert req.startswith("prefect-kubernetes")
    assert "kubernetes" in [v for k, v in _instructions() if k == "ARG"
                            and v.startswith("EXTRAS=")][0]
    assert "pip install -e '.[kubernetes]'" in (ROOT / "docs" / "deploy.md").read_text()


def test_deploy_check_names_what_to_export(capsys):
    from tasks.deploy_check import main, missing

    env = {"MLFLOW_TRACKING_URI": "{{ $MLFLOW_TRACKING_URI }}", "MMEMB_HOME": "/opt/mmemb"}
    assert missing(["MLFLOW_TRACKING_URI", "MMEMB_HOME", "MMEMB_IMAGE"], env) == \
        ["MLFLOW_TRACKING_URI", "MMEMB_IMAGE"]
    os.environ.pop("MMEMB_TEST_UNSET", None)
    assert main(["MMEMB_TEST_UNSET"]) == 2
    assert "export MMEMB_TEST_UNSET=..." in capsys.readouterr().err


def test_every_deployment_checks_its_variables_before_registering():
    doc = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    top = doc["build"][0]["prefect.deployments.steps.run_shell_script"]["script"]
    assert top.split()[:3] == ["python", "-m", "tasks.deploy_check"]
    assert {"MLFLOW_TRACKING_URI", "MMEMB_HOME"} <= set(top.split()[3:])
    for d in doc["deployments"]:
        if d["work_pool"]["name"] == "mmemb-k8s":
            s = d["build"][0]["prefect.deployments.steps.run_shell_script"]["script"]
            assert "MMEMB_IMAGE" in s.split(), d["name"]


def test_prefect_deploy_refuses_an_unset_tracking_uri(prefect_harness, tmp_path):
    import prefect.settings
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as c:
        try:
            c.create_work_pool(WorkPoolCreate(name="mmemb-process", type="process"))
            created = True
        except Exception:  # noqa: BLE001 - created by an earlier test of the session
            created = False
        before = {d.name for d in c.read_deployments()}
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
               PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(),
               PREFECT_HOME=str(tmp_path), MMEMB_HOME=str(ROOT))
    out = subprocess.run([str(Path(venv_bin) / "prefect"), "--no-prompt", "deploy",
                          "--prefect-file", str(ROOT / "deploy" / "prefect.yaml"), "--name",
                          "score-process"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "needs MLFLOW_TRACKING_URI" in text and "export MLFLOW_TRACKING_URI=" in text
    with get_client(sync_client=True) as c:
        after = {d.name for d in c.read_deployments()}
        if created:  # leave the session's server as found (test_deploy.py creates it)
            c.delete_work_pool("mmemb-process")
    assert "score-process" not in after - before
