"""Contract I/O: round trips, every validation rule, atomicity."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import CONTRACTS, EVAL_ROWS, PAIRS, RATIONALES


def _pair(i: int, **kw) -> dict:
    row = {"pair_id": f"p{i}", "dataset": "d", "family": None, "qry_inst": "find",
           "qry_text": f"q{i}", "qry_img_path": "", "pos_inst": "", "pos_text": f"t{i}",
           "pos_img_path": "", "neg_text": ["n"], "neg_img_path": [""], "meta": None}
    row.update(kw)
    return row


def test_round_trip_and_metadata(tmp_path):
    rows = [_pair(i) for i in range(5)]
    ref = io.write(rows, tmp_path / "pairs", PAIRS, shard_rows=2)
    assert ref.rows == 5 and ref.schema_version == PAIRS.version
    parts = sorted(p.name for p in (tmp_path / "pairs").glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    meta = pq.read_schema(tmp_path / "pairs" / parts[0]).metadata
    assert meta[b"mmemb.schema_version"] == str(PAIRS.version).encode()
    back = io.read(tmp_path / "pairs", PAIRS)
    assert back.to_pylist() == rows
    assert io.ref(tmp_path / "pairs").digest == ref.digest


def test_digest_is_deterministic(tmp_path):
    rows = [_pair(i) for i in range(3)]
    a = io.write(rows, tmp_path / "a", PAIRS)
    b = io.write(rows, tmp_path / "b", PAIRS)
    c = io.write(rows[:2], tmp_path / "c", PAIRS)
    assert a.digest == b.digest != c.digest


def test_every_contract_has_a_key_and_round_trips_empty(tmp_path):
    for name, c in CONTRACTS.items():
        assert c.key, name
        ref = io.write(pa.Table.from_pylist([], schema=c.schema), tmp_path / name, c)
        assert ref.rows == 0 and io.read(tmp_path / name, c).num_rows == 0


@pytest.mark.parametrize(
    "bad, column, row, words",
    [
        ({"pair_id": None}, "pair_id", 1, "null"),
        ({"pair_id": "  "}, "pair_id", 1, "empty"),
        ({"pair_id": "p0"}, "pair_id", 1, "duplicate key"),
        ({"neg_img_path": ["", ""]}, "neg_img_path", 1, "lengths"),
    ],
)
def test_value_rules_name_file_column_row(tmp_path, bad, column, row, words):
    rows = [_pair(0), _pair(1, **bad)]
    table = pa.Table.from_pylist(rows, schema=PAIRS.schema.set(
        0, pa.field("pair_id", pa.string(), nullable=True)))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ContractError) as e:
        io.read(tmp_path / "bad.parquet", PAIRS)
    msg = str(e.value)
    assert "bad.parquet" in msg and f"column {column!r}" in msg and f"row {row}" in msg
    assert words in msg and e.value.row == row and e.value.column == column


def test_enum_rule(tmp_path):
    row = {"pair_id": "p", "side": "query", "teacher_id": "t", "cand_idx": 0, "text": "x",
           "n_tokens": 1, "finish_reason": "stop", "status": "weird", "error": None,
           "backend": "oracle", "model": "m", "sampling": "{}", "prompt_version": "v1",
           "seed": 0, "oracle_label": None}
    with pytest.raises(ContractError, match=r"column 'status', row 0: value 'weird'"):
        io.write([row], tmp_path / "r", RATIONALES)


def test_missing_extra_and_mistyped_columns(tmp_path):
    t = pa.Table.from_pylist([_pair(0)], schema=PAIRS.schema)
    pq.write_table(t.drop_columns(["pos_text"]), tmp_path / "missing.parquet")
    with pytest.raises(ContractError, match="missing column.*pos_text"):
        io.read(tmp_path / "missing.parquet", PAIRS)
    pq.write_table(t.append_column("x", pa.array([1])), tmp_path / "extra.parquet")
    with pytest.raises(ContractError, match="unexpected column.*'x'"):
        io.read(tmp_path / "extra.parquet", PAIRS)
    t2 = t.set_column(t.schema.get_field_index("qry_text"), "qry_text", pa.array([1.5]))
    pq.write_table(t2, tmp_path / "typed.parquet")
    with pytest.raises(ContractError, match="column 'qry_text'.*double"):
        io.read(tmp_path / "typed.parquet", PAIRS)


def test_wrong_schema_version_and_truncated_file(tmp_path):
    t = pa.Table.from_pylist([_pair(0)], schema=PAIRS.schema)
    t = t.replace_schema_metadata({b"mmemb.contract": b"pairs", b"mmemb.schema_version": b"99"})
    pq.write_table(t, tmp_path / "v99.parquet")
    with pytest.raises(ContractError, match="schema_version 99.*version 1.*rerun"):
        io.read(tmp_path / "v99.parquet", PAIRS)
    pq.write_table(t, tmp_path / "full.parquet")
    data = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ContractError, match="trunc.parquet: not a readable Parquet"):
        io.read(tmp_path / "trunc.parquet", PAIRS)


def test_corrupted_part_is_detected_by_digest(tmp_path):
    io.write([_pair(i) for i in range(3)], tmp_path / "a", PAIRS)
    part = tmp_path / "a" / "part-00000.parquet"
    t = pq.read_table(part).slice(0, 2)
    pq.write_table(t, part)
    with pytest.raises(ContractError, match="digest differs"):
        io.read(tmp_path / "a", PAIRS)


def test_paths_checked_when_asked(tmp_path):
    (tmp_path / "img.png").write_bytes(b"x")
    io.write([_pair(0, qry_img_path="img.png"), _pair(1, qry_img_path="nope.png")],
             tmp_path / "a", PAIRS)
    io.read(tmp_path / "a", PAIRS)  # not asked: fine
    with pytest.raises(ContractError, match=r"column 'qry_img_path', row 1: image .*nope.png"):
        io.read(tmp_path / "a", PAIRS, check_paths=True, image_root=tmp_path)


def test_incomplete_artifact_is_never_read(tmp_path):
    (tmp_path / "a").mkdir()
    pq.write_table(pa.Table.from_pylist([_pair(0)], schema=PAIRS.schema),
                   tmp_path / "a" / "part-00000.parquet")
    assert not io.exists(tmp_path / "a")
    with pytest.raises(ContractError, match="no _manifest.json"):
        io.read(tmp_path / "a", PAIRS)


def test_killed_writer_leaves_no_artifact(tmp_path):
    """SIGKILL a process in the middle of writing: the target never appears half-written."""
    script = textwrap.dedent(f"""
        import os, signal, pyarrow.parquet as pq
        from data_contracts import io
        from data_contracts.schemas import PAIRS
        real = pq.write_table
        n = 0
        def slow(*a, **k):
            global n
            real(*a, **k); n += 1
            if n == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        pq.write_table = slow
        rows = [dict(pair_id=f"p{{i}}", dataset="d", family=None, qry_inst="", qry_text="",
                     qry_img_path="", pos_inst="", pos_text="", pos_img_path="", neg_text=[],
                     neg_img_path=[], meta=None) for i in range(10)]
        io.write(rows, r"{tmp_path / 'out'}", PAIRS, shard_rows=3)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    leftovers = [x.name for x in tmp_path.iterdir()]
    assert all(name.startswith(".out.") for name in leftovers)  # temp dir only, never 'out'


def test_rewrite_replaces_atomically(tmp_path):
    io.write([_pair(0)], tmp_path / "a", PAIRS)
    io.write([_pair(1), _pair(2)], tmp_path / "a", PAIRS)
    assert io.read(tmp_path / "a", PAIRS).num_rows == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_eval_rows_list_lengths(tmp_path):
    row = {"row_id": "0", "task": "t", "suite": "s", "category": "CLS", "modality": "image",
           "metric": "hit@1", "qry_inst": "", "qry_text": "q", "qry_img_path": "",
           "tgt_inst": "", "tgt_id": ["a", "b"], "tgt_text": ["x", "y"],
           "tgt_img_path": ["", ""], "tgt_rel": [1.0], "family": None}
    with pytest.raises(ContractError, match="row 0.*lengths"):
        io.write([row], tmp_path / "e", EVAL_ROWS)
