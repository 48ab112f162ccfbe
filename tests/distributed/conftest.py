"""One local Ray per test module (a start costs ~5-10 s on two busy cores).

The stages attach to a running Ray instead of starting their own (see
:func:`mmemb.distributed.ray_data.ray_session`), so every ``backend: ray`` run of a module
shares this instance; it is shut down when the module ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray with 4 logical CPUs (2 actors of 1 CPU, plus room for Ray Data's own
    tasks), no dashboard, in its own short temp folder; the workers import this checkout. One for
    the whole session: a Ray start costs 5-10 s on 2 busy cores."""
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="mmemb-ray-test-")
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
