"""The disk fills up during a write (RLIMIT_FSIZE in a child process, SIGXFSZ ignored, so the
write fails with EFBIG exactly as it would with ENOSPC): the writer raises, nothing partial
becomes visible, an older artifact at the same path survives, and once there is room a
rerun resumes and produces the artifact an uninterrupted run produces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_contracts import io
from data_contracts.schemas import PAIRS, RATIONALES
from tasks.launch import DISK_FULL_HINT
from tests.faults.harness import REPO, audit, cli_command, fault_env, run_cli, write_config

pytestmark = pytest.mark.faults
LIMITER = Path(__file__).with_name("fsize_limit.py")

_REPLACE = """
import sys
from data_contracts import io
from data_contracts.schemas import PAIRS
rows = io.read(sys.argv[1], PAIRS).to_pylist()
io.write(rows, sys.argv[2], PAIRS)
"""


def _rows_lost(reference, contract, got) -> int:
    """Rows of the reference artifact that the recovered one lacks (compared whole)."""
    def rows(uri):
        return {json.dumps(r, sort_keys=True, default=str)
                for r in io.read(uri, contract).to_pylist()}
    return len(rows(reference) - rows(got))


def _pairs(n: int) -> list[dict]:
    """n rows of incompressible text, so the file size grows with n."""
    import hashlib

    def text(s: str) -> str:
        return "".join(hashlib.sha256(f"{s}{j}".encode()).hexdigest() for j in range(4))

    return [{"pair_id": f"p{i}", "dataset": "d", "family": "easy", "qry_inst": "q",
             "qry_text": text(f"q{i}"), "qry_img_path": None, "pos_inst": "t",
             "pos_text": text(f"t{i}"), "pos_img_path": None, "neg_text": [],
             "neg_img_path": [], "meta": None} for i in range(n)]


def test_disk_full_while_replacing_an_artifact_keeps_the_old_one(tmp_path, fault_log):
    src = io.write(_pairs(400), tmp_path / "src", PAIRS)
    old = io.write(_pairs(50), tmp_path / "pairs", PAIRS)
    limit = (tmp_path / "pairs" / "part-00000.parquet").stat().st_size * 2
    r = subprocess.run([sys.executable, str(LIMITER), str(limit), sys.executable, "-c",
                        _REPLACE, src.uri, old.uri],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "File too large" in r.stderr, r.stderr[-3000:]
    # the old artifact is untouched and still verifies; the temp folder was removed
    assert io.ref(tmp_path / "pairs") == old
    kept_lost = _rows_lost(old.uri, PAIRS, tmp_path / "pairs")
    assert io.read(tmp_path / "pairs", PAIRS).num_rows == 50 and kept_lost == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs", "src"]
    # with room again, the same write succeeds and replaces it
    r = subprocess.run([sys.executable, "-c", _REPLACE, src.uri,
                        old.uri], cwd=REPO, capture_output=True, text=True, timeout=120)
    recovered = r.returncode == 0 and io.ref(tmp_path / "pairs").digest == src.digest
    lost = kept_lost + (_rows_lost(src.uri, PAIRS, tmp_path / "pairs") if recovered
                        else src.rows)
    fault_log.append({"kind": "disk-full", "where": "io.write", "recovered": recovered,
                      "rows_lost": lost, "detail": f"EFBIG past {limit} B replacing an "
                      "artifact; old one kept, rewrite succeeded"})
    assert recovered, r.stderr[-3000:]
    assert lost == 0


@pytest.mark.usefixtures("fault_root")  # the session's code snapshot runs the pipeline
def test_disk_full_in_a_launched_stage_then_rerun(tmp_path, fault_log):
    """The generate stage (its own process, as in the pipeline) runs out of room: the
    pipeline fails with the cause, no artifact appears, finished shards stay whole; the
    rerun resumes them and its artifact equals an uninterrupted run's."""
    from mmemb.configs.generate import GenerateConfig
    from mmemb.stages import generate

    teachers = [{"id": "oracle", "backend": "oracle", "k": 2}]
    gen = {"shard_size": 16, "torch_threads": 1, "teachers": teachers}
    run = tmp_path / "run"
    ok_cfg = write_config(tmp_path / "ok.yaml", generate=gen,
                          merge_prepare={"pretrain_steps": 0})
    # the pipeline's own prepare, then the reference: the same stage, uninterrupted
    r = run_cli(cli_command(ok_cfg, run, "--stages", "prepare", "--no-tracking"))
    assert r.returncode == 0, r.stdout[-4000:]
    straight = generate.run(GenerateConfig(pairs=str(run / "data" / "pairs"),
                                           image_root=str(run / "data"),
                                           out=str(tmp_path / "straight"), **gen))
    part = Path(straight.outputs["rationales"].uri) / "part-00000.parquet"
    limit = part.stat().st_size * 2 // 3  # each shard (1/8 of the rows) fits, the whole not
    full_cfg = write_config(tmp_path / "full.yaml", generate=gen,
                            merge_prepare={"pretrain_steps": 0},
                            launch={"generate": {"launcher": "subprocess",
                                                 "prefix": [sys.executable, str(LIMITER),
                                                            str(limit)]}})
    r = run_cli(cli_command(full_cfg, run, "--stages", "prepare,generate", "--no-tracking"),
                env=fault_env())
    assert r.returncode != 0
    text = r.stdout
    assert "stage 'generate' failed" in text and "File too large" in text, text[-5000:]
    # the hint that names the full disk and says what to do (not a word of the run's path)
    assert DISK_FULL_HINT in text, text[-3000:]
    print("\n".join(line for line in text.splitlines() if "failed" in line or "disk" in line))
    assert text.count("launching:") == 1  # EFBIG/ENOSPC is not transient: no retry
    out = run / "generate" / "rationales"
    assert not io.exists(out) and not (run / "generate" / "_stage.json").exists()
    a = audit(run)
    assert a.broken == [] and a.shards >= 1, a
    # room again: the same command resumes the finished shards
    r = run_cli(cli_command(ok_cfg, run, "--stages", "prepare,generate", "--no-tracking"))
    assert r.returncode == 0, r.stdout[-4000:]
    assert f"resuming: {a.shards} of 8 shard(s) already done" in r.stdout
    want = straight.outputs["rationales"]
    recovered = io.exists(out) and io.ref(out).digest == want.digest
    lost = _rows_lost(want.uri, RATIONALES, out) if io.exists(out) else want.rows
    fault_log.append({"kind": "disk-full", "where": "generate", "recovered": recovered,
                      "rows_lost": lost, "detail": f"EFBIG past {limit} B in the launched "
                      f"stage; {a.shards}/8 shards kept, rerun resumed them"})
    assert recovered and lost == 0
    assert io.read(out, RATIONALES).num_rows == 240
