"""Fixtures for the training tests: a stage-3-like selections artifact from the smoke pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_contracts import io
from data_contracts.schemas import PAIRS, SELECTIONS


def write_selections(pairs: Path, out: Path) -> Path:
    """Oracle selections: inference-family rows keep their correct steps, easy rows none."""
    rows = []
    for r in io.read(pairs, PAIRS).to_pylist():
        steps = json.loads(r["meta"])["steps"] if r["family"] == "inference" else None
        rows.append({**r, "rationale": steps, "utility": 0.5 if steps else -0.1,
                     "teacher_id": "oracle", "cand_idx": 0 if steps else None,
                     "n_candidates": 4, "n_kept": 4})
    return Path(io.write(rows, out, SELECTIONS).uri)


@pytest.fixture(scope="session")
def selections(synth, tmp_path_factory) -> Path:
    return write_selections(synth["pairs"], tmp_path_factory.mktemp("sel") / "selections")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model gains nothing from two, and on a shared 2-core
    machine OpenMP spin-waiting beside other jobs costs up to 10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
