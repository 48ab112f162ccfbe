"""The synthetic oracle (a simulation): shares, wrong-answer rewriting, determinism, refusal."""

from __future__ import annotations

import json

import pytest

from data_contracts import io
from data_contracts.schemas import PAIRS
from mmemb.model.prompts import EmbedInput
from mmemb.teachers.base import (
    GenRequest,
    TeacherInfo,
    finalize,
    normalize_text,
    request_seed,
)
from mmemb.teachers.oracle import GENERIC, OracleTeacher, label_counts, make_wrong


@pytest.mark.parametrize("k,shares,expected", [
    (4, {"correct": 0.5, "wrong": 0.25, "irrelevant": 0.25}, (2, 1, 1)),
    (3, {"correct": 0.5, "wrong": 0.25, "irrelevant": 0.25}, (1, 1, 1)),
    (5, {"correct": 1, "wrong": 1, "irrelevant": 0}, (3, 2, 0)),  # tie -> LABELS order
    (1, {"wrong": 2.0}, (0, 1, 0)),
])
def test_label_counts_are_exact(k, shares, expected):
    c = label_counts(k, shares)
    assert (c["correct"], c["wrong"], c["irrelevant"]) == expected
    assert sum(c.values()) == k


def test_wrong_rationales_argue_for_the_wrong_answer():
    steps = "4 plus 3 is 7, so there are seven shapes in total: seven shapes"
    assert make_wrong(steps, "seven shapes", "three shapes") == \
        "4 plus 3 is 7, so there are three shapes in total: three shapes"
    spatial = ("the yellow circle is on the left, the other shape is on the right, so: the "
               "red triangle on the right")
    assert make_wrong(spatial, "the red triangle on the right", "the yellow circle on the right"
                      ) == ("the yellow circle is on the left, the other shape is on the right, "
                            "so: the yellow circle on the right")
    # Simultaneous replacement: red->blue and blue->red do not chain.
    assert make_wrong("a red and a blue: red blue", "red blue", "blue red") == \
        "a blue and a red: blue red"


def _requests(synth, n=30):
    pairs = io.read(synth["pairs"], PAIRS).to_pylist()[:n]
    return [GenRequest(p["pair_id"], "query", EmbedInput(text=p["qry_text"]),
                       json.loads(p["meta"]), request_seed(0, "oracle", p["pair_id"], "query"))
            for p in pairs], pairs


def test_oracle_candidates_follow_meta_and_are_deterministic(synth):
    reqs, pairs = _requests(synth)
    info = TeacherInfo("oracle", "oracle", None, 4, {})
    oracle = OracleTeacher(info, {"correct": 0.5, "wrong": 0.25, "irrelevant": 0.25})
    out = oracle.generate(reqs)
    assert out == oracle.generate(reqs)  # same seeds, same candidates
    for p, cands in zip(pairs, out, strict=True):
        meta = json.loads(p["meta"])
        assert len(cands) == 4
        assert sorted(c.oracle_label for c in cands) == ["correct", "correct", "irrelevant",
                                                         "wrong"]
        for c in cands:
            assert c.status == "ok" and c.n_tokens == len(c.text.split())
            if c.oracle_label == "correct":
                assert c.text == meta["steps"]
            elif c.oracle_label == "wrong":
                assert meta["answer"] not in c.text
                assert any(c.text.endswith(w) for w in meta["wrong_answers"])
            else:
                assert c.text in GENERIC
    # Another seed shuffles the order of the labels for some pairs.
    other = [GenRequest(r.pair_id, r.side, r.inp, r.meta, r.seed + 1) for r in reqs]
    assert [[c.oracle_label for c in cs] for cs in oracle.generate(other)] != \
        [[c.oracle_label for c in cs] for cs in out]


def test_oracle_refuses_pairs_without_meta():
    info = TeacherInfo("oracle", "oracle", None, 2, {})
    out = OracleTeacher(info, {"correct": 1.0}).generate(
        [GenRequest("p", "query", EmbedInput(text="q"), None, 1)])
    assert [c.status for c in out[0]] == ["error", "error"]
    assert "meta" in out[0][0].error and out[0][0].text is None


def test_finalize_statuses_and_malformed():
    assert finalize("fine", 3, "stop").status == "ok"
    assert finalize("cut", 8, "length").status == "truncated"
    assert finalize("  ", 1, "stop").status == "empty"
    bad = finalize("so <think> again", 4, "stop")
    assert bad.status == "ok" and bad.error.startswith("malformed:") and "<think>" in bad.error
    assert normalize_text("  The  Best\none ") == "the best one"


def test_request_seed_is_stable_and_spread():
    a = request_seed(0, "t", "p1", "query")
    assert a == request_seed(0, "t", "p1", "query")
    assert len({request_seed(0, "t", f"p{i}", "query") for i in range(1000)}) == 1000
    assert 0 <= a < 2 ** 62
