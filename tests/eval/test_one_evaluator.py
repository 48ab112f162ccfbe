"""The train stage's eval and the gate stage's report are the one evaluator's numbers.

The expected values were computed by the code path each stage had before the evaluators
were merged (``train.evaluate`` ranking with its own loop and ``metrics``; ``gate_report``
averaging ``p_think`` in torch), on this same fixture, and are written out here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from mmemb.eval.harness import evaluate_rows, gate_decisions, task_means
from mmemb.model.prompts import EmbedInput


def _vec(x: EmbedInput) -> torch.Tensor:
    """A fixed unit vector [4] per input (instruction, text, images)."""
    key = f"{x.instruction}|{x.text}|{','.join(x.images)}".encode()
    seed = int(hashlib.sha256(key).hexdigest()[:8], 16)
    v = np.random.default_rng(seed).standard_normal(4)
    return torch.tensor(v / np.linalg.norm(v), dtype=torch.float32)


def _fake_embed_inputs(engine, emb, inputs, batch_size, mode="direct"):
    return torch.stack([_vec(x) for x in inputs]) if inputs else torch.zeros(0, 4)


class _FakeGate:
    """An AdaptiveEncoder's gate: p(<think>) from the input's vector; threshold 0.5."""

    threshold = 0.5

    def p_think(self, inputs):
        return torch.stack([(_vec(x)[0] + 1) / 2 for x in inputs])


def _rows() -> list[dict]:
    """Three local tasks in two families (some rows without tgt_rel: first is positive, a
    candidate shared across rows) and one global row that the train eval skips."""
    out = []
    for t, fam, n in (("taskA", "count", 5), ("taskB", "shape", 4), ("taskC", "count", 3)):
        for i in range(n):
            out.append({"row_id": f"{t}-{i}", "task": t, "suite": "synthetic",
                        "category": "CLS", "modality": "image", "metric": "hit@1",
                        "qry_inst": "Find", "qry_text": f"{t} query {i}", "qry_img_path": None,
                        "tgt_inst": "",
                        "tgt_text": [f"{t} pos {i}", f"{t} neg {i}", f"shared {i % 2}"],
                        "tgt_img_path": None, "tgt_rel": [1.0, 0.0, 0.0] if i % 3 else None,
                        "tgt_id": None, "family": fam})
    out.append({"row_id": "g-0", "task": "glob", "suite": "synthetic", "metric": "ndcg@5",
                "qry_inst": "", "qry_text": "global", "qry_img_path": None, "tgt_inst": "",
                "tgt_text": None, "tgt_img_path": None, "tgt_rel": None, "tgt_id": ["c1"],
                "family": "doc"})
    return out


OLD_TRAIN_EVAL = {"hit@1/taskA": 0.6, "hit@1/taskB": 0.25, "hit@1/taskC": 0.6666666666666666,
                  "mean": 0.5055555555555555, "family/count": 0.6333333333333333,
                  "family/shape": 0.25}

OLD_GATE_REPORT = {
    "reason_ratio/family/count": 0.625, "p_think/family/count": 0.58455491065979,
    "reason_ratio/family/doc": 0.0, "p_think/family/doc": 0.10470247268676758,
    "reason_ratio/family/shape": 0.5, "p_think/family/shape": 0.4576788544654846,
    "reason_ratio/task/glob": 0.0, "p_think/task/glob": 0.10470247268676758,
    "reason_ratio/task/taskA": 0.6000000238418579, "p_think/task/taskA": 0.5469211339950562,
    "reason_ratio/task/taskB": 0.5, "p_think/task/taskB": 0.4576788544654846,
    "reason_ratio/task/taskC": 0.6666666865348816, "p_think/task/taskC": 0.6472778916358948,
    "reason_ratio/all": 0.5384615659713745}


def test_train_eval_is_the_one_evaluator_with_the_old_numbers(monkeypatch):
    from mmemb.stages import train
    from mmemb.training import module

    monkeypatch.setattr(module, "embed_inputs", _fake_embed_inputs)
    got = train.evaluate(None, None, _rows(), None, 2)
    assert got == OLD_TRAIN_EVAL  # exactly: same keys, order and floats
    assert list(got) == list(OLD_TRAIN_EVAL)
    assert train.evaluate(None, None, [r for r in _rows() if r["task"] == "glob"], None, 2) == {}


def test_evaluate_rows_scores_what_task_means_reports(monkeypatch):
    from mmemb.eval.encoding import EngineEncoder
    from mmemb.training import module

    monkeypatch.setattr(module, "embed_inputs", _fake_embed_inputs)
    scores = evaluate_rows(EngineEncoder(None, None, 2), _rows())
    assert [(s.spec.name, s.mode, s.family, s.per_query.size) for s in scores] == [
        ("taskA", "direct", "count", 5), ("taskB", "direct", "shape", 4),
        ("taskC", "direct", "count", 3)]  # the global row needs a corpus: not scored
    assert task_means(scores)["hit@1/taskB"] == pytest.approx(scores[1].per_query.mean())


def test_strict_evaluation_raises_instead_of_isolating_inputs():
    class Boom:
        def encode(self, inputs, mode):
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_rows(Boom(), _rows(), strict=True)
    scores = evaluate_rows(Boom(), _rows())  # the evaluate stage's way: every input a miss
    assert all(s.score == 0.0 and s.failures for s in scores)


def test_gate_report_is_the_one_evaluator_with_the_old_numbers():
    from mmemb.inference import GateProbe
    from mmemb.stages import gate

    got = gate.gate_report(_FakeGate(), _rows(), None)
    assert list(got) == list(OLD_GATE_REPORT)
    # torch averaged in float32 before; the same means to float32 precision
    assert got == pytest.approx(OLD_GATE_REPORT, rel=1e-6)
    assert gate_decisions(GateProbe(_FakeGate()), _rows()) == got
    assert gate.gate_report(_FakeGate(), [], None) == {"reason_ratio/all": 0.0}
