"""A teacher's vLLM engine fails to start: the pipeline stops with an error that names the
teacher, the model and the cause; no rationales artifact appears; once the cause is fixed
the same command completes and writes what an uninterrupted run writes."""

from __future__ import annotations

import shutil

import pytest

from data_contracts import io
from tests.faults.harness import audit, cli_command, park, run_cli, write_config

pytestmark = pytest.mark.faults


def test_engine_that_cannot_get_its_kv_cache_memory(fault_root, reference, fault_log):
    """A real start-up failure inside vLLM's engine process: the KV cache it is told to
    take (VLLM_CPU_KVCACHE_SPACE, in GiB) is larger than the machine's free memory. vLLM
    refuses before allocating anything, in the engine core; its parent only learns
    "Engine core initialization failed"."""
    run = fault_root / "run"
    assert not run.exists()
    broken = write_config(fault_root / "vllm_oom.yaml", launch={
        "generate": {"launcher": "subprocess", "env": {"VLLM_CPU_KVCACHE_SPACE": "100000"}}})
    r = run_cli(cli_command(broken, run, "--stages", "prepare,generate"))
    text = r.stdout
    assert r.returncode != 0, text[-4000:]
    failed = [line for line in text.splitlines() if "[pipeline] stage 'generate' failed" in line]
    assert failed, text[-6000:]
    msg = failed[0]
    print(msg)
    # names the teacher, the model and the root cause vLLM printed in its engine process
    assert "teacher 'tiny-vllm'" in msg and str(run / "base_model") in msg, msg
    assert "did not start: ValueError: Available memory on node" in msg, msg
    assert "less than requested memory for kv (100000.0 GiB)" in msg, msg
    assert "lower VLLM_CPU_KVCACHE_SPACE" in msg, msg  # and what to do about it
    assert text.count("launching:") == 1  # a configuration that cannot fit: not retried
    assert not io.exists(run / "generate" / "rationales")
    assert not (run / "generate" / "_stage.json").exists()
    assert audit(run).broken == []
    # fixed (the override removed): the same command completes, prepare is reused
    r = run_cli(cli_command(write_config(fault_root / "vllm_ok.yaml"), run,
                            "--stages", "prepare,generate"))
    assert r.returncode == 0, r.stdout[-6000:]
    assert "[prepare] cached" in r.stdout
    want = reference["fingerprint"]["generate/rationales"]
    assert io.ref(run / "generate" / "rationales").digest == want
    park(run, fault_root / "vllm_oom")
    fault_log.append({"kind": "vllm-start", "where": "generate", "recovered": True,
                      "rows_lost": 0, "detail": "KV cache larger than free memory: named "
                      "teacher, model, cause; no artifact; fixed rerun equals reference"})


def test_truncated_checkpoint_is_refused_before_the_engine_starts(fault_root, tmp_path,
                                                                   reference, fault_log):
    """A teacher whose weights file was cut short (a killed copy, a full disk): refused in
    about a second, before vLLM starts, with the file named."""
    from mmemb.configs.generate import GenerateConfig, TeacherConfig
    from mmemb.teachers.vllm import EngineStartError, check_model, start_engine

    model = tmp_path / "teacher"
    shutil.copytree(reference["dir"] / "base_model", model)
    w = model / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    t = TeacherConfig(id="big-teacher", backend="vllm", model=str(model), k=2)
    with pytest.raises(EngineStartError) as e:
        start_engine(t, seed=0)
    msg = str(e.value)
    assert msg.startswith(f"teacher 'big-teacher': the vLLM engine for model {model} did not "
                          "start: model.safetensors: SafetensorError:"), msg
    assert "cannot be loaded" in msg and not e.value.transient
    # the generate stage stops before writing a shard
    from mmemb.stages import generate

    cfg = GenerateConfig(pairs=str(reference["dir"] / "data" / "pairs"),
                         image_root=str(reference["dir"] / "data"), out=str(tmp_path / "gen"),
                         teachers=[t.model_dump()], shard_size=16)
    with pytest.raises(EngineStartError):
        generate.run(cfg)
    assert not io.exists(tmp_path / "gen" / "rationales")
    assert not list((tmp_path / "gen").rglob("*.parquet"))
    # the check alone names the cut file; restored, it passes (returns None, raises nothing)
    with pytest.raises(EngineStartError, match=r"model.safetensors: SafetensorError") as e:
        check_model("big-teacher", str(model))
    assert str(model) in str(e.value) and not e.value.transient
    w.write_bytes(good)  # (the engine start itself is tested above)
    assert check_model("big-teacher", str(model)) is None
    fault_log.append({"kind": "vllm-start", "where": "preflight", "recovered": True,
                      "rows_lost": 0, "detail": "truncated weights refused before the engine "
                      "starts, file named; accepted once restored"})
