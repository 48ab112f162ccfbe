"""Atomic, sharded, validated Parquet I/O for every artifact the pipeline exchanges.

An artifact is a folder::

    scores/
      part-00000.parquet
      part-00001.parquet
      _manifest.json        # contract, schema_version, rows, per-part and total sha256

The folder is built under a temporary name and renamed into place, so a reader either
sees a complete artifact (manifest present, digests match) or nothing: a killed writer
can never leave a partial file that a later stage would read. A plain ``.parquet`` file
(e.g. a user's input) is also accepted by :func:`read`; it is validated the same way.

Example::

    >>> from data_contracts import io, schemas
    >>> ref = io.write(table, "runs/x/pairs", schemas.PAIRS)      # doctest: +SKIP
    >>> table = io.read("runs/x/pairs", schemas.PAIRS)             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.files import (
    DigestMemo,
    atomic_write_json,
    checkpoint_digest,
    fsync_path,
    is_checkpoint,
    sha256_file,
    temp_beside,
)
from data_contracts.schemas import META_NAME, META_VERSION, RESERVED_MARKUP, Contract

MANIFEST = "_manifest.json"
DEFAULT_SHARD_ROWS = 50_000


class ContractError(ValueError):
    """A file that breaks its contract. Names the file, column and row, and the fix."""

    def __init__(self, file: str | Path, message: str, *, column: str | None = None,
                 row: int | None = None, fix: str | None = None):
        self.file, self.column, self.row, self.fix = str(file), column, row, fix
        where = [f"{self.file}"]
        if column is not None:
            where.append(f"column {column!r}")
        if row is not None:
            where.append(f"row {row}")
        text = ", ".join(where) + f": {message}"
        if fix:
            text += f" Fix: {fix}"
        super().__init__(text)


@dataclass(frozen=True)
class ArtifactRef:
    """What flows pass between tasks instead of data: small, hashable, JSON-able."""

    uri: str
    contract: str
    schema_version: int
    rows: int
    digest: str

    def to_dict(self) -> dict:
        return asdict(self)


def total_digest(parts: list[dict]) -> str:
    """An artifact's digest: sha256 over its parts' sha256s, in order."""
    return hashlib.sha256("".join(p["sha256"] for p in parts).encode()).hexdigest()


def _with_meta(table: pa.Table, contract: Contract) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[META_NAME] = contract.name.encode()
    meta[META_VERSION] = str(contract.version).encode()
    return table.replace_schema_metadata(meta)


def conform(table: pa.Table | list[dict], contract: Contract, where: str = "<memory>") -> pa.Table:
    """Return ``table`` with exactly the contract's columns, order and types.

    Missing nullable columns are *not* invented here: a writer that forgets a column is a
    bug, and silently adding nulls would hide it.
    """
    if isinstance(table, list):
        try:
            return pa.Table.from_pylist(table, schema=contract.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
            raise ContractError(where, f"rows do not fit contract {contract.name!r}: {e}") from e
    check_columns(table.schema, contract, where)
    table = table.select(contract.columns)
    _check_nulls(table, contract, where)
    try:
        return table.cast(_target_schema(table.schema, contract))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ContractError(where, f"cannot cast to contract {contract.name!r}: {e}") from e


def check_columns(schema: pa.Schema, contract: Contract, where: str) -> None:
    missing = [c for c in contract.columns if c not in schema.names]
    extra = [c for c in schema.names if c not in contract.columns]
    if missing:
        raise ContractError(
            where, f"missing column(s) {missing} required by contract {contract.name!r}",
            column=missing[0], fix=f"write all of {contract.columns}.")
    if extra:
        raise ContractError(
            where, f"unexpected column(s) {extra} not in contract {contract.name!r}",
            column=extra[0], fix="drop them, or bump the contract version if they are new.")
    for f in contract.schema:
        got = schema.field(f.name).type
        if f.name in contract.vectors and _is_vector_type(got):
            continue
        if got != f.type and not _castable(got, f.type):
            raise ContractError(where, f"type {got} where {f.type} is expected", column=f.name,
                                fix=f"cast the column to {f.type}.")


def _is_vector_type(t: pa.DataType) -> bool:
    """A fixed-size list of float32/float16 (``data_contracts.vectors``), any size."""
    return pa.types.is_fixed_size_list(t) and t.value_type in (pa.float32(), pa.float16())


def _target_schema(schema: pa.Schema, contract: Contract) -> pa.Schema:
    """The contract's schema, with each vector column kept in the table's fixed-size type
    (its dimension and float width are the writer's choice); a ``list`` vector column (an
    older artifact) is cast to the contract's ``list<float32>``."""
    out = contract.schema
    for name in contract.vectors:
        got = schema.field(name).type
        if _is_vector_type(got):
            i = out.get_field_index(name)
            out = out.set(i, out.field(i).with_type(got))
    return out


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    if pa.types.is_null(src):
        return True
    if pa.types.is_large_string(src) and pa.types.is_string(dst):
        return True
    if pa.types.is_integer(src) and (pa.types.is_integer(dst) or pa.types.is_floating(dst)):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return True
    if (pa.types.is_list(src) or pa.types.is_large_list(src)) and pa.types.is_list(dst):
        return _castable(src.value_type, dst.value_type) or src.value_type == dst.value_type
    return False


