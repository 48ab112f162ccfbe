"""Integrity (issue 13, items 12-15): a stage is reused only with every output part whole,
manifests are checked on read, `mmemb status` sees changed inputs, and a stage's record
never outlives the outputs it describes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import PAIRS
from mmemb.stages.base import StageResult
from tasks import cache

ROOT = Path(__file__).resolve().parents[2]


def _pair(i: int) -> dict:
    return {"pair_id": f"p{i}", "dataset": "d", "family": None, "qry_inst": "find",
            "qry_text": f"q{i}", "qry_img_path": "", "pos_inst": "", "pos_text": f"t{i}",
            "pos_img_path": "", "neg_text": ["n"], "neg_img_path": [""], "meta": None}


def _artifact(path: Path, n: int = 5, shard_rows: int = 2, offset: int = 0):
    return io.write([_pair(offset + i) for i in range(n)], path, PAIRS, shard_rows=shard_rows)


# --------------------------------------------------------------------------- item 13

def test_manifest_records_part_sizes(tmp_path):
    _artifact(tmp_path / "a")
    m = json.loads((tmp_path / "a" / io.MANIFEST).read_text())
    assert [p["bytes"] for p in m["parts"]] == \
        [(tmp_path / "a" / p["file"]).stat().st_size for p in m["parts"]]


def _edit_manifest(path: Path, **kw) -> None:
    mp = path / io.MANIFEST
    m = json.loads(mp.read_text())
    m.update(kw)
    mp.write_text(json.dumps(m))


def test_manifest_row_count_is_checked_on_read(tmp_path):
    _artifact(tmp_path / "a")
    _edit_manifest(tmp_path / "a", rows=6)
    with pytest.raises(ContractError, match="manifest says 6 rows but its parts hold 5"):
        io.read(tmp_path / "a", PAIRS)


def test_manifest_total_digest_is_checked_on_read(tmp_path):
    _artifact(tmp_path / "a")
    _edit_manifest(tmp_path / "a", digest="0" * 64)
    with pytest.raises(ContractError, match="total digest is not that of its parts"):
        io.read(tmp_path / "a", PAIRS)
    with pytest.raises(ContractError, match="total digest"):
        io.ref(tmp_path / "a")  # what the stage cache keys on: refused too


def test_part_row_count_is_checked_on_read(tmp_path):
    """Per-part rows moved between parts (totals still agree): the part that disagrees is
    named."""
    _artifact(tmp_path / "a")
    mp = tmp_path / "a" / io.MANIFEST
    m = json.loads(mp.read_text())
    m["parts"][0]["rows"], m["parts"][2]["rows"] = 1, 2
    mp.write_text(json.dumps(m))
    with pytest.raises(ContractError, match=r"part-00000.parquet: holds 2 rows, the manifest "
                       "says 1"):
        io.read(tmp_path / "a", PAIRS, verify_digest=False)


def test_manifest_part_outside_the_folder_is_refused(tmp_path):
    _artifact(tmp_path / "a")
    mp = tmp_path / "a" / io.MANIFEST
    m = json.loads(mp.read_text())
    m["parts"][0]["file"] = "../b/part-00000.parquet"
    mp.write_text(json.dumps(m))
    with pytest.raises(ContractError, match="outside its folder"):
        io.read(tmp_path / "a", PAIRS)


def test_truncated_part_is_named_without_hashing(tmp_path):
    _artifact(tmp_path / "a")
    part = tmp_path / "a" / "part-00001.parquet"
    part.write_bytes(part.read_bytes()[:-7])
    with pytest.raises(ContractError, match=r"part-00001.parquet: is \d+ bytes, the manifest"):
        io.read(tmp_path / "a", PAIRS, verify_digest=False)


# --------------------------------------------------------------------------- item 12

def _state(run: Path, stage: str = "score", **res_kw) -> StageResult:
    ref = _artifact(run / stage / "out")
    res = StageResult(stage, outputs={"out": ref}, summary="s", **res_kw)
    cache.write_state(run, stage, "K", res, inputs={}, code="c", config={}, duration_s=1.0)
    return res


def test_a_removed_part_is_not_reused(tmp_path):
    _state(tmp_path)
    assert cache.lookup(tmp_path, "score", "K")[0] is not None
    (tmp_path / "score" / "out" / "part-00000.parquet").unlink()
    hit, why = cache.lookup(tmp_path, "score", "K")
    assert hit is None
    assert why.startswith("output 'out'") and "part-00000.parquet is missing" in why


def test_a_part_of_another_size_is_not_reused(tmp_path):
    _state(tmp_path)
    part = tmp_path / "score" / "out" / "part-00002.parquet"
    part.write_bytes(part.read_bytes() + b"x")
    hit, why = cache.lookup(tmp_path, "score", "K")
    assert hit is None and "part-00002.parquet is" in why and "bytes, the manifest says" in why


def test_verify_hashes_every_part(tmp_path):
    """Same size, other bytes: only ``--verify`` (which reads every part) sees it."""
    _state(tmp_path)
    part = tmp_path / "score" / "out" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    assert cache.lookup(tmp_path, "score", "K")[0] is not None  # size check only
    hit, why = cache.lookup(tmp_path, "score", "K", verify=True)
    assert hit is None and "part-00001.parquet" in why and "digest differs" in why


def test_verify_rehashes_models_instead_of_trusting_the_memo(tmp_path):
    model = tmp_path / "train" / "student"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights-1")
    res = StageResult("train", models={"student": model}, summary="s")
    cache.write_state(tmp_path, "train", "K", res, inputs={}, code="c", config={},
                      duration_s=1.0)
    st = os.stat(model / "model.safetensors")
    (model / "model.safetensors").write_bytes(b"weights-2")  # same size, same mtime
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.lookup(tmp_path, "train", "K")[0] is not None  # the memo trusts size+mtime
    hit, why = cache.lookup(tmp_path, "train", "K", verify=True)
    assert hit is None and "model 'student'" in why


def test_run_and_stage_commands_take_verify():
    from flows.cli import build_parser

    a = build_parser().parse_args(["run", "c.yaml", "--verify"])
    assert a.verify is True
    a = build_parser().parse_args(["stage", "score", "c.yaml", "--verify"])
    assert a.verify is True
    assert build_parser().parse_args(["run", "c.yaml"]).verify is False


def test_status_names_a_missing_part(tmp_path, capsys):
    from flows.cli import main

    _state(tmp_path)
    (tmp_path / "score" / "out" / "part-00001.parquet").unlink()
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("score"))
    assert "STALE" in line and "part-00001.parquet is missing" in line


# --------------------------------------------------------------------------- item 14

def _model(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(weights)
    return path


def _record(run: Path, stage: str, config: dict, *, outputs=None, models=None) -> None:
    inputs = {k: cache.path_digest(v) for k, v in config.items()}
    res = StageResult(stage, outputs=outputs or {}, models=models or {}, summary=stage)
    cache.write_state(run, stage, f"key-{stage}", res, inputs=inputs, code="c",
                      config=config, duration_s=1.0)


def _status(run: Path, capsys) -> dict[str, str]:
    from flows.cli import main

    assert main(["status", "--run-dir", str(run)]) == 0
    return {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.strip()}


def test_status_marks_downstream_stale_after_an_input_changed(tmp_path, capsys):
    """`--only select` with a new margin rewrites the selections: train and gate were built
    from the old ones, evaluate from gate's policy; all three are stale until rerun."""
    run = tmp_path / "run"
    sel = run / "select" / "selections"
    ref = _artifact(sel)
    _record(run, "select", {}, outputs={"selections": ref})
    student = _model(run / "train" / "student", b"student")
    _record(run, "train", {"data": str(sel)}, models={"student": student})
    policy = _model(run / "gate" / "policy", b"policy")
    _record(run, "gate", {"model": str(student), "data": str(sel)}, models={"policy": policy})
    res_ref = _artifact(run / "evaluate" / "results", offset=100)
    _record(run, "evaluate", {"model": str(policy)}, outputs={"results": res_ref})
    lines = _status(run, capsys)
    assert [lines[s].split()[1] for s in ("select", "train", "gate", "evaluate")] == ["ok"] * 4

    ref2 = _artifact(sel, n=4)  # what --only select with another margin writes, recorded
    _record(run, "select", {}, outputs={"selections": ref2})
    lines = _status(run, capsys)
    assert lines["select"].split()[1] == "ok"
    assert f"STALE: input 'data' ({sel}) changed since the stage ran" in lines["train"]
    assert "STALE: input 'data'" in lines["gate"]
    assert "STALE: input 'model' comes from stage 'gate', which is stale" in lines["evaluate"]
    assert lines["prepare"].split()[1:] == ["-"]


