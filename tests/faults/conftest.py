"""Fixtures of the fault suite (``make test-faults``): the seed of the random kill points, a
record of every injected fault, and the uninterrupted reference run.

Each test adds what it injected to ``fault_log``; at the end of the session the totals
(faults injected, recovered, rows lost) are printed and written to
``$MMEMB_FAULT_SUMMARY`` (default: ``faults_summary.json`` in pytest's base temp folder).
docs/reliability.md quotes them.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from tests.faults import harness
from tests.faults.harness import (
    CONFIG,
    STAGES,
    cli_command,
    fingerprint,
    park,
    run_cli,
    stage_keys,
)

_LOG: list[dict] = []
_SEED: list[int] = []


@pytest.fixture(scope="session")
def fault_seed() -> int:
    """``MMEMB_FAULT_SEED`` to replay a session's kill points; else a fresh one, printed."""
    if not _SEED:
        env = os.environ.get("MMEMB_FAULT_SEED")
        _SEED.append(int(env) if env else random.SystemRandom().randrange(10**6))
        print(f"\n[faults] seed {_SEED[0]} (replay with MMEMB_FAULT_SEED={_SEED[0]})")
    return _SEED[0]


@pytest.fixture(scope="session")
def fault_log():
    """Append one dict per injected fault: kind, where, recovered, rows_lost, detail."""
    return _LOG


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if not _LOG:
        return
    faults = [e for e in _LOG if e["kind"] != "determinism"]  # a check, not a fault
    summary = {
        "seed": _SEED[0] if _SEED else None,
        "faults_injected": len(faults),
        "recovered": sum(bool(e.get("recovered")) for e in faults),
        "rows_lost": sum(int(e.get("rows_lost") or 0) for e in faults),
        "by_kind": {},
        "faults": _LOG,
    }
    for e in faults:
        k = summary["by_kind"].setdefault(e["kind"], {"injected": 0, "recovered": 0})
        k["injected"] += 1
        k["recovered"] += int(bool(e.get("recovered")))
    dest = os.environ.get("MMEMB_FAULT_SUMMARY") or str(
        Path(str(config._tmp_path_factory.getbasetemp())) / "faults_summary.json")
    Path(dest).write_text(json.dumps(summary, indent=2, default=str))
    tr = terminalreporter
    tr.section("fault suite")
    tr.write_line(f"seed {summary['seed']}: {summary['faults_injected']} faults injected, "
                  f"{summary['recovered']} recovered, {summary['rows_lost']} rows lost")
    for e in _LOG:
        ok = "identical" if e["kind"] == "determinism" else "recovered"
        tr.write_line(f"  {e['kind']:<14} {e.get('where', ''):<10} "
                      f"{ok if e.get('recovered') else 'NOT ' + ok.upper()}  "
                      f"{e.get('detail', '')}")
    tr.write_line(f"summary: {dest}")


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory) -> Path:
    """The session's folder; the pipeline code is snapshotted into ``src`` first and every
    CLI run of the suite starts from there (see harness.snapshot)."""
    root = tmp_path_factory.mktemp("faults")
    harness.SRC = harness.snapshot(root / "src")
    return root


@pytest.fixture(scope="session")
def reference(fault_root) -> dict:
    """One uninterrupted run of tests/faults/pipeline.yaml: its artifact digests, stage keys
    and per-stage durations (which size the random kill delays). The run is then parked,
    so later runs use the same run-dir path (paths are recorded inside artifacts)."""
    run = fault_root / "run"
    t0 = time.perf_counter()
    r = run_cli(cli_command(CONFIG, run, "--json", str(fault_root / "reference.json")))
    assert r.returncode == 0, r.stdout[-6000:]
    out = json.loads((fault_root / "reference.json").read_text())
    assert [out["stages"][s]["status"] for s in STAGES] == ["ran"] * len(STAGES)
    ref = {"fingerprint": fingerprint(run), "keys": stage_keys(run),
           "durations": {s: out["stages"][s]["duration_s"] for s in STAGES},
           "rows": {k: v["rows"] for s in STAGES
                    for k, v in (out["stages"][s].get("outputs") or {}).items()},
           "wall_s": time.perf_counter() - t0}
    ref["dir"] = park(run, fault_root / "reference")
    print(f"[faults] reference run: {ref['wall_s']:.0f}s; stage durations "
          + ", ".join(f"{s} {d:.1f}s" for s, d in ref["durations"].items()))
    return ref
