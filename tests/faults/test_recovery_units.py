"""Fast checks of the fixes the fault suite led to (part of the default suite, no marker):
a torn checkpoint behind a still-matching stage cache entry is not reused, and a full disk
is named as such and not retried."""

from __future__ import annotations

import errno
import shutil

from mmemb.stages.base import StageResult
from tasks import cache
from tasks.launch import DISK_FULL_HINT, disk_full_hint, is_transient


def test_a_checkpoint_torn_after_its_stage_finished_is_not_reused(tiny_model, tmp_path):
    policy = tmp_path / "gate" / "policy"
    shutil.copytree(tiny_model, policy)
    res = StageResult("gate", models={"policy": policy}, summary="s")
    cache.write_state(tmp_path, "gate", "K", res, inputs={}, code="c", config={},
                      duration_s=1.0)
    hit, why = cache.lookup(tmp_path, "gate", "K")
    assert hit is not None and why == ""
    # a file beside the model that is not part of it (a timing note, a log) may change
    (policy / "mmemb_pretrain.json").write_text('{"seconds": 1.0}')
    assert cache.lookup(tmp_path, "gate", "K")[0] is not None
    # a later forced rerun of the stage killed while saving: half of the weights file
    weights = policy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    miss, why = cache.lookup(tmp_path, "gate", "K")
    assert miss is None and why == f"model 'policy' ({policy}) changed since it was written"
    weights.write_bytes(data)  # the same bytes again: reusable again
    assert cache.lookup(tmp_path, "gate", "K")[0] is not None


def test_a_full_disk_is_named_and_not_retried():
    for e in (OSError(errno.ENOSPC, "No space left on device"),
              OSError(errno.EFBIG, "File too large"),
              OSError(errno.EDQUOT, "Disk quota exceeded")):
        assert disk_full_hint(e) == DISK_FULL_HINT and not is_transient(e)
    # as the launcher reads it back from a launched stage's error report
    assert disk_full_hint("OSError: [Errno 27] Error writing bytes to file. Detail: "
                          "[errno 27] File too large") == DISK_FULL_HINT
    assert disk_full_hint(OSError(errno.EIO, "Input/output error")) == ""
    assert disk_full_hint(ValueError("bad config")) == ""


def test_an_engine_start_failure_quotes_the_cause_its_processes_printed(capfd):
    """vLLM's parent only says "Engine core initialization failed"; the cause is printed by
    the engine's processes, which inherit fds 1 and 2: the tail copies them and finds it."""
    import subprocess
    import sys

    from mmemb.teachers.vllm import _OutputTail, explain, root_cause

    lines = ["(EngineCore pid=1) ERROR 11-26 10:15:32 [core.py:1510] Exception: WorkerProc "
             "initialization failed due to an exception in a background process.",
             "RuntimeError: Worker failed with error 'Available memory on node 0', please "
             "check the stack trace above for the root cause",
             "(Worker pid=2) ERROR 11-26 10:15:32 [cpu_worker.py:218] ValueError: Available "
             "memory on node 0 (1.00/2.00 GiB) on kv cache allocation is less than requested "
             "memory for kv (4.00 GiB).",
             "RuntimeError: Engine core initialization failed. See root cause above."]
    tail = _OutputTail()
    with tail:
        # as vLLM does: log records on stdout, the traceback on stderr
        subprocess.run([sys.executable, "-c", "import sys; print(sys.argv[1]); "
                        "sys.stderr.write(sys.argv[2])", "\n".join(lines[:3]),
                        lines[3] + "\n"], check=True)
    tail.drain(10.0)  # the child has exited: both copies reach the end of its output
    cause = root_cause(tail.text())
    assert cause == ("ValueError: Available memory on node 0 (1.00/2.00 GiB) on kv cache "
                     "allocation is less than requested memory for kv (4.00 GiB).")
    seen = capfd.readouterr()  # still shown on the console, unchanged
    assert lines[2] in seen.out and lines[3] in seen.err
    e = explain("tiny-vllm", "/models/x", cause)
    assert str(e).startswith("teacher 'tiny-vllm': the vLLM engine for model /models/x did "
                             "not start: ValueError: Available memory")
    assert "VLLM_CPU_KVCACHE_SPACE" in str(e) and not e.transient
    # an unknown cause behind the generic failure keeps the old policy: one retry
    assert explain("t", "/m", "RuntimeError: Engine core died", known_transient=True).transient
    assert root_cause("\n".join([lines[0], lines[3]])) is None
    assert root_cause("\n".join(lines[:2])).startswith("RuntimeError: Worker failed")
