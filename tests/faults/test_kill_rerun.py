"""SIGKILL at a random point of every stage, rerun, and the final artifacts equal those of an
uninterrupted run; and two uninterrupted runs with the same seed are identical.

The kills form one chain over one run directory: the run that recovers from the kill in
stage N is the one killed in stage N+1 (reaching N+1's start marker proves N recovered),
and a last rerun completes. After every kill: no process of the group survives, every
artifact a reader can open verifies against its manifest, every shard is a whole file,
and every stage recorded as done still has its outputs. The delay after the stage's start
marker is a seeded random fraction of the stage's duration in the reference run; a kill
that lands after the stage already finished is retried with ``--from STAGE`` and a
shorter delay.
"""

from __future__ import annotations

import json
import random

import pytest

from tests.faults.harness import (
    CONFIG,
    MODELS,
    STAGES,
    audit,
    cli_command,
    fingerprint,
    kill_during,
    max_abs_diff,
    park,
    run_cli,
    stage_keys,
)

pytestmark = pytest.mark.faults


#: (stage, marker): where each kill of the chain waits. None: the stage's start line, then
#: a random share of its duration. Training is killed twice: first within a second of its
#: first checkpoint (so the rerun must resume from a checkpoint, which a random point early
#: in the stage rarely exercises), then at a random point of the resumed run.
PLAN = [("prepare", None), ("generate", None), ("score", None), ("select", None),
        ("train", "checkpoint step 4 ->"), ("train", None), ("gate", None), ("evaluate", None)]


def _how_it_resumed(stage: str, text: str) -> str:
    """What the run after a kill in ``stage`` says about picking up that stage's work."""
    notes, cached_tasks = [], 0
    for line in text.splitlines():
        line = line.split(" - ", 1)[-1].strip()  # drop Prefect's log prefix
        if line.startswith("[evaluate] ") and line.endswith("; cached"):
            cached_tasks += 1  # a task whose embeddings were all in the chunk cache
        if line.startswith(f"[{stage}] running:"):
            notes.append(line.removeprefix(f"[{stage}] running: "))
        elif line.startswith(f"[{stage}] cached:"):  # killed in a forced rerun of a done stage
            notes.append("its earlier finished result reused (outputs verified)")
        elif ("resumed from" in line or "resuming:" in line or "already done" in line) \
                and (line.startswith(f"[{stage}]") or line.startswith("[shards]")):
            notes.append(line)
    if stage == "evaluate" and cached_tasks:
        notes.append(f"{cached_tasks} task(s) read from the embedding cache")
    return "; ".join(dict.fromkeys(notes))


def _diff(a: dict, b: dict) -> dict:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def test_two_uninterrupted_runs_give_identical_digests(fault_root, reference, fault_log):
    run = fault_root / "run"
    r = run_cli(cli_command(CONFIG, run))
    assert r.returncode == 0, r.stdout[-6000:]
    fp = fingerprint(run)
    # every artifact (Parquet digests; eval tables without their latency columns) and every
    # checkpoint (model files' sha256) is identical, so is every stage's cache key
    assert len(fp) == len(reference["fingerprint"]) >= 10
    assert _diff(fp, reference["fingerprint"]) == {}
    assert stage_keys(run) == reference["keys"]
    for m in MODELS:
        assert max_abs_diff(run / m, reference["dir"] / m) == 0.0, m
    park(run, fault_root / "determinism")
    fault_log.append({"kind": "determinism", "where": "all", "recovered": True, "rows_lost": 0,
                      "detail": f"2 runs, {len(fp)} artifacts/models with equal digests"})


def test_sigkill_in_every_stage_then_rerun_equals_the_uninterrupted_run(
        fault_root, reference, fault_seed, fault_log):
    rng = random.Random(fault_seed)
    run = fault_root / "run"
    assert not run.exists()
    kills = []
    for stage, marker in PLAN:
        for attempt in range(1, 4):
            # the first try reruns the pipeline as a user would (resume); a retry after a
            # kill that came too late recomputes the stage (and those after it)
            extra = ["--from", stage] if attempt > 1 else []
            frac = rng.uniform(0.05, 0.9) * 0.5 ** (attempt - 1)
            delay = frac * reference["durations"][stage]
            if marker and attempt == 1:  # within a second of the first checkpoint
                frac, delay = None, rng.uniform(0.0, 1.0)
            k = kill_during(cli_command(CONFIG, run, *extra), run, stage, delay,
                            marker=marker if attempt == 1 else None)
            k.attempt = attempt
            assert k.survivors == 0, f"{k.survivors} process(es) outlived SIGKILL in {stage}"
            a = audit(run)
            assert a.broken == [], a.broken
            kills.append((k, a))
            when = (f"{frac:.0%} of {reference['durations'][stage]:.1f}s" if frac is not None
                    else f"{k.delay_s:.2f}s after {marker!r}")
            print(f"[faults] kill in {stage} (attempt {attempt}) {k.delay_s:.2f}s after its "
                  f"marker ({when}): "
                  f"{'inside the stage' if k.inside else 'after it finished'}; "
                  f"{a.artifacts} artifacts verified, {a.shards} shards whole, "
                  f"{len(a.temp_leftovers)} temp leftovers")
            if k.inside:
                break
        assert k.inside, f"no kill landed inside {stage} in 3 tries"
    final = run_cli(cli_command(CONFIG, run, "--json", str(fault_root / "final.json")))
    assert final.returncode == 0, final.stdout[-6000:]
    out = json.loads((fault_root / "final.json").read_text())
    # the last rerun only had to finish evaluate: everything before it was reused
    assert [out["stages"][s]["status"] for s in STAGES[:-1]] == ["cached"] * (len(STAGES) - 1)
    assert out["stages"]["evaluate"]["status"] == "ran"
    fp = fingerprint(run)
    assert _diff(fp, reference["fingerprint"]) == {}
    assert stage_keys(run) == reference["keys"]
    weights = {m: max_abs_diff(run / m, reference["dir"] / m) for m in MODELS}
    assert weights == {m: 0.0 for m in MODELS}
    rows = {k: v["rows"] for s in STAGES
            for k, v in (out["stages"][s].get("outputs") or {}).items()}
    assert rows == reference["rows"]
    final_audit = audit(run)
    assert final_audit.broken == []
    park(run, fault_root / "killed")
    # the run after each kill is the next kill's run (or the final one): how it resumed
    after = [k.output for k, _ in kills[1:]] + [final.stdout]
    for (k, a), nxt in zip(kills, after, strict=True):
        if k.inside:
            how = _how_it_resumed(k.stage, nxt)
            print(f"[faults] after the kill in {k.stage}: {how}")
            fault_log.append({
                "kind": "sigkill", "where": k.stage, "recovered": True, "rows_lost": 0,
                "detail": f"{k.delay_s:.2f}s after {k.marker!r} (try {k.attempt}); "
                          f"{a.artifacts} artifacts + {a.shards} shards verified; rerun: {how}"})
