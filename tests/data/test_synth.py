"""The synthetic world: deterministic, both families present, contracts honoured."""

from __future__ import annotations

import hashlib
import json

from data_contracts import io
from data_contracts.schemas import EVAL_ROWS, PAIRS
from mmemb.data.synth import TASKS, generate


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_data_other_seed_other_data(tmp_path, synth):
    a = generate(tmp_path / "a", "smoke", seed=0)
    b = generate(tmp_path / "b", "smoke", seed=1)
    assert io.ref(a["pairs"]).digest == io.ref(synth["pairs"]).digest
    assert io.ref(a["eval"]).digest == io.ref(synth["eval"]).digest
    assert _digest(a["image_root"]) == _digest(synth["image_root"])
    assert io.ref(b["pairs"]).digest != io.ref(a["pairs"]).digest
    assert _digest(b["image_root"]) != _digest(a["image_root"])


def test_both_families_and_every_task(synth):
    pairs = io.read(synth["pairs"], PAIRS, check_paths=True, image_root=synth["image_root"])
    rows = pairs.to_pylist()
    assert {r["dataset"] for r in rows} == set(TASKS)
    fams = {r["family"] for r in rows}
    assert fams == {"easy", "inference"}
    for r in rows:
        meta = json.loads(r["meta"])
        assert meta["answer"] == r["pos_text"] and meta["answer"] in meta["steps"]
        if r["family"] == "inference":
            # The answer is not written in the query: an inference step is needed.
            assert r["pos_text"] not in r["qry_text"]
    ev = io.read(synth["eval"], EVAL_ROWS, check_paths=True, image_root=synth["image_root"])
    for r in ev.to_pylist():
        assert r["tgt_rel"][0] == 1.0 and sum(r["tgt_rel"]) == 1.0
        assert len(set(r["tgt_text"])) == len(r["tgt_text"])  # no duplicate candidates