# --------------------------------------------------------------------------- writing


def atomic_write_parquet(table: pa.Table, path: str | Path) -> str:
    """Write one Parquet file atomically (unique temp file in the same folder, fsynced,
    renamed). Returns the file's sha256. Used for resumable shards, which must appear whole
    or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return sha256_file(path)


def write(table: pa.Table | list[dict], path: str | Path, contract: Contract, *,
          shard_rows: int = DEFAULT_SHARD_ROWS, validate_rows: bool = True) -> ArtifactRef:
    """Validate ``table`` against ``contract`` and write it as an artifact folder, atomically.

    An existing artifact at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    table = conform(table, contract, str(path))
    if validate_rows:
        validate(table, contract, str(path))
    table = _with_meta(table, contract)
    tmp = temp_beside(path)
    tmp.mkdir(parents=True)
    try:
        n_parts = max(1, math.ceil(table.num_rows / shard_rows))
        parts = []
        for i in range(n_parts):
            part = table.slice(i * shard_rows, shard_rows)
            name = f"part-{i:05d}.parquet"
            pq.write_table(part, tmp / name, compression="zstd")
            fsync_path(tmp / name)
            parts.append({"file": name, "rows": part.num_rows, "bytes": (tmp / name).stat().st_size,
                          "sha256": sha256_file(tmp / name)})
        digest = total_digest(parts)
        manifest = {"contract": contract.name, "schema_version": contract.version,
                    "rows": table.num_rows, "digest": digest, "parts": parts}
        atomic_write_json(tmp / MANIFEST, manifest)
        fsync_path(tmp)
        old = None
        if path.exists():
            old = temp_beside(path).with_suffix(".old")
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ArtifactRef(str(path), contract.name, contract.version, table.num_rows, digest)


# --------------------------------------------------------------------------- reading


def exists(path: str | Path) -> bool:
    """True when ``path`` holds a complete artifact (its manifest was written last)."""
    path = Path(path)
    return (path / MANIFEST).is_file() or (path.is_file() and path.suffix == ".parquet")


def content_digest(path: str | Path) -> str:
    """The content digest of an input: an artifact folder's (from its checked manifest, no
    part is re-read) or a plain file's sha256. Resume fingerprints and the training data
    digest use it, so a rewritten input changes them and a re-read one does not."""
    path = Path(path)
    return ref(path).digest if path.is_dir() else sha256_file(path)


def path_digest(path: str | Path, memo: DigestMemo | None = None) -> str | None:
    """The digest of any input path, saying what it is: ``artifact:`` (manifest digest),
    ``file:`` (sha256) or ``dir:`` (a checkpoint's model files); ``memo`` skips unchanged
    files. None for a path that does not exist, and for a folder that is neither an
    artifact nor a checkpoint (an image root): it is identified by its path, which the
    config holds, since hashing a million images on every run would cost more than a stage.
    """
    memo = memo or DigestMemo(None)
    p = Path(path)
    if not p.exists():
        return None
    if p.is_dir() and (p / MANIFEST).is_file():
        return "artifact:" + ref(p).digest
    if p.is_file():
        return "file:" + memo.file(p)
    return "dir:" + checkpoint_digest(p, memo) if is_checkpoint(p) else None


