"""Training rows from the stage-3 selections (or plain pairs), and a resumable data order.

The order is a pure function of ``(seed, step)``: epoch ``e`` is a fixed permutation of the
rows (seeded by ``seed`` and ``e``), the epochs are concatenated, and global micro-batch
``m`` is positions ``[m * G, (m + 1) * G)`` of that stream (``G = batch_size x
world_size``; a partial batch at an epoch's end is dropped). Rank ``r`` takes the slice
``[r * B, (r + 1) * B)`` of its global batch. A resumed run therefore sees exactly the
batches an uninterrupted run would, with no sampler state to save beyond the step.

Example::

    >>> s = EpochSampler(n=10, global_batch=4, seed=0)
    >>> s.steps_per_epoch
    2
    >>> len(s.indices(micro=0, rank=1, local_batch=2))
    2
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_contracts import io
from data_contracts.schemas import PAIRS, SELECTIONS
from mmemb.model.images import DEFAULT_MAX_DECODE_PIXELS, TargetFn
from mmemb.model.prompts import EmbedInput


@dataclass
class TrainRow:
    pair_id: str
    dataset: str
    family: str | None
    query: EmbedInput  # rationale unset: the direct query
    rationale: str | None  # r*, None = train in direct mode
    positive: EmbedInput
    negatives: list[EmbedInput] = field(default_factory=list)


def content_key(x: EmbedInput) -> int:
    """A 63-bit id of what an input says (instruction, text, images): equal inputs, equal
    keys, so a duplicate of a positive is never used as its negative."""
    h = hashlib.blake2b(repr((x.instruction, x.text, tuple(map(str, x.images)))).encode(),
                        digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _inp(inst, text, img, image_root) -> EmbedInput:
    return EmbedInput.from_row(inst, text, img, image_root)


def load_rows(path: str | Path, image_root: str | Path | None = None,
              check_paths: bool = True, allow_outside_root: bool = False
              ) -> tuple[list[TrainRow], str]:
    """Rows of a selections or pairs artifact, validated by its contract (image paths
    inside ``image_root`` unless ``allow_outside_root``); (rows, contract)."""
    name = io.contract_of(path)
    contract = SELECTIONS if name == "selections" else PAIRS
    table = io.read(path, contract, check_paths=check_paths, image_root=image_root,
                    allow_outside_root=allow_outside_root)
    rows = []
    for r in table.to_pylist():
        negs = [_inp(r["pos_inst"], t, im, image_root)
                for t, im in zip(r["neg_text"] or [], r["neg_img_path"] or [], strict=True)
                if (t or im)]
        rat = r.get("rationale") if contract is SELECTIONS else None
        rows.append(TrainRow(
            r["pair_id"], r["dataset"], r.get("family"),
            _inp(r["qry_inst"], r["qry_text"], r["qry_img_path"], image_root),
            rat if rat else None,
            _inp(r["pos_inst"], r["pos_text"], r["pos_img_path"], image_root), negs))
    return rows, contract.name


class EpochSampler:
    """Deterministic, resumable order over ``n`` rows in global batches of ``global_batch``."""

    def __init__(self, n: int, global_batch: int, seed: int = 0):
        if n < global_batch:
            raise ValueError(f"dataset has {n} rows, fewer than one global contrastive batch "
                             f"({global_batch} = batch_size x world_size); lower batch_size, "
                             "use fewer ranks, or give more data")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.steps_per_epoch = n // global_batch  # micro-batches per epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    def _epoch(self, e: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != e:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            self._perm = (e, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_indices(self, micro: int) -> list[int]:
        e, k = divmod(micro, self.steps_per_epoch)
        perm = self._epoch(e)
        return perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()

    def indices(self, micro: int, rank: int, local_batch: int) -> list[int]:
        g = self.global_indices(micro)
        return g[rank * local_batch:(rank + 1) * local_batch]


# --------------------------------------------------------------------------- unreadable images
ImageCheck = Callable[[str], "str | None"]


def image_check(max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
                target: TargetFn | None = None) -> ImageCheck:
    """``path -> None`` (decodes) or the reason it cannot be used: the decode the embedder
    does (same limit, same reduced JPEG decode), without the conversions."""
    from mmemb.model.images import ImageInputError, open_image

    def check(path: str) -> str | None:
        try:
            open_image(path, max_decode_pixels=max_decode_pixels, target=target)
        except ImageInputError as e:
            return str(e)
        return None
    return check


def check_images(paths: Iterable[str], check: ImageCheck, threads: int = 2
                 ) -> dict[str, str]:
    """``{path: why}`` for the distinct paths that cannot be used. Several ranks split the
    paths and share what they found (every rank gets the same answer)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmemb.training.distributed import is_dist, rank, world_size

    todo = sorted(set(paths))
    if is_dist() and world_size() > 1:
        todo = todo[rank()::world_size()]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
        found = {p: why for p, why in zip(todo, pool.map(check, todo), strict=True) if why}
    if is_dist() and world_size() > 1:
        import torch.distributed as dist

        parts: list = [None] * world_size()
        dist.all_gather_object(parts, found)
        found = {k: v for part in parts for k, v in part.items()}
    return found


