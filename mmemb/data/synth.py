"""The synthetic multimodal world of the embedded default.

Scenes of coloured shapes are rendered with PIL and described in text. Two task families
exist on purpose, because the method is about telling them apart:

* ``easy``: the query already names what the target says (classification of a named
  shape, caption retrieval). Direct embedding matches; a rationale only adds words.
* ``inference``: the target follows from the query by one step that is not written
  down: a sum of counts ("2 circles, 3 squares" -> "five"), a missing colour (negation),
  a spatial relation. A rationale that performs the step puts the answer's words into the
  query, so a correct rationale helps and a wrong one hurts.

Each pair's ``meta`` (JSON) holds the answer, the reasoning steps and wrong answers; only
the synthetic-oracle teacher reads it (:mod:`mmemb.teachers.oracle`).

Run alone (writes ``data/synth``)::

    python -m mmemb.data.synth --out runs/demo/data --size smoke --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                "nine", "ten")
IMG_SIZE = 56  # 4x4 patches of 14 px -> 4 vision tokens after the 2x2 merge

#: name -> (family, category). Registered as the 'synthetic' eval suite.
TASKS: dict[str, tuple[str, str]] = {
    "syn_cls_shape": ("easy", "CLS"),
    "syn_ret_caption": ("easy", "RET"),
    "syn_qa_count": ("inference", "QA"),
    "syn_qa_absent": ("inference", "QA"),
    "syn_gd_spatial": ("inference", "GD"),
}

SIZES = {  # train pairs per task, eval queries per task, candidates per eval query
    "smoke": (24, 12, 6),
    "demo": (160, 40, 8),
}

IMAGE_TOKEN = "<|image_1|>"


@dataclass
class Example:
    task: str
    family: str
    qry_inst: str
    qry_text: str
    target: str
    distractors: list[str]
    steps: str  # the correct reasoning, ending with the answer
    objects: list[tuple[str, str, int]]  # (colour, shape, cell 0..3)


def _obj_phrase(n: int, colour: str, shape: str) -> str:
    return f"{n} {colour} {shape}{'s' if n != 1 else ''}"


def _render(objects: list[tuple[str, str, int]], path: Path) -> None:
    img = Image.new("RGB", (IMG_SIZE, IMG_SIZE), (255, 255, 255))
    d = ImageDraw.Draw(img)
    half = IMG_SIZE // 2
    for colour, shape, cell in objects:
        x0, y0 = (cell % 2) * half + 4, (cell // 2) * half + 4
        x1, y1 = x0 + half - 8, y0 + half - 8
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _make(task: str, rng: random.Random) -> Example:
    """One example of ``task``, drawn from ``rng`` (each task's maker below)."""
    family, _ = TASKS[task]
    make = _MAKERS.get(task)
    if make is None:
        raise ValueError(f"unknown synthetic task {task!r}; known: {sorted(TASKS)}")
    return make(task, family, rng)


def _syn_cls_shape(task: str, family: str, rng: random.Random) -> Example:
    """One shape: the target names its colour and shape (direct suffices)."""
    c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    target = f"{c} {s}"
    pool = [f"{cc} {ss}" for cc in COLOURS for ss in SHAPES if (cc, ss) != (c, s)]
    return Example(task, family, f"{IMAGE_TOKEN} Represent the given image for "
                   "classification.", f"the picture shows one {c} {s}", target,
                   rng.sample(pool, 7), f"the picture shows a {c} {s}, so: {target}",
                   [(c, s, rng.randrange(4))])


def _syn_ret_caption(task: str, family: str, rng: random.Random) -> Example:
    """Two shapes, the target caption lists them in the other order."""
    cells = rng.sample(range(4), 2)
    objs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES), cell) for cell in cells]
    caption = " and ".join(f"a {c} {s}" for c, s, _ in objs)
    target = " and ".join(f"a {c} {s}" for c, s, _ in reversed(objs))
    pool = set()
    while len(pool) < 7:
        o = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(2)]
        cand = " and ".join(f"a {c} {s}" for c, s in o)
        if cand != target and cand != caption:
            pool.add(cand)
    return Example(task, family, f"{IMAGE_TOKEN} Find a caption for the image.",
                   f"it contains {caption}", target, sorted(pool),
                   f"the image contains {caption}, so: {target}", objs)


def _syn_qa_count(task: str, family: str, rng: random.Random) -> Example:
    """Two groups of shapes: the target is their total (needs the sum)."""
    c1, c2 = rng.sample(list(COLOURS), 2)
    s1, s2 = rng.sample(SHAPES, 2)
    n1, n2 = rng.randint(1, 4), rng.randint(1, 4)
    total = n1 + n2
    objs = [(c1, s1, i) for i in range(min(n1, 2))] + [(c2, s2, 2 + i)
                                                        for i in range(min(n2, 2))]
    target = f"{NUMBER_WORDS[total]} shapes"
    wrong = [f"{NUMBER_WORDS[k]} shapes" for k in range(2, 9) if k != total]
    steps = (f"{n1} plus {n2} is {total}, so there are {NUMBER_WORDS[total]} shapes in "
             f"total: {target}")
    return Example(task, family, f"{IMAGE_TOKEN} Answer the question about the image.",
                   f"there are {_obj_phrase(n1, c1, s1)} and {_obj_phrase(n2, c2, s2)}. "
                   "how many shapes are there in total?", target, rng.sample(wrong, 6),
                   steps, objs)