def ref(path: str | Path) -> ArtifactRef:
    """The :class:`ArtifactRef` of a complete artifact folder, from its manifest."""
    m = _manifest(Path(path))
    return ArtifactRef(str(path), m["contract"], m["schema_version"], m["rows"], m["digest"])


def contract_of(path: str | Path) -> str | None:
    """The contract name an artifact (folder or file) declares, or None if it declares none."""
    path = Path(path)
    if path.is_dir():
        return _manifest(path).get("contract")
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as e:  # noqa: BLE001
        raise ContractError(path, f"not a readable Parquet file ({e}).") from e
    return meta[META_NAME].decode() if META_NAME in meta else None


def _manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ContractError(path, "no _manifest.json: the artifact is incomplete (a writer was "
                            "interrupted) or this is not an artifact folder.",
                            fix="rerun the stage that produces it.")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ContractError(mpath, f"manifest is not valid JSON ({e}).",
                            fix="delete the folder and rerun the stage that produces it.") from e
    _check_manifest(mpath, m)
    return m


def _check_manifest(mpath: Path, m: object) -> None:
    """The manifest agrees with itself: its total digest is that of its parts' digests and
    its row count their sum (a hand-edited or torn manifest is refused, not trusted)."""
    fix = "delete the folder and rerun the stage that produces it."
    try:
        parts = m["parts"]  # type: ignore[index]
        rows = [int(p["rows"]) for p in parts]
        shas = [str(p["sha256"]) for p in parts]
        names = [p["file"] for p in parts]
        total, digest = int(m["rows"]), m["digest"]  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as e:
        raise ContractError(mpath, f"manifest lacks a field or has a wrong type ({e!r}).",
                            fix=fix) from e
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n
           or n.startswith(".")]
    if bad:
        raise ContractError(mpath, f"manifest names part(s) {bad} outside its folder.", fix=fix)
    if sum(rows) != total:
        raise ContractError(mpath, f"manifest says {total} rows but its parts hold "
                            f"{sum(rows)}.", fix=fix)
    if total_digest([{"sha256": s} for s in shas]) != digest:
        raise ContractError(mpath, "manifest's total digest is not that of its parts: the "
                            "manifest was modified or corrupted.", fix=fix)


def part_problem(folder: Path, part: dict, verify: bool = False) -> str:
    """What is wrong with one part its manifest lists, '' when nothing: it is missing, has
    another size than recorded (one ``stat``), or, with ``verify``, other bytes."""
    f = folder / part["file"]
    if not f.is_file():
        return "is missing"
    if verify:
        ok = sha256_file(f) == part["sha256"]
        return "" if ok else "has other bytes than recorded (content digest differs)"
    if "bytes" in part and f.stat().st_size != int(part["bytes"]):
        return f"is {f.stat().st_size} bytes, the manifest says {part['bytes']}"
    return ""


def read(path: str | Path, contract: Contract, *, check_paths: bool = False,
         image_root: str | Path | None = None, verify_digest: bool = True,
         allow_outside_root: bool = False) -> pa.Table:
    """Read and validate an artifact folder or a single Parquet file.

    Raises :class:`ContractError` naming the file, column and row of the first problem.
    With ``image_root``, every image path must lie inside it (links resolved) unless
    ``allow_outside_root``.
    """
    path = Path(path)
    if not path.exists():
        raise ContractError(path, "does not exist.", fix="check the path, or run the stage "
                            "that produces it first.")
    if path.is_dir():
        m = _manifest(path)
        if m.get("contract") != contract.name:
            raise ContractError(path, f"holds contract {m.get('contract')!r}, expected "
                                f"{contract.name!r}.", fix="point to the right artifact.")
        files = [path / p["file"] for p in m["parts"]]
        for p, f in zip(m["parts"], files, strict=True):
            if why := part_problem(path, p, verify_digest):
                raise ContractError(f, f"{why}: the part was removed, truncated or modified.",
                                    fix="rerun the stage that produces it.")
    else:
        files = [path]
    tables = [_read_file(f, contract) for f in files]
    if path.is_dir():
        for p, f, t in zip(m["parts"], files, tables, strict=True):
            if t.num_rows != int(p["rows"]):
                raise ContractError(f, f"holds {t.num_rows} rows, the manifest says "
                                    f"{p['rows']}.", fix="rerun the stage that produces it.")
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    validate(table, contract, str(path), check_paths=check_paths, image_root=image_root,
             allow_outside_root=allow_outside_root)
    return table


def _read_file(f: Path, contract: Contract) -> pa.Table:
    """One Parquet file, its declared contract and version checked from the footer before
    the data is read, conformed to the contract."""
    try:
        schema = pq.read_schema(f)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise ContractError(f, f"not a readable Parquet file ({type(e).__name__}: {e}).",
                            fix="regenerate the file; it is truncated or not Parquet.") from e
    meta = schema.metadata or {}
    if META_NAME in meta and meta[META_NAME].decode() != contract.name:
        raise ContractError(f, f"written as contract {meta[META_NAME].decode()!r}, expected "
                            f"{contract.name!r}.")
    if META_VERSION in meta and meta[META_VERSION].decode() != str(contract.version):
        raise ContractError(f, f"schema_version {meta[META_VERSION].decode()} but this release "
                            f"reads version {contract.version} of {contract.name!r}.",
                            fix="rerun the stage that produced it with this release.")
    check_columns(schema, contract, str(f))
    try:
        table = pq.read_table(f)
    except Exception as e:  # noqa: BLE001
        raise ContractError(f, f"Parquet data cannot be read ({type(e).__name__}: {e}).",
                            fix="regenerate the file; it is truncated or corrupt.") from e
    return conform(table, contract, str(f))


def validate(table: pa.Table, contract: Contract, where: str = "<memory>", *,
             check_paths: bool = False, image_root: str | Path | None = None,
             allow_outside_root: bool = False) -> None:
    """Check the contract's value rules; raise on the first broken row.

    ``image_root``: image paths must resolve (links followed) inside it, unless
    ``allow_outside_root``; ``check_paths``: they must also be regular files.
    """
    _check_nulls(table, contract, where)
    for rule in (_check_non_empty, _check_enums, _check_finite_if_ok, _check_no_markup,
                 _check_unique_key, _check_same_length):
        rule(table, contract, where)
    if image_root is not None and not allow_outside_root:
        _check_confined(table, contract, where, image_root)
    if check_paths:
        _check_paths_exist(table, contract, where, Path(image_root) if image_root else Path("."))


def _check_non_empty(table: pa.Table, contract: Contract, where: str) -> None:
    for name in contract.non_empty:
        col = table.column(name)
        if pa.types.is_string(col.type):
            for i, v in enumerate(col.to_pylist()):
                if v is not None and not v.strip():
                    raise ContractError(where, "empty value in a required column", column=name,
                                        row=i, fix="give every row a non-empty value.")


def _check_enums(table: pa.Table, contract: Contract, where: str) -> None:
    for name, allowed in contract.enums.items():
        for i, v in enumerate(table.column(name).to_pylist()):
            if v is not None and v not in allowed:
                raise ContractError(where, f"value {v!r} not one of {list(allowed)}",
                                    column=name, row=i)


def _check_finite_if_ok(table: pa.Table, contract: Contract, where: str) -> None:
    if not contract.finite_if_ok:
        return
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    for name in contract.finite_if_ok:
        for i, v in enumerate(table.column(name).to_pylist()):
            if ok[i] and (v is None or not math.isfinite(v)):
                raise ContractError(where, f"{v!r} in a row with status 'ok': a scored "
                                    f"row needs a finite {name}", column=name, row=i,
                                    fix="give the row status 'error' with the reason, "
                                    "or rerun the stage that wrote it.")


def _check_no_markup(table: pa.Table, contract: Contract, where: str) -> None:
    for name in contract.no_markup:
        for i, v in enumerate(table.column(name).to_pylist()):
            bad = [t for t in RESERVED_MARKUP if v and t in v]
            if bad:
                raise ContractError(where, f"holds reserved token(s) {bad}: a rationale with "
                                    "them would end the reasoning span early or move the "
                                    "pooling position", column=name, row=i,
                                    fix="drop the row's rationale (null) or rerun stage 3, "
                                    "which filters such candidates as malformed.")


def _check_unique_key(table: pa.Table, contract: Contract, where: str) -> None:
    if not contract.key:
        return
    seen: dict[tuple, int] = {}
    cols = [table.column(k).to_pylist() for k in contract.key]
    for i, key in enumerate(zip(*cols, strict=True)):
        if key in seen:
            dup = dict(zip(contract.key, key, strict=True))
            raise ContractError(where, f"duplicate key {dup} (first at row {seen[key]})",
                                column=contract.key[-1], row=i,
                                fix="keys must be unique; de-duplicate the input.")
        seen[key] = i


def _check_same_length(table: pa.Table, contract: Contract, where: str) -> None:
    for group in contract.same_length:
        lengths = [[len(v) if v is not None else 0 for v in table.column(c).to_pylist()]
                   for c in group]
        for i, ls in enumerate(zip(*lengths, strict=True)):
            if len(set(ls)) > 1:
                raise ContractError(where, f"list columns {list(group)} have lengths {list(ls)}",
                                    column=group[1], row=i,
                                    fix="every list in the group needs one entry per item.")


def _check_paths_exist(table: pa.Table, contract: Contract, where: str, root: Path) -> None:
    for name in contract.path_columns:
        for i, v in enumerate(table.column(name).to_pylist()):
            for p in (v if isinstance(v, list) else [v]):
                if p and not (root / p).is_file():
                    what = ("is not a regular file (a FIFO, device or folder)"
                            if (root / p).exists() else "does not exist")
                    raise ContractError(where, f"image {str(root / p)!r} {what}",
                                        column=name, row=i,
                                        fix="fix the path or the image_root setting.")


class _Confiner:
    """Is ``root / path`` inside ``root`` once links are resolved? Each folder is resolved
    and listed once (an artifact holds many paths in few folders), so a path costs a dict
    lookup; a final component that is a link is resolved on its own."""

    def __init__(self, root: str | Path):
        self.root = os.fspath(root)
        real = os.path.realpath(self.root)
        self.real_root = real
        self.prefix = real.rstrip(os.sep) + os.sep
        self._dirs: dict[str, tuple[str, frozenset[str]]] = {}

    def _folder(self, head: str) -> tuple[str, frozenset[str]]:
        got = self._dirs.get(head)
        if got is None:
            real = os.path.realpath(head)
            try:
                with os.scandir(real) as it:
                    links = frozenset(e.name for e in it if e.is_symlink())
            except OSError:  # missing or not a folder: nothing in it can be a link
                links = frozenset()
            got = self._dirs[head] = (real, links)
        return got

    def outside(self, path: str) -> str | None:
        """Where ``path`` resolves to when that is outside the root, else None."""
        head, tail = os.path.split(os.path.join(self.root, path))
        d, links = self._folder(head)
        real = os.path.join(d, tail)
        if tail in ("", ".", "..") or tail in links:
            real = os.path.realpath(real)
        return None if real == self.real_root or real.startswith(self.prefix) else real


def _check_confined(table: pa.Table, contract: Contract, where: str,
                    image_root: str | Path) -> None:
    conf = _Confiner(image_root)
    for name in contract.path_columns:
        for i, v in enumerate(table.column(name).to_pylist()):
            for p in (v if isinstance(v, list) else [v]):
                real = conf.outside(p) if p else None
                if real is not None:
                    raise ContractError(
                        where, f"image path {p!r} resolves to {real!r}, outside the image "
                        f"root {conf.real_root!r}", column=name, row=i,
                        fix="fix the path (relative to the image root, no '..' out of it, "
                        "no link out of it), move the image under the root, or allow it "
                        "explicitly: allow_images_outside_root: true in the stage's section "
                        "(run.images.allow_outside_root for every stage).")


def _check_nulls(table: pa.Table, contract: Contract, where: str) -> None:
    for f in contract.schema:
        if not f.nullable or f.name in contract.non_empty:
            col = table.column(f.name)
            if col.null_count:
                raise ContractError(where, "null value in a required column", column=f.name,
                                    row=_first_true(col.is_null()), fix="give every row a value.")


def _first_true(mask: pa.ChunkedArray) -> int:
    for i, v in enumerate(mask.to_pylist()):
        if v:
            return i
    return -1