@dataclass
class SkipReport:
    """What a stage left out because an image cannot be read; nothing is dropped silently."""

    where: str  # the artifact the rows come from
    rows: list[dict] = field(default_factory=list)  # one per row or negative left out
    images_checked: int = 0
    seconds: float = 0.0

    @property
    def rows_skipped(self) -> int:
        return sum(1 for r in self.rows if r["dropped"] == "row")

    @property
    def negatives_dropped(self) -> int:
        return sum(1 for r in self.rows if r["dropped"] == "negative")

    def message(self, total: int, what: str = "rows") -> str:
        first = self.rows[0]
        return (f"{self.rows_skipped} of {total} {what} skipped"
                + (f" and {self.negatives_dropped} hard negative(s) dropped"
                   if self.negatives_dropped else "")
                + f": an image cannot be read (each is listed with its reason); e.g. "
                f"{self.where}, column {first['column']!r}, row {first['row']}: "
                f"{first['error']}")

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/rows_skipped_unreadable_image": float(self.rows_skipped),
                f"{prefix}/negatives_dropped_unreadable_image": float(self.negatives_dropped),
                f"{prefix}/images_checked": float(self.images_checked),
                f"{prefix}/image_check_s": self.seconds}

    def write(self, path: str | Path) -> None:
        import json

        Path(path).write_text("".join(json.dumps({"file": self.where, **r}) + "\n"
                                      for r in self.rows))


def drop_unreadable(rows: list[TrainRow], check: ImageCheck, where: str,
                    threads: int = 2) -> tuple[list[TrainRow], SkipReport]:
    """Training rows whose images decode: a row whose query or positive image does not is
    left out, a hard negative whose image does not is dropped from its row; each one is
    in the report with its file, column, row and reason."""
    import time

    t0 = time.perf_counter()
    paths = [p for r in rows for x in (r.query, r.positive, *r.negatives) for p in x.images
             if isinstance(p, str)]
    bad = check_images(paths, check, threads)
    rep = SkipReport(where, images_checked=len(set(paths)))
    kept: list[TrainRow] = []
    for i, r in enumerate(rows):
        why = next(((col, p) for col, x in (("qry_img_path", r.query),
                                            ("pos_img_path", r.positive))
                    for p in x.images if p in bad), None)
        if why is not None:
            rep.rows.append({"row": i, "pair_id": r.pair_id, "column": why[0], "path": why[1],
                             "error": bad[why[1]], "dropped": "row"})
            continue
        negs = []
        for j, n in enumerate(r.negatives):
            p = next((p for p in n.images if p in bad), None)
            if p is None:
                negs.append(n)
            else:
                rep.rows.append({"row": i, "pair_id": r.pair_id, "column": "neg_img_path",
                                 "index": j, "path": p, "error": bad[p],
                                 "dropped": "negative"})
        if len(negs) != len(r.negatives):
            r = TrainRow(r.pair_id, r.dataset, r.family, r.query, r.rationale, r.positive, negs)
        kept.append(r)
    rep.seconds = time.perf_counter() - t0
    return kept, rep


def drop_unreadable_eval(rows: list[dict], image_root: str | Path | None, check: ImageCheck,
                         where: str, threads: int = 2, candidates: bool = True
                         ) -> tuple[list[dict], SkipReport]:
    """Eval rows (contract ``eval_rows``) whose query (and, with ``candidates``, every
    candidate) image decodes; the others are in the report."""
    import time

    t0 = time.perf_counter()

    def full(p: str) -> str:
        return str(Path(image_root) / p) if image_root else p

    def images(r: dict) -> list[tuple[str, str]]:
        out = [("qry_img_path", r["qry_img_path"])] if r.get("qry_img_path") else []
        if not candidates:
            return out
        return out + [("tgt_img_path", p) for p in r.get("tgt_img_path") or [] if p]

    paths = [full(p) for r in rows for _, p in images(r)]
    bad = check_images(paths, check, threads)
    rep = SkipReport(where, images_checked=len(set(paths)))
    kept = []
    for i, r in enumerate(rows):
        why = next(((c, full(p)) for c, p in images(r) if full(p) in bad), None)
        if why is None:
            kept.append(r)
        else:
            rep.rows.append({"row": i, "pair_id": r.get("row_id"), "column": why[0],
                             "path": why[1], "error": bad[why[1]], "dropped": "row"})
    rep.seconds = time.perf_counter() - t0
    return kept, rep


def stage_image_check(model: str | Path, max_pixels: int | None, min_pixels: int | None,
                      max_decode_pixels: int | None) -> ImageCheck:
    """The :func:`image_check` of a stage that embeds with ``model`` at this resolution
    (the grid from the checkpoint's preprocessor config, read without loading it)."""
    from mmemb.model.resolution import Grid, target_size

    grid = Grid.of(model) if Path(model).is_dir() else None
    if grid is None:
        return image_check(max_decode_pixels)
    return image_check(max_decode_pixels,
                       lambda w, h: target_size(w, h, grid, max_pixels, min_pixels))
