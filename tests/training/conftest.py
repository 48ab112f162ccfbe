"""Fixtures for the training tests: a stage-3-like selections artifact from the smoke pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmemb.teachers.oracle import oracle_selections


@pytest.fixture(scope="session")
def selections(synth, tmp_path_factory) -> Path:
    return oracle_selections(synth["pairs"], tmp_path_factory.mktemp("sel") / "selections")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a shared 2-core
    machine OpenMP spin-waiting beside other jobs costs up to 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