def test_status_sees_a_changed_checkpoint_input(tmp_path, capsys):
    run = tmp_path / "run"
    base = _model(tmp_path / "base", b"w1")
    _record(run, "score", {"model": str(base)},
            outputs={"scores": _artifact(run / "score" / "scores")})
    assert _status(run, capsys)["score"].split()[1] == "ok"
    (base / "model.safetensors").write_bytes(b"w2-longer")
    assert f"STALE: input 'model' ({base}) changed" in _status(run, capsys)["score"]


# --------------------------------------------------------------------------- item 15

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import tasks.stages as ts
    from data_contracts import io
    from data_contracts.schemas import PAIRS
    from mmemb.configs.pipeline import PipelineConfig
    from mmemb.stages.base import StageResult

    run, pairs, margin, n, kill = sys.argv[1], sys.argv[2], float(sys.argv[3]), \\
        int(sys.argv[4]), sys.argv[5] == "kill"

    def fake_select(stage, cfg, log=None):
        rows = [{"pair_id": f"s{i}", "dataset": "d", "family": None, "qry_inst": "",
                 "qry_text": "q", "qry_img_path": "", "pos_inst": "", "pos_text": "t",
                 "pos_img_path": "", "neg_text": [], "neg_img_path": [], "meta": None}
                for i in range(n)]
        ref = io.write(rows, cfg.out + "/selections", PAIRS)
        if kill:  # dies right after the artifact is in place, before the stage record
            os.kill(os.getpid(), signal.SIGKILL)
        return StageResult("select", outputs={"selections": ref}, summary=f"{n} rows")

    ts.call_stage = fake_select
    cfg = PipelineConfig.from_dict({
        "run": {"run_dir": run, "stages": ["select"], "tracking": {"enabled": False}},
        "prepare": {"source": "existing", "model": pairs, "pairs": pairs,
                    "prepare_base": False},
        "select": {"margin": margin}})
    print(ts.execute_stage(cfg, "select", force=True)["status"])
