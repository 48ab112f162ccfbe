"""Issue 13, item 12 through the pipeline flow: a deleted part is never reused as cached,
a same-size corruption is caught by --verify."""

from __future__ import annotations

import pytest

from tests.flows.conftest import fast_config


@pytest.mark.slow  # six pipeline runs: ~30 s on 2 busy cores (unit tests: test_integrity.py)
def test_rerun_after_a_part_was_deleted_recomputes(prefect_harness, tmp_path):
    from flows.pipeline import pipeline
    from tasks import cache

    cfg = fast_config(tmp_path / "run")
    first = pipeline(cfg)["stages"]["prepare"]
    assert first["status"] == "ran"
    pairs = cfg.run_dir / "data" / "pairs"
    part = sorted(pairs.glob("part-*.parquet"))[0]
    assert pipeline(cfg)["stages"]["prepare"]["status"] == "cached"

    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    part.write_bytes(bytes(data))
    assert pipeline(cfg)["stages"]["prepare"]["status"] == "cached"  # a stat per part only
    hit, why = cache.lookup(cfg.run_dir, "prepare", first["key"], verify=True)
    assert hit is None and f"part {part.name}: content digest differs" in why
    assert pipeline(cfg, verify=True)["stages"]["prepare"]["status"] == "ran"

    part.unlink()
    hit, why = cache.lookup(cfg.run_dir, "prepare", first["key"])
    assert hit is None and why == f"output 'pairs' ({pairs}): part {part.name} is missing"
    assert pipeline(cfg)["stages"]["prepare"]["status"] == "ran"
    assert part.is_file() and pipeline(cfg)["stages"]["prepare"]["status"] == "cached"
