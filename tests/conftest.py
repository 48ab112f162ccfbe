"""Shared fixtures: the embedded default built once per test session.

Environment first: nothing may reach a hub, and services bind to loopback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path as _Path

# The MMEB layout writers (tests/data/fixtures/mmeb_layout.py), importable by name in
# every test file: `import mmeb_layout as layout`.
sys.path.insert(0, str(_Path(__file__).parent / "data" / "fixtures"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The demo's tiny Qwen2-VL checkpoint (random weights, project-built tokenizer)."""
    from mmemb.model.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_vl", arch="qwen2_vl", seed=0)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict[str, Path]:
    """The smoke-size synthetic dataset: pairs, eval rows and images."""
    from mmemb.data.synth import generate

    return generate(tmp_path_factory.mktemp("synth"), size="smoke", seed=0)


@pytest.fixture(scope="session")
def real_layout(tmp_path_factory):
    """``real_layout("qwen2_vl")`` -> a random-weight checkpoint of that family's *real*
    layout (tokenizer, special tokens, chat template, processor and generation configs of
    the hub folder; shrunk sizes), built once per session from tests/fixtures/qwen_layouts."""
    from mmemb.model.layouts import build_checkpoint, layout_dir

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"layout-{family}") / family
            built[family] = build_checkpoint(layout_dir(family), out, seed=0)
        return built[family]
    return get


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port free on loopback now (for servers a test starts)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick
