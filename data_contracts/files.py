"""The one home for content digests and atomic file writes.

Why one home: a digest decides whether a stage is recomputed, resumed or reused, so every
caller must hash the same way (sha256 of the bytes; of canonical JSON for objects; of a
checkpoint's model files for a checkpoint), and a file another process may read (a stage
record, a manifest, a memo) must appear whole or not at all. Everything here is stdlib:
``hashlib.file_digest`` streams a file of any size; writes go to a unique temporary name in
the same folder, are fsynced, then renamed over the target (``os.replace`` is atomic on
POSIX within one filesystem). The digest of an *artifact* folder (its manifest's) is
:func:`data_contracts.io.content_digest`, beside the manifest code it reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


# --------------------------------------------------------------------------- checkpoints

#: The files of a checkpoint that decide what it computes. Anything else in the folder
#: (training logs, timing notes such as mmemb_pretrain.json, checkpoints of a resumable
#: trainer) is not part of its digest, so rewriting a log does not invalidate later stages.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".model", ".tiktoken", ".jinja")
_MODEL_NAMES = re.compile(r"^(config|generation_config|preprocessor_config|processor_config|"
                          r"video_preprocessor_config|tokenizer(_config)?|special_tokens_map|"
                          r"added_tokens|vocab|merges|chat_template|mmemb_embedding|mmemb_gate|"
                          r"adapter_config|model\.safetensors\.index)\.(json|txt)$")


def model_file(name: str) -> bool:
    """Is a file of this name part of what a checkpoint computes (weights, config,
    tokenizer, the method's own settings)?"""
    return name.endswith(_MODEL_SUFFIXES) or bool(_MODEL_NAMES.match(name))


def is_checkpoint(path: str | Path) -> bool:
    """A folder holding a model (a ``config.json`` or weights at its top)."""
    p = Path(path)
    return p.is_dir() and any(f.is_file() and (f.name == "config.json"
                                               or f.suffix == ".safetensors")
                              for f in p.iterdir())


class DigestMemo:
    """File digests remembered by (resolved path, size, mtime), so a 16 GB checkpoint is
    hashed once and a later digest of it costs a ``stat`` per file. ``path`` None: a memo
    for this process only (nothing is read or saved). A torn or foreign memo file is
    ignored (every file is hashed again), never trusted."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.data: dict[str, list] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                data = {}
            self.data = data if isinstance(data, dict) else {}
        self.dirty = False

    def file(self, p: str | Path) -> str:
        """The sha256 of file ``p``, from the memo when its size and mtime are unchanged."""
        p = Path(p)
        st = p.stat()
        k = str(p.resolve())
        hit = self.data.get(k)
        if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [st.st_size, st.st_mtime_ns]:
            return hit[2]
        d = sha256_file(p)
        self.data[k] = [st.st_size, st.st_mtime_ns, d]
        self.dirty = True
        return d

    def save(self) -> None:
        """Write the memo (atomically) when a digest was added."""
        if self.path is not None and self.dirty:
            atomic_write_json(self.path, self.data)
            self.dirty = False


def checkpoint_digest(path: str | Path, memo: DigestMemo | str | Path | None = None) -> str:
    """Content digest of a checkpoint: of a folder, sha256 over each model file's relative
    path and sha256 (:func:`model_file`; subfolders such as ``adapter/`` included); of a
    single file, its sha256. ``memo`` skips unchanged files: a :class:`DigestMemo`, or the
    path of a memo file (read, and saved when a file was hashed), else one for this call."""
    p = Path(path)
    store = memo if isinstance(memo, DigestMemo) else DigestMemo(memo)
    if p.is_file():
        digest = store.file(p)
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and model_file(f.name))
        h = hashlib.sha256()
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0" + store.file(f).encode())
        digest = h.hexdigest()
    if store is not memo:
        store.save()
    return digest


# --------------------------------------------------------------------------- atomic writes

def temp_beside(path: str | Path) -> Path:
    """A unique hidden temporary name next to ``path`` (same filesystem, so a rename onto
    ``path`` is atomic): two writers never share one, and a killed writer's leftover is
    never mistaken for the file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def fsync_path(path: str | Path) -> None:
    """Flush a file or folder to disk (a folder: its entries, i.e. a rename inside it).
    Best effort: a filesystem that cannot fsync a folder is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
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


__all__ = ["DigestMemo", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "checkpoint_digest", "fsync_path", "is_checkpoint", "json_digest", "model_file",
           "sha256_file", "temp_beside"]
