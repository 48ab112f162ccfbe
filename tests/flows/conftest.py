"""Fixtures of the orchestration tests: a Prefect test harness and one pipeline run.

PREFECT_HOME points at a temporary folder before Prefect is imported, so tests never touch
a user's ~/.prefect; the harness (~8 s) is started once per session.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="mmemb-prefect-home-"))
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

import pytest  # noqa: E402
from prefect.logging.configuration import ensure_logging_setup  # noqa: E402

# Prefect's console handler binds the sys.stderr of the moment it is configured; if that is
# a test's capsys stream, it is closed after the test and every later flow log fails.
# Configure it now, while the session-wide capture stream is in place.
ensure_logging_setup()

#: The prepare stage at its fastest: smoke-size data, no simulated pretraining.
FAST_PREPARE = {"source": "tiny", "size": "smoke", "pretrain_steps": 0}


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def fast_config(run_dir: Path, stages=("prepare",), **sections):
    from mmemb.configs.pipeline import PipelineConfig

    data = {"run": {"name": "t", "run_dir": str(run_dir), "stages": list(stages),
                    "tracking": {"experiment": "mmemb-test"}},
            "prepare": dict(FAST_PREPARE)}
    data.update(sections)
    return PipelineConfig.from_dict(data)


@pytest.fixture(scope="session")
def pipeline_run(prefect_harness, tmp_path_factory):
    """The pipeline on the fast prepare stage plus whatever later stages are available."""
    from flows.pipeline import pipeline

    run_dir = tmp_path_factory.mktemp("run") / "demo"
    cfg = fast_config(run_dir)
    out = pipeline(cfg)
    return {"run_dir": run_dir, "config": cfg, "out": out}
