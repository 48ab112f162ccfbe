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
