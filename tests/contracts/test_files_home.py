"""data_contracts/files.py, the one home for digests and atomic writes: what every caller
relies on (values stable across the move, a memo that skips unchanged files, writes that
leave nothing half-written)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from data_contracts import files, io
from data_contracts.schemas import PAIRS


def _checkpoint(d):
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"w" * 1000)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    (d / "steps.jsonl").write_text("[1, {}]\n")  # a training log: not the model
    return d


def test_checkpoint_digest_is_the_model_files_and_nothing_else(tmp_path):
    ck = _checkpoint(tmp_path / "ck")
    d = files.checkpoint_digest(ck)
    # the stage cache's formula, unchanged by the move: its stored digests stay valid
    h = hashlib.sha256()
    for rel in ("adapter/adapter_model.safetensors", "config.json", "model.safetensors"):
        h.update(rel.encode() + b"\0" + hashlib.sha256((ck / rel).read_bytes()).hexdigest()
                 .encode())
    assert d == h.hexdigest()
    assert io.path_digest(ck) == "dir:" + d
    (ck / "steps.jsonl").write_text("rewritten log")
    assert files.checkpoint_digest(ck) == d
    (ck / "adapter" / "adapter_model.safetensors").write_bytes(b"LORA")
    assert files.checkpoint_digest(ck) != d
    one = ck / "config.json"
    assert files.checkpoint_digest(one) == files.sha256_file(one)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"png")
    assert files.is_checkpoint(ck) and not files.is_checkpoint(images)
    assert io.path_digest(images) is None  # an image root: identified by its path


def test_the_memo_hashes_a_file_once_and_again_when_it_changes(tmp_path, monkeypatch):
    ck = _checkpoint(tmp_path / "ck")
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    memo = files.DigestMemo(tmp_path / "memo.json")
    d = files.checkpoint_digest(ck, memo)
    memo.save()
    assert len(calls) == 3
    again = files.DigestMemo(tmp_path / "memo.json")  # a later run reads the saved memo
    assert files.checkpoint_digest(ck, again) == d and len(calls) == 3
    w = ck / "model.safetensors"
    w.write_bytes(b"v" * 1000)  # same size, new mtime
    os.utime(w, ns=(w.stat().st_atime_ns, w.stat().st_mtime_ns + 10**9))
    assert files.checkpoint_digest(ck, again) != d and len(calls) == 4


@pytest.mark.parametrize("body", ['{"/x": "old-harness-format"}', "[1, 2]", "{torn", "\xff"])
def test_a_torn_or_foreign_memo_is_ignored_not_trusted(tmp_path, body):
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    mp = tmp_path / "memo.json"
    mp.write_text(body, encoding="latin-1")
    memo = files.DigestMemo(mp)
    memo.data[str(f.resolve())] = "not a [size, mtime, digest] entry"
    assert memo.file(f) == hashlib.sha256(b"data").hexdigest()
    memo.save()
    assert json.loads(mp.read_text())[str(f.resolve())][2] == hashlib.sha256(b"data").hexdigest()


def test_input_digests_keep_their_values(tmp_path):
    from mmemb.sharding import fingerprint, input_digest

    parts = ("score-v1", {"b": 1, "a": [1, 2]}, None)
    old = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
    assert fingerprint(*parts) == old == files.json_digest(list(parts))
    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1 not really")
    assert input_digest(f) == io.content_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    rows = [{"pair_id": "p", "dataset": "d", "family": None, "qry_inst": "i", "qry_text": "q",
             "qry_img_path": "", "pos_inst": "", "pos_text": "t", "pos_img_path": "",
             "neg_text": ["n"], "neg_img_path": [""], "meta": None}]
    ref = io.write(rows, tmp_path / "pairs", PAIRS)
    assert input_digest(tmp_path / "pairs") == ref.digest
    assert io.path_digest(tmp_path / "pairs") == "artifact:" + ref.digest


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "state.json"
    files.atomic_write_json(target, {"v": 1})
    assert json.loads(target.read_text()) == {"v": 1}
    assert files.temp_beside(target) != files.temp_beside(target)  # two writers, two names

    def torn(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", torn)
    with pytest.raises(OSError):
        files.atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]  # no temp left
    files.fsync_path(tmp_path)  # a folder: no error
    files.fsync_path(tmp_path / "absent")  # best effort: no error either


def test_a_parquet_shard_write_leaves_no_temp_behind(tmp_path):
    import pyarrow as pa

    t = pa.table({"a": [1, 2]})
    digest = io.atomic_write_parquet(t, tmp_path / "s.parquet")
    assert digest == files.sha256_file(tmp_path / "s.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]
