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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_contracts import io
from data_contracts.schemas import PAIRS, SELECTIONS
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
