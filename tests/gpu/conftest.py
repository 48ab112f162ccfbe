"""Fixtures for the GPU tests (``pytest -m gpu``; they skip where no CUDA device is visible).

``MMEMB_GPU_TESTS_DEVICE=cpu`` runs the same tests on the CPU: it checks the tests
themselves on a machine without a GPU (the comparisons then hold trivially or more
tightly), so a lent GPU's minutes are not spent finding a broken test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmemb.teachers.oracle import oracle_selections

DEVICE = os.environ.get("MMEMB_GPU_TESTS_DEVICE", "cuda")


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture
def exact_fp32():
    """fp32 on the GPU without TF32 (cuDNN convolutions, here the vision patch embedding,
    use TF32 by default): device-vs-CPU comparisons then measure reduction order only."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(scope="session")
def gpu_selections(synth, tmp_path_factory) -> Path:
    """Oracle selections (inference rows reason, easy rows direct)."""
    return oracle_selections(synth["pairs"], tmp_path_factory.mktemp("gpu_sel") / "selections")
