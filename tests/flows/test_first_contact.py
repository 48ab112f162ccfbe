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


# --------------------------------------------------------------------------- item 1: waits

def test_prefect_wait_precedence(monkeypatch):
    from flows.startup import DEFAULT_PREFECT_TIMEOUT_S, PREFECT_ENV, prefect_timeout
    from mmemb.configs.base import ConfigError

    monkeypatch.delenv(PREFECT_ENV, raising=False)
    assert DEFAULT_PREFECT_TIMEOUT_S == 600  # Prefect's own default is 20 s
    assert prefect_timeout() == (600, "the default")
    monkeypatch.setenv(PREFECT_ENV, "90")
    assert prefect_timeout() == (90, PREFECT_ENV)
    assert prefect_timeout(config=300) == (300, "run.prefect_startup_timeout_s")
    assert prefect_timeout(cli=45, config=300) == (45, "--prefect-timeout")
    monkeypatch.setenv(PREFECT_ENV, "soon")
    with pytest.raises(ConfigError, match=PREFECT_ENV):
        prefect_timeout()


def test_prefect_wait_reaches_prefect_settings_and_env(monkeypatch):
    """Inside prefect_startup the wait is Prefect's setting in this context and the env
    variable for contexts and threads that read settings afresh; both are restored."""
    import threading

    from prefect.settings import PREFECT_API_URL, Settings, temporary_settings
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as WAIT

    from flows.startup import PREFECT_ENV, prefect_startup

    monkeypatch.setenv(PREFECT_ENV, "33")
    seen = {}
    # A configured API URL: nothing is started, only the settings are checked.
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        before = WAIT.value()
        with prefect_startup(1234, "test"):
            seen["here"] = WAIT.value()
            t = threading.Thread(target=lambda: seen.__setitem__(
                "thread", Settings().server.ephemeral.startup_timeout_seconds))
            t.start()
            t.join()
        seen["after"] = WAIT.value()
    assert seen == {"here": 1234, "thread": 1234, "after": before}
    assert os.environ[PREFECT_ENV] == "33"


def _stub_startup(monkeypatch) -> list:
    from contextlib import contextmanager

    import flows.startup

    calls = []

    @contextmanager
    def record(timeout, source="the default", announce=True):
        calls.append((timeout, source))
        yield
    monkeypatch.setattr(flows.startup, "prefect_startup", record)
    return calls


def test_run_and_stage_take_the_wait_from_cli_and_config(tmp_path, monkeypatch):
    import flows.pipeline
    from flows.cli import main
    from flows.stage import run_stage_from_file
    from flows.startup import PREFECT_ENV

    monkeypatch.delenv(PREFECT_ENV, raising=False)
    calls = _stub_startup(monkeypatch)
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda cfg, **kw: {"summary": "stub"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{run_dir: {tmp_path / 'r'}, stages: [prepare], "
                   "prefect_startup_timeout_s: 777, tracking: {enabled: false}}\n"
                   "prepare: {source: tiny, size: smoke, pretrain_steps: 0}\n")
    assert main(["run", str(cfg), "--skip-preflight"]) == 0
    assert main(["run", str(cfg), "--skip-preflight", "--prefect-timeout", "55"]) == 0
    run_stage_from_file("prepare", str(cfg), flow_obj=lambda **kw: {"status": "ran"})
    run_stage_from_file("prepare", str(cfg), flow_obj=lambda **kw: {"status": "ran"},
                        prefect_timeout=66)
    assert calls == [(777, "run.prefect_startup_timeout_s"), (55, "--prefect-timeout"),
                     (777, "run.prefect_startup_timeout_s"), (66, "--prefect-timeout")]
    with pytest.raises(SystemExit):
        main(["run", str(cfg), "--prefect-timeout", "0"])


def test_prefect_startup_timeout_is_a_message_not_a_traceback(tmp_path):
    """A wait of 0 s times out deterministically (Prefect's loop never polls): exit 3 and
    the three ways to wait longer, plus the server alternative."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{run_dir: {tmp_path / 'r'}, stages: [prepare], "
                   "tracking: {enabled: false}}\n"
                   "prepare: {source: tiny, size: smoke, pretrain_steps: 0}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg), "--skip-preflight"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for hint in ("did not answer within 0s", "--prefect-timeout 1200",
                 "prefect_startup_timeout_s: 1200",
                 "export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=1200",
                 "PREFECT_API_URL="):
        assert hint in p.stderr, hint
    assert not (tmp_path / "r" / "base_model").exists()  # no stage ran


class _Health:
    """A local HTTP server whose /health answers 503 ``fail`` times, then 200."""

    def __init__(self, fail: int):
        import http.server
        import threading

        self.calls = 0
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.calls += 1
                ok = self.path == "/health" and outer.calls > fail
                self.send_response(200 if ok else 503)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.srv.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_wait_healthy_waits_for_a_slow_server_and_explains_a_timeout():
    from flows.cli import build_parser
    from tasks.mlflow_server import wait_healthy

    ui = build_parser().parse_args(["ui"])
    assert ui.timeout == 600
    slow = _Health(fail=3)
    try:
        assert wait_healthy(slow.url, timeout=120) >= 0 and slow.calls == 4
    finally:
        slow.close()
    never = _Health(fail=10**9)
    try:
        with pytest.raises(TimeoutError) as e:
            wait_healthy(never.url, timeout=1)
    finally:
        never.close()
    assert "did not answer" in str(e.value) and "mmemb ui --timeout 1200" in str(e.value)
    assert never.calls >= 1


def test_ui_timeout_prints_what_to_set_and_stops_the_server(tmp_path, monkeypatch, capsys):
    import flows.cli
    import tasks.mlflow_server

    never = _Health(fail=10**9)
    procs = []

    def fake_start(*a, **kw):
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                      start_new_session=True))
        return procs[-1]
    monkeypatch.setattr(tasks.mlflow_server, "start_server", fake_start)
    try:
        rc = flows.cli.main(["ui", "--run-dir", str(tmp_path), "--port", str(never.port),
                             "--timeout", "1"])
    finally:
        never.close()
    cap = capsys.readouterr()
    assert rc == 3
    assert "waiting up to 1s" in cap.out
    assert f"{never.url} did not answer" in cap.err and "--timeout 1200" in cap.err
    assert procs[0].poll() is not None  # the server it started was stopped


def test_run_names_the_parent_by_the_users_overrides_only(tmp_path, monkeypatch):
    """`mmemb run --set ...` hands the flow the user's overrides for the parent run's name,
    not the ones the command adds itself (--stages, --no-tracking)."""
    import flows.pipeline
    from flows.cli import main
    from flows.startup import PREFECT_ENV

    monkeypatch.delenv(PREFECT_ENV, raising=False)
    _stub_startup(monkeypatch)
    seen = {}
    monkeypatch.setattr(flows.pipeline, "pipeline",
                        lambda cfg, **kw: seen.update(cfg=cfg, **kw) or {"summary": "stub"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{run_dir: {tmp_path / 'r'}}}\n"
                   "prepare: {source: tiny, size: smoke, pretrain_steps: 0}\n")
    assert main(["run", str(cfg), "--skip-preflight", "--set", "prepare.seed=3",
                 "--stages", "prepare", "--no-tracking"]) == 0
    assert seen["overrides"] == ["prepare.seed=3"]
    assert seen["cfg"].prepare.seed == 3 and seen["cfg"].run.stages == ["prepare"]
    assert seen["cfg"].run.tracking.enabled is False