""")


def _select_run(run: Path, pairs: Path, margin: float, n: int, kill: bool):
    return subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(run), str(pairs),
                           str(margin), str(n), "kill" if kill else "ok"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_sigkill_after_the_artifact_leaves_no_record_of_the_old_result(tmp_path, capsys):
    run = tmp_path / "run"
    pairs = tmp_path / "pairs"
    _artifact(pairs)
    for stage, name in (("score", "scores"), ("generate", "rationales")):
        _artifact(run / stage / name)  # select's other inputs: only their digests matter
    first = _select_run(run, pairs, 0.1, 3, kill=False)
    assert first.returncode == 0 and first.stdout.split()[-1] == "ran", first.stderr[-3000:]
    st = cache.read_state(run, "select")
    assert st["result"]["outputs"]["selections"]["rows"] == 3

    killed = _select_run(run, pairs, 0.5, 5, kill=True)  # `--only select`, a new margin
    assert killed.returncode == -9, killed.stderr[-3000:]
    on_disk = io.ref(run / "select" / "selections")
    assert on_disk.rows == 5
    # no record that describes the previous (3-row) result is left beside the new outputs
    assert cache.read_state(run, "select") is None
    assert not (run / "select" / cache.STATE_FILE).exists()
    hit, why = cache.lookup(run, "select", st["key"])
    assert hit is None and "did not finish" in why
    line = next(x for x in _status_lines(run, capsys) if x.startswith("select"))
    assert "INTERRUPTED: the run started" in line and "did not finish" in line

    again = _select_run(run, pairs, 0.5, 5, kill=False)  # the rerun records what it wrote
    assert again.returncode == 0, again.stderr[-3000:]
    st2 = cache.read_state(run, "select")
    assert st2["result"]["outputs"]["selections"]["digest"] == \
        io.ref(run / "select" / "selections").digest
    assert not cache.running_path(run, "select").exists()


def test_a_failed_attempt_is_recorded_on_the_marker(tmp_path):
    res = _state(tmp_path)
    attempt = cache.begin_run(tmp_path, "score", "K2")
    cache.fail_run(tmp_path, "score", attempt, "ContractError: row 3 token=abc")
    assert cache.read_state(tmp_path, "score") is None
    assert "failed (ContractError: row 3" in cache.unfinished(tmp_path, "score")
    cache.write_state(tmp_path, "score", "K2", res, inputs={}, code="c", config={},
                      duration_s=1.0, attempt=attempt)
    assert cache.read_state(tmp_path, "score")["key"] == "K2"
    assert cache.unfinished(tmp_path, "score") is None


def _status_lines(run: Path, capsys) -> list[str]:
    from flows.cli import main

    assert main(["status", "--run-dir", str(run)]) == 0
    return capsys.readouterr().out.splitlines()
