"""How a stage's process(es) start: in the task, as a subprocess, under torchrun or DeepSpeed.

Training and RL on a cluster need several processes per node and several nodes; the
Prefect task that owns the stage stays one process on node 0 and *launches* them:

* ``torchrun`` with a c10d rendezvous (``--rdzv-endpoint host:port``): every node runs the
  same command (on Slurm ``prefix: [srun, --nodes=N, --ntasks-per-node=1]`` does that from
  this one task); ranks find each other at the endpoint.
* ``deepspeed --hostfile``: the DeepSpeed launcher reaches the other hosts over ssh/pdsh,
  which is how a Kubernetes pod or a plain VM group runs multi-node from one task.

Each launched process runs :mod:`tasks.worker`, which calls the stage's ``run`` on every
rank; rank 0 alone logs step metrics to the stage's MLflow run and writes the result JSON
that this module reads back. vLLM's own tensor/data parallelism is configured in the
generate section (``tensor_parallel_size`` etc.) and needs no launcher: the engine spawns
its workers itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from data_contracts.io import ContractError
from mmemb.configs.base import ConfigError, StageConfig
from mmemb.configs.pipeline import LaunchConfig
from mmemb.procs import stop_tree
from mmemb.redact import redact_text
from mmemb.stages.base import StageResult

RESULT_FILE = "_launch_result.json"
CONFIG_FILE = "_launch_config.yaml"


class StageFailed(RuntimeError):
    """A launched stage failed; ``transient`` tells the retry policy whether to try again."""

    def __init__(self, message: str, *, transient: bool = False, kind: str = ""):
        super().__init__(message)
        self.transient = transient
        self.kind = kind


# --------------------------------------------------------------------------- retry policy

_NOT_TRANSIENT = (ContractError, ConfigError, ValueError, TypeError, KeyError, AttributeError,
                  ImportError, FileNotFoundError, PermissionError, NotADirectoryError,
                  IsADirectoryError, MemoryError, NotImplementedError, AssertionError)
_TRANSIENT_ERRNO = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
                    errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH,
                    errno.EHOSTUNREACH, errno.ESTALE, errno.EPIPE, errno.EADDRINUSE}
_TRANSIENT_TEXT = re.compile(
    r"engine core initialization failed|engine.*(failed to start|start-?up)|"
    r"timed? ?out|rendezvous|nccl|gloo|address already in use|connection (refused|reset)|"
    r"temporar(y|ily) (failure|unavailable)|resource temporarily unavailable|"
    r"broken pipe|errno 5\b|input/output error|stale file handle", re.IGNORECASE)


def is_transient(exc: BaseException) -> bool:
    """Retry engine start-up and I/O hiccups; never bad input, config errors or bugs."""
    flag = getattr(exc, "transient", None)
    if flag is not None:
        return bool(flag)
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, InterruptedError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNO
    if isinstance(exc, RuntimeError):
        return bool(_TRANSIENT_TEXT.search(str(exc)))
    return False


_DISK_FULL_ERRNO = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_DISK_FULL_TEXT = re.compile(r"\[errno (28|27|122)\]|no space left on device|file too large|"
                             r"disk quota exceeded", re.IGNORECASE)
DISK_FULL_HINT = ("The disk is full (or a quota or file-size limit was reached): free space "
                  "where the stage writes and rerun the same command; finished stages and "
                  "shards are kept and reused.")


def disk_full_hint(err: BaseException | str) -> str:
    """:data:`DISK_FULL_HINT` when a failure is a full disk (ENOSPC, EDQUOT, EFBIG), else ''.

    Not transient (an immediate retry fails the same way), so it is not retried; what the
    user needs to know is that it is the disk, and that a rerun after freeing space loses
    nothing.
    """
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNO:
        return DISK_FULL_HINT
    return DISK_FULL_HINT if _DISK_FULL_TEXT.search(str(err)) else ""


# --------------------------------------------------------------------------- commands

def worker_command(stage: str, config_path: Path, result_path: Path) -> list[str]:
    return ["-m", "tasks.worker", "--stage", stage, "--config", str(config_path),
            "--result", str(result_path)]


def build_command(launch: LaunchConfig, stage: str, config_path: Path, result_path: Path,
                  python: str | None = None) -> list[str]:
    """The argv that starts the stage's process(es) on this node."""
    py = python or sys.executable
    w = worker_command(stage, config_path, result_path)
    # ${MASTER_ADDR} etc. are resolved here, on the node that launches (e.g. set by sbatch)
    launch = launch.model_copy(update={
        "rdzv_endpoint": launch.rdzv_endpoint and os.path.expandvars(launch.rdzv_endpoint),
        "hostfile": launch.hostfile and os.path.expandvars(launch.hostfile),
        "master_addr": launch.master_addr and os.path.expandvars(launch.master_addr),
        "prefix": [os.path.expandvars(x) for x in launch.prefix]})
    if launch.launcher == "subprocess":
        cmd = [py, *w]
    elif launch.launcher == "torchrun":
        multi = launch.nnodes > 1 or bool(launch.rdzv_endpoint)
        # one node: torchrun whose stores listen on 127.0.0.1 (mmemb.training.torchrun_local)
        runner = "torch.distributed.run" if multi else "mmemb.training.torchrun_local"
        cmd = [py, "-m", runner, f"--nnodes={launch.nnodes}",
               f"--nproc-per-node={launch.nproc_per_node}"]
        if multi:
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                    f"--rdzv-id={launch.rdzv_id or 'mmemb-' + stage}"]
        else:
            cmd += ["--standalone", "--local-addr=127.0.0.1"]
        cmd += w
    elif launch.launcher == "deepspeed":
        cmd = [py, "-m", "deepspeed.launcher.runner"]
        if launch.hostfile:
            cmd += ["--hostfile", launch.hostfile, f"--num_nodes={launch.nnodes}"]
        else:
            cmd += ["--num_nodes=1"]
        cmd += [f"--num_gpus={launch.nproc_per_node}"] if launch.nproc_per_node else []
        if launch.master_addr:
            cmd += [f"--master_addr={launch.master_addr}"]
        if launch.master_port:
            cmd += [f"--master_port={launch.master_port}"]
        cmd += ["--module", *w[1:]]
    else:
        raise ConfigError(f"launcher {launch.launcher!r} does not start processes")
    return [*launch.prefix, *cmd]


