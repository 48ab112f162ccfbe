"""The one home for content digests and atomic file writes.

Why one home: a digest decides whether a stage is recomputed, resumed or reused, so every
caller must hash the same way (sha256 of the bytes; of canonical JSON for objects), and a
file another process may read (a stage record, a manifest, a memo) must appear whole or not
at all. Everything here is stdlib: ``hashlib.file_digest`` streams a file of any size;
writes go to a unique temporary name in the same folder, are fsynced, then renamed over the
target (``os.replace`` is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, streamed (checkpoints can be many GB)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def json_digest(obj: Any) -> str:
    """Hex sha256 of ``obj`` as canonical JSON (sorted keys; non-JSON values via ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _temp_beside(path: Path) -> Path:
    """A unique hidden temporary name next to ``path``: two writers never share one."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as JSON (non-JSON values via ``str``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str))


__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "json_digest",
           "sha256_file"]