def _syn_qa_absent(task: str, family: str, rng: random.Random) -> Example:
    """Three of four colours shown: the target is the missing one (needs elimination)."""
    absent = rng.choice(list(COLOURS))
    present = [c for c in COLOURS if c != absent]
    rng.shuffle(present)
    objs = [(c, rng.choice(SHAPES), i) for i, c in enumerate(present)]
    target = f"the {absent} colour"
    wrong = [f"the {c} colour" for c in present]
    steps = (f"the scene has {', '.join(present)}; of the four colours the missing one "
             f"is {absent}: {target}")
    return Example(task, family, f"{IMAGE_TOKEN} Answer the question about the image.",
                   f"the shapes are {', '.join(f'{c} {s}' for c, s, _ in objs)}. which of "
                   "red, green, blue and yellow is absent?", target, wrong, steps, objs)


def _syn_gd_spatial(task: str, family: str, rng: random.Random) -> Example:
    """Two shapes side by side: the target is the one opposite the named one."""
    (ca, sa), (cb, sb) = [(rng.choice(list(COLOURS)), s) for s in rng.sample(SHAPES, 2)]
    left_first = rng.random() < 0.5
    a_cell, b_cell = (0, 1) if left_first else (1, 0)
    objs = [(ca, sa, a_cell), (cb, sb, b_cell)]
    side = "right" if left_first else "left"
    other = "left" if left_first else "right"
    target = f"the {cb} {sb} on the {side}"
    hard = [f"the {ca} {sa} on the {side}", f"the {cb} {sb} on the {other}"]
    rest = sorted({f"the {c} {s} on the {sd}" for c in COLOURS for s in SHAPES
                   for sd in ("left", "right")} - set(hard) - {target})
    wrong = list(dict.fromkeys(hard)) + rng.sample(rest, 5)
    steps = (f"the {ca} {sa} is on the {other}, the other shape is on the {side}, so: "
             f"{target}")
    return Example(task, family, f"{IMAGE_TOKEN} Select the region the text refers to.",
                   f"the {ca} {sa} is on the {other}. what is on the opposite side?",
                   target, wrong[:7], steps, objs)


#: task -> its example maker (the task's family and rng are passed in).
_MAKERS = {"syn_cls_shape": _syn_cls_shape, "syn_ret_caption": _syn_ret_caption,
           "syn_qa_count": _syn_qa_count, "syn_qa_absent": _syn_qa_absent,
           "syn_gd_spatial": _syn_gd_spatial}


def _meta(ex: Example) -> str:
    return json.dumps({"family": ex.family, "answer": ex.target, "steps": ex.steps,
                       "wrong_answers": ex.distractors, "objects": ex.objects}, sort_keys=True)


def generate(out: str | Path, size: str = "smoke", seed: int = 0,
             tasks: list[str] | None = None) -> dict[str, Path]:
    """Write images, the training pairs and the eval rows under ``out``.

    Returns the artifact folders: ``{"pairs": ..., "eval": ..., "image_root": ...}``.
    Deterministic in ``seed``: same seed, byte-identical images and tables.
    """
    from data_contracts import io
    from data_contracts.schemas import EVAL_ROWS, PAIRS

    if size not in SIZES:
        raise ValueError(f"size={size!r}: choose one of {sorted(SIZES)}")
    n_train, n_eval, n_cand = SIZES[size]
    out = Path(out)
    tasks = tasks or list(TASKS)
    pairs, evals = [], []
    for t_idx, task in enumerate(tasks):
        rng = random.Random(f"{seed}:{task}")
        for i in range(n_train):
            ex = _make(task, rng)
            img = f"images/train/{task}/{i:05d}.png"
            _render(ex.objects, out / img)
            neg = ex.distractors[:1]
            pairs.append({
                "pair_id": f"{task}-{i:05d}", "dataset": task, "family": ex.family,
                "qry_inst": ex.qry_inst, "qry_text": ex.qry_text, "qry_img_path": img,
                "pos_inst": "", "pos_text": ex.target, "pos_img_path": "",
                "neg_text": neg, "neg_img_path": [""] * len(neg), "meta": _meta(ex)})
        rng = random.Random(f"{seed}:{task}:eval")
        for i in range(n_eval):
            ex = _make(task, rng)
            img = f"images/eval/{task}/{i:05d}.png"
            _render(ex.objects, out / img)
            cands = [ex.target] + ex.distractors[: n_cand - 1]
            evals.append({
                "row_id": f"{i:05d}", "task": task, "suite": "synthetic",
                "category": TASKS[task][1], "modality": "image", "metric": "hit@1",
                "qry_inst": ex.qry_inst, "qry_text": ex.qry_text, "qry_img_path": img,
                "tgt_inst": "", "tgt_id": [f"c{j}" for j in range(len(cands))],
                "tgt_text": cands, "tgt_img_path": [""] * len(cands),
                "tgt_rel": [1.0] + [0.0] * (len(cands) - 1), "family": ex.family})
        del t_idx
    refs = {"pairs": io.write(pairs, out / "pairs", PAIRS),
            "eval": io.write(evals, out / "eval", EVAL_ROWS)}
    return {"pairs": Path(refs["pairs"].uri), "eval": Path(refs["eval"].uri), "image_root": out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="smoke", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    paths = generate(a.out, a.size, a.seed)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
