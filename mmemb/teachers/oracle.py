"""The synthetic-oracle teacher: a SIMULATION of a strong teacher, for the synthetic world only.

Why it exists: the demo's vLLM teacher is the tiny random-weight model, whose rationales
are noise. To check that stages 2-3 do what the method claims (keep rationales that help
the pair, drop ones that hurt or add nothing) the demo needs rationales of known quality.
The oracle reads each pair's ``meta`` JSON (written by :mod:`mmemb.data.synth`) and writes

* ``correct``: ``meta.steps``, the reasoning that leads to the answer;
* ``wrong``: the same steps with the answer replaced by one of ``meta.wrong_answers``
  (the words that differ are replaced throughout, so the steps argue for the wrong answer);
* ``irrelevant``: a generic sentence that says nothing about the instance.

in configurable shares, deterministically from the seed, and sets ``oracle_label`` on every
row so stage 3 can report how often each kind was selected. It never looks at anything a
real teacher could not be given except ``meta``, and it refuses data without ``meta``
(rows with status ``error``): it cannot be used on real data by accident.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from mmemb.teachers.base import Candidate, GenRequest, TeacherInfo, finalize

LABELS = ("correct", "wrong", "irrelevant")

#: Sentences with none of the synthetic world's content words.
GENERIC = (
    "let me think about this carefully before answering",
    "this kind of question is common and usually has a simple answer",
    "a careful look at the whole input helps to answer such requests",
    "I will consider what is being asked and respond accordingly",
    "questions like this one appear often in everyday tasks",
    "the request is clear enough and I will keep my reasoning short",
)


def label_counts(k: int, shares: dict[str, float]) -> dict[str, int]:
    """Exact counts per label for K candidates (largest remainder, ties in LABELS order)."""
    total = sum(shares.get(lb, 0.0) for lb in LABELS)
    raw = {lb: k * shares.get(lb, 0.0) / total for lb in LABELS}
    counts = {lb: int(raw[lb]) for lb in LABELS}
    left = k - sum(counts.values())
    for lb in sorted(LABELS, key=lambda x: (-(raw[x] - counts[x]), LABELS.index(x)))[:left]:
        counts[lb] += 1
    return counts


def make_wrong(steps: str, answer: str, wrong: str) -> str:
    """``steps`` arguing for ``wrong``: the answer phrase and the words it differs in swapped.

    Word-level positional mapping when the two answers have equal length ("seven shapes" ->
    "three shapes" also turns a stray "seven" into "three"); all replacements happen at
    once, so a mapping red->blue, blue->red cannot chain.
    """
    marker = "\x00ANSWER\x00"
    text = steps.replace(answer, marker)
    a, w = answer.split(), wrong.split()
    mapping: dict[str, str] = {}
    if len(a) == len(w):
        for x, y in zip(a, w, strict=True):
            if x != y and mapping.get(x, y) == y:
                mapping[x] = y
    if mapping:
        pat = re.compile(r"\b(" + "|".join(re.escape(x) for x in mapping) + r")\b")
        text = pat.sub(lambda m: mapping[m.group(1)], text)
    return text.replace(marker, wrong)


class OracleTeacher:
    """Candidates of known quality from the synthetic world's metadata (a simulation)."""

    def __init__(self, info: TeacherInfo, shares: dict[str, float], seed: int = 0,
                 tokenizer=None):
        unknown = set(shares) - set(LABELS)
        if unknown:
            raise ValueError(f"oracle shares: unknown label(s) {sorted(unknown)}; use {LABELS}")
        self.info, self.shares, self.seed, self.tokenizer = info, shares, seed, tokenizer

    def _n_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text.split())
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _one(self, req: GenRequest) -> list[Candidate]:
        """k rationales for one request, written from the synthetic world's own answer and
        steps in fixed shares of correct, wrong and irrelevant ones, so stages 2-3 have a
        known mix to separate without a real teacher."""
        k = self.info.k
        meta = req.meta or {}
        if not meta.get("answer") or not meta.get("steps"):
            msg = ("oracle teacher needs the pair's meta JSON with 'answer' and 'steps' (the "
                   "synthetic world writes it); this pair has none: use a vllm/hf teacher on "
                   "real data")
            return [Candidate.failed(msg) for _ in range(k)]
        rng = random.Random(req.seed)
        labels = [lb for lb, n in label_counts(k, self.shares).items() for _ in range(n)]
        rng.shuffle(labels)
        answer, steps = meta["answer"], meta["steps"]
        wrongs = [w for w in meta.get("wrong_answers") or [] if w != answer]
        out = []
        for lb in labels:
            if req.side == "target":
                text = (f"a query asking for {answer}" if lb == "correct" else
                        f"a query asking for {rng.choice(wrongs)}" if lb == "wrong" and wrongs
                        else rng.choice(GENERIC))
            elif lb == "correct":
                text = steps
            elif lb == "wrong" and wrongs:
                text = make_wrong(steps, answer, rng.choice(wrongs))
            else:
                text = rng.choice(GENERIC)
            if lb == "wrong" and not wrongs:
                lb = "irrelevant"
            out.append(finalize(text, self._n_tokens(text), "stop", oracle_label=lb))
        return out

    def generate(self, requests: list[GenRequest], template: str = "") -> list[list[Candidate]]:
        del template  # the oracle writes from meta, it is not prompted
        return [self._one(r) for r in requests]

    def close(self) -> None:
        pass


def oracle_selections(pairs: str | Path, out: str | Path) -> Path:
    """A stage-3-like selections artifact without stages 1-3, for tests and benchmarks of
    stage 4/5: inference-family rows keep their correct oracle steps as r* (so the rationale
    LM term trains), easy rows get none (direct mode). Returns the artifact's folder."""
    import json

    from data_contracts import io
    from data_contracts.schemas import PAIRS, SELECTIONS

    rows = []
    for r in io.read(pairs, PAIRS).to_pylist():
        steps = json.loads(r["meta"])["steps"] if r["family"] == "inference" else None
        rows.append({**r, "rationale": steps, "utility": 0.5 if steps else -0.1,
                     "teacher_id": "oracle", "cand_idx": 0 if steps else None,
                     "n_candidates": 4, "n_kept": 4})
    return Path(io.write(rows, out, SELECTIONS).uri)
