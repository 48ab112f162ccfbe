"""The Ray deployment files parse, and the commands they run resolve against the real
config: the KubeRay RayJob (deploy/kuberay/) and the Slurm Ray script (deploy/slurm/)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import yaml

from mmemb.configs.distributed import DistributedSettings
from mmemb.configs.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
SLURM = ROOT / "deploy" / "slurm" / "ray-pipeline.sbatch"
VALUES = {"MMEMB_IMAGE": "registry/mmemb:0.1.0", "RUN_DIR": "/shared/runs/x", "WORKERS": "4",
          "GPUS_PER_WORKER": "8", "ACTORS": "8", "GPUS_PER_ACTOR": "4", "EMBED_ACTORS": "32",
          "STAGES": "prepare,generate,score,select", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def _envsubst(text: str, values: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced as envsubst / the shell do."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def _pinned_ray() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'"ray\[data\]==([0-9.]+)"', text).group(1)


def _run_command(argv: list[str]) -> tuple[str, list[str]]:
    """(config path, overrides) of an ``mmemb run`` / ``flows.cli run`` argv: its --set
    values, and --stages as the CLI applies it (run.stages)."""
    i = argv.index("run")
    sets = [argv[j + 1] for j, a in enumerate(argv) if a == "--set"]
    sets += [f"run.stages=[{argv[j + 1]}]" for j, a in enumerate(argv) if a == "--stages"]
    return argv[i + 1], sets


def _check_overrides(config: str, sets: list[str]) -> PipelineConfig:
    """Every override resolves on the real config; the three Ray stages attach to the
    cluster (address auto) with the actor counts asked for."""
    assert (ROOT / config).is_file()
    cfg = PipelineConfig.load(ROOT / config, run_dir="/shared/runs/x", overrides=sets)
    for stage in ("generate", "score", "evaluate"):
        d = getattr(cfg, stage).distributed
        assert isinstance(d, DistributedSettings)
        assert (d.backend, d.address) == ("ray", "auto")
    return cfg


def test_rayjob_manifest_parses_and_its_command_resolves():
    raw = RAYJOB.read_text()
    used = set(re.findall(r"\$\{(\w+)\}", raw))
    assert used <= VALUES.keys(), used - VALUES.keys()  # the header documents each one
    job = yaml.safe_load(_envsubst(raw, VALUES))
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == _pinned_ray()
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"  # the flow runs there, no actor
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["replicas"] == 4 and gpu["rayStartParams"]["num-gpus"] == "8"
    for pod in (head["template"]["spec"], gpu["template"]["spec"]):
        (c,) = pod["containers"]
        assert c["image"] == VALUES["MMEMB_IMAGE"]
        assert {"name": "shared", "mountPath": "/shared"} in c["volumeMounts"]
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
        assert claims["shared"] == {"claimName": "mmemb-shared"}
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["mmemb", "run"]
    cfg = _check_overrides(*_run_command(argv))
    assert cfg.run.stages == ["prepare", "generate", "score", "select"]
    assert (cfg.generate.distributed.actors, cfg.generate.distributed.gpus_per_actor) == (8, 4)
    assert cfg.score.distributed.actors == 32
    assert 8 * 4 <= 4 * 8  # generation actors x GPUs fit the worker group's GPUs


def test_slurm_ray_script_parses_and_its_command_resolves():
    subprocess.run(["bash", "-n", str(SLURM)], check=True)
    text = SLURM.read_text()
    assert "ray start --head" in text and 'ray start --address="$RAY_ADDRESS"' in text
    # the flow's command, with the script's shell variables at example values
    cmd = text[text.index("python -m flows.cli run"):]
    cmd = cmd.replace("\\\n", " ").splitlines()[0]
    env = {"CONFIG": "configs/cluster.yaml", "RUN_DIR": "/shared/runs/x", "STAGES":
           "prepare,generate,score,select,train,gate,evaluate", "GEN_ACTORS": "8",
           "GPUS_PER_ACTOR": "4", "EMBED_ACTORS": "32", "MASTER_ADDR": "node0", "N": "4"}
    cmd = _envsubst(cmd, env)
    argv = shlex.split(cmd)
    cfg = _check_overrides(*_run_command(argv))
    assert cfg.generate.distributed.gpus_per_actor == 4
    assert cfg.evaluate.distributed.actors == 32
    assert cfg.launch["train"].rdzv_endpoint == "node0:29400"
    assert cfg.run.stages[-1] == "evaluate"