def _expand_env(launch_cfg: LaunchConfig) -> dict[str, str]:
    """``launch.<stage>.env`` with ``${NAME}`` references expanded from this environment: a
    config names the variable that holds a secret, never its value (the config is the flow's
    parameters, stored in Prefect's database)."""
    out = {}
    for k, v in launch_cfg.env.items():
        val = os.path.expandvars(v)
        if "${" in val:
            raise ConfigError(f"launch env {k}={v!r} refers to an environment variable that is "
                              "not set here; export it before the run")
        out[k] = val
    return out


def _env(launch_cfg: LaunchConfig, env: dict[str, str] | None) -> dict[str, str]:
    full = {**os.environ, **_expand_env(launch_cfg), **(env or {})}
    root = str(Path(__file__).resolve().parent.parent)
    full["PYTHONPATH"] = os.pathsep.join(
        [root, *(p for p in full.get("PYTHONPATH", "").split(os.pathsep) if p)])
    return full


def _failure(stage: str, rc: int, result_path: Path, seconds: float) -> StageFailed:
    info = {}
    err_path = Path(str(result_path) + ".error")
    if err_path.is_file():
        try:
            info = json.loads(err_path.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
    msg = info.get("message") or (f"exit status {rc}; it wrote no error report, so the "
                                  "cause is in its output above")
    if hint := disk_full_hint(msg):
        msg = f"{msg}. {hint}"
    # killed by a signal other than SIGKILL (OOM killer, operator): a retry may help
    return StageFailed(f"stage {stage!r} failed in its launched process(es) after "
                       f"{seconds:.0f}s: {info.get('type', 'Error')}: {msg}",
                       transient=bool(info.get("transient", rc < 0 and rc != -9)),
                       kind=info.get("type", ""))


def _prepare_paths(state_dir: Path, tag: str = "") -> tuple[Path, Path]:
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = state_dir / CONFIG_FILE.replace(".yaml", f"{tag}.yaml")
    result_path = state_dir / RESULT_FILE.replace(".json", f"{tag}.json")
    result_path.unlink(missing_ok=True)
    Path(str(result_path) + ".error").unlink(missing_ok=True)
    return config_path, result_path


def _wait(proc: subprocess.Popen, stage: str, timeout_s: float | None) -> int:
    """Wait for a launched process; on a time-out, an interrupt or any error, stop it *and
    every process it started* (torchrun's ranks, an engine's workers) before raising:
    stopping only ``proc`` would leave them holding the GPUs and ports."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        stop_tree(proc)
        raise StageFailed(f"stage {stage!r} ran past timeout_s={timeout_s}",
                          transient=False, kind="timeout") from e
    except BaseException:
        stop_tree(proc)
        raise


def launch(launch_cfg: LaunchConfig, stage: str, cfg: StageConfig, state_dir: Path,
           env: dict[str, str] | None = None) -> tuple[StageResult, int]:
    """Run the stage in fresh process(es); returns its result and the live-logged step count.
    ``launcher: replicas`` is an alias of one process with ``distributed.backend: ray``."""
    from tasks.cache import result_from_state

    if launch_cfg.launcher == "replicas":
        return launch_replicas(launch_cfg, stage, cfg, state_dir, env)
    config_path, result_path = _prepare_paths(state_dir)
    cfg.to_yaml(config_path)
    cmd = build_command(launch_cfg, stage, config_path, result_path)
    print(redact_text(f"[{stage}] launching: {shlex.join(cmd)}"), flush=True)
    t0 = time.perf_counter()
    rc = _wait(subprocess.Popen(cmd, env=_env(launch_cfg, env)), stage, launch_cfg.timeout_s)
    if rc != 0 or not result_path.is_file():
        raise _failure(stage, rc, result_path, time.perf_counter() - t0)
    body = json.loads(result_path.read_text())
    return result_from_state(body["result"]), int(body.get("steps_logged", 0))


def launch_replicas(launch_cfg: LaunchConfig, stage: str, cfg: StageConfig, state_dir: Path,
                    env: dict[str, str] | None = None) -> tuple[StageResult, int]:
    """``launcher: replicas``, kept as a thin alias of the Ray path: one process (the Ray
    driver) runs the stage with ``distributed: {backend: ray, actors: nproc_per_node,
    gpus_per_actor: gpus_per_replica}`` on a local Ray of this node, whose actor pool holds
    the engines (one each). The result and the cache key are those of a single-process run
    (``distributed`` is a runtime field)."""
    if "distributed" not in type(cfg).model_fields:
        raise ConfigError(f"launcher='replicas': stage {stage!r} has no distributed settings "
                          "(only generate, score and evaluate do); use 'subprocess' or "
                          "'torchrun'")
    ray = {"backend": "ray", "address": None, "actors": launch_cfg.nproc_per_node,
           "gpus_per_actor": launch_cfg.gpus_per_replica or None}
    print(f"[{stage}] launcher 'replicas' is an alias: running with distributed={ray} "
          f"(set {stage}.distributed and launcher 'subprocess' instead)", flush=True)
    cfg = cfg.model_copy(update={"distributed": cfg.distributed.model_copy(update=ray)})
    one = launch_cfg.model_copy(update={"launcher": "subprocess", "nproc_per_node": 1})
    return launch(one, stage, cfg, state_dir, env)
