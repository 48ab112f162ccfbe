"""Growth of stage 2 (pools, scoring), stage 3 (selection) and the evaluation's ranking with
the data size: the fitted exponent of time ~ size^e per part (log-log least squares).

Encoder: the tiny real-architecture Qwen2-VL of :mod:`mmemb.model.tiny` (2 layers, hidden
64, random weights; its vision tower runs on every image), on CPU. Its forward is cheap,
so the machinery around it (pools, prompts, images, Arrow) is a large share of the wall
time: the regime where a super-linear part shows most.

Data: synthetic pairs in 4 datasets, every pair with its own query image (56 x 56 PNG),
its own positive and one hard negative, and K = 3 rationales of which the third repeats
the first (33% duplicate (query, rationale) inputs; the oracle data has 36.5%).

Parts and sizes (each spanning 16x):

* ``pools``: :func:`mmemb.stages.score.build_pools` over 4k..64k pairs (pool size 8);
* ``score``: the whole stage 2 (``score.run``: pools, model load, embedding every distinct
  input once, scoring, writing) over 64..1024 pairs;
* ``select``: the whole stage 3 (``select.run``, plots off: their fixed cost is not the
  machinery) over 2k..32k pairs with synthetic scores;
* ``rank``: top-10 of 256 queries over a corpus of 6.25k..100k (H = 512), the queries held
  fixed (the per-query cost is what must stay linear in the corpus);
  :func:`mmemb.eval.ranking.topk` when present, else a full-matrix argsort placeholder
  (labelled as such in the output).

``score/plain`` is stage 2's time at the largest size over one plain pass of the default
Embedder (``Embedder.from_pretrained`` + ``encode(..., mode="auto")``, its length-sorted
batches of the same size) over the stage's distinct inputs; measured alternately, best of
``--repeats``. Times are the process's CPU seconds (see :class:`Clock`: the machine this
was written on is shared), wall seconds printed beside them.

    python bench/bench_scale.py [--repeats 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data_contracts import io  # noqa: E402
from data_contracts.schemas import PAIRS, RATIONALES, SCORES  # noqa: E402

K = 3
DATASETS = 4


def exponent(sizes: list[float], seconds: list[float]) -> float:
    """The least-squares slope of log(seconds) on log(size)."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(seconds, float))
    return float(np.polyfit(x, y, 1)[0])


def geometric(lo: int, factor: int = 16, n: int = 4) -> list[int]:
    return [round(lo * factor ** (i / (n - 1))) for i in range(n)]


def make_pairs(n: int, root: Path | None) -> list[dict]:
    """``n`` pairs; with ``root``, each query gets its own small image written there."""
    rows = []
    for i in range(n):
        ds = f"bench_{i % DATASETS}"
        img = ""
        if root is not None:
            img = f"images/{i:06d}.png"
            _image(i, root / img)
        rows.append({"pair_id": f"{ds}-{i:06d}", "dataset": ds, "family": None,
                     "qry_inst": "<|image_1|> Represent the image for the question." if img
                     else "Represent the question.",
                     "qry_text": f"how many shapes of colour {i % 7} are there in scene {i}?",
                     "qry_img_path": img, "pos_inst": "",
                     "pos_text": f"scene {i} holds {i % 5} shapes", "pos_img_path": "",
                     "neg_text": [f"scene {i} holds {(i + 2) % 5} shapes"], "neg_img_path": [""],
                     "meta": None})
    return rows


def _image(i: int, path: Path) -> None:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (56, 56), "white")
    d = ImageDraw.Draw(img)
    d.ellipse((i % 11, i % 7, 28 + i % 13, 28 + i % 17), fill=(37 * (i % 7), 90, 160))
    img.save(path)


def make_rationales(pairs: list[dict]) -> list[dict]:
    """K candidates per pair; candidate 2 repeats candidate 0 (a teacher's duplicate)."""
    rows = []
    for p in pairs:
        texts = [f"count the shapes of colour {p['pair_id'][-2:]}; then answer {j}"
                 for j in range(K - 1)]
        texts.append(texts[0])
        for j, t in enumerate(texts):
            rows.append({"pair_id": p["pair_id"], "side": "query", "teacher_id": "bench",
                         "cand_idx": j, "text": t, "raw_text": None, "n_tokens": len(t.split()),
                         "prompt_tokens": None, "finish_reason": "stop", "status": "ok",
                         "error": None, "backend": "oracle", "model": None, "sampling": None,
                         "prompt_version": None, "seed": 0, "oracle_label": None})
    return rows


def make_scores(rationales: list[dict], rng: random.Random) -> list[dict]:
    """Synthetic stage-2 rows (stage 3's input at sizes stage 2 would take long to reach)."""
    out = []
    for r in rationales:
        cw, co = rng.uniform(-1, 1), rng.uniform(-1, 1)
        out.append({"pair_id": r["pair_id"], "teacher_id": r["teacher_id"],
                    "cand_idx": r["cand_idx"], "pool_size": 8, "cos_with": cw,
                    "cos_without": co, "s_with": cw - 2, "s_without": co - 2, "delta": cw - co,
                    "rank_with": 1, "rank_without": 2, "status": "ok", "error": None})
    return out


class Clock:
    """CPU seconds of this process (all its threads) and wall seconds of one call.

    The exponents and the ratio use CPU time: on a machine shared with other jobs the wall
    time of a single-threaded run swings with their load (measured here: load average 11 on
    2 cores, wall 4x CPU), while its CPU time is what the run costs; without contention the
    two agree (torch runs 1 thread here). Both are printed."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def __enter__(self) -> Clock:
        gc.collect()  # start each measurement from the same heap state
        self._c, self._w = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu, self.wall = time.process_time() - self._c, time.perf_counter() - self._w


def interleaved(part: str, what: str, calls: dict[int, object], repeats: int,
                note=None) -> list[float]:
    """CPU seconds per size: ``repeats`` rounds, each timing every size once (so a burst of
    load from other jobs hits all sizes alike), the least CPU time per size kept."""
    runs: dict[int, list[Clock]] = {n: [] for n in calls}
    for _ in range(repeats):
        for n, fn in calls.items():
            with Clock() as c:
                fn()
            runs[n].append(c)
    secs = []
    for n, cs in runs.items():
        c = min(cs, key=lambda c: c.cpu)
        secs.append(c.cpu)
        _line(part, n, what, c, note(n) if note else "")
    return secs


def _line(part: str, n: int, what: str, c: Clock, extra: str = "") -> None:
    print(f"  {part:<7} {n:>7} {what}: {c.cpu:8.3f} s CPU ({c.wall:8.3f} s wall){extra}",
          flush=True)


def bench_pools(repeats: int) -> tuple[list[int], list[float]]:
    from mmemb.stages.score import build_pools

    sizes = geometric(4000)
    pairs = {n: make_pairs(n, None) for n in sizes}
    calls = {n: (lambda p=pairs[n]: build_pools(p, 8, 0)) for n in sizes}
    return sizes, interleaved("pools", "pairs", calls, repeats)


def write_inputs(n: int, root: Path) -> tuple[str, str, Path]:
    """Pairs (with images) and rationales artifacts of ``n`` pairs under ``root``."""
    pairs = make_pairs(n, root)
    p = io.write(pairs, root / "pairs", PAIRS).uri
    r = io.write(make_rationales(pairs), root / "rationales", RATIONALES).uri
    return p, r, root


def score_config(model: Path, pairs: str, rats: str, root: Path, out: Path):
    from mmemb.configs.score import ScoreConfig

    return ScoreConfig(pairs=pairs, rationales=rats, model=str(model), image_root=str(root),
                       out=str(out), progress=False, torch_threads=1, resume=False,
                       device="cpu")


def run_score(cfg) -> dict:
    from mmemb.stages import score

    shutil.rmtree(cfg.out, ignore_errors=True)
    return score.run(cfg).metrics


def plain_pass(cfg) -> int:
    """The baseline: load the default Embedder, one batched pass over the distinct inputs."""
    from mmemb.model.embedder import Embedder
    from mmemb.stages import score

    data = score.load_score_inputs(cfg)
    plan = score.plan_inputs(data, cfg.shard_size)
    inputs = [score.embed_input(k, cfg.image_root) for _, items in plan.shards
              for _, k in items]
    emb = Embedder.from_pretrained(cfg.model, dtype="float32", device="cpu",
                                   max_pixels=cfg.max_pixels)
    emb.encode(inputs, batch_size=cfg.batch_size, mode="auto", show_progress=False)
    return len(inputs)


def bench_score(model: Path, work: Path, repeats: int, base: int
                ) -> tuple[list[int], list[float], float]:
    sizes = geometric(base)
    cfgs, metrics = {}, {}
    for n in sizes:
        p, r, root = write_inputs(n, work / f"score-{n}")
        cfgs[n] = score_config(model, p, r, root, work / f"score-{n}" / "out")
    calls = {n: (lambda n=n: metrics.__setitem__(n, run_score(cfgs[n]))) for n in sizes}

    def note(n: int) -> str:
        m = metrics[n]
        return (f"; {int(m['inputs_embedded'])} distinct inputs of {int(m['inputs_needed'])} "
                f"({m['duplicate_share']:.0%} duplicates)")

    secs = interleaved("score", "pairs", calls, repeats, note)
    cfg = cfgs[sizes[-1]]
    stage, plain = [], []
    for _ in range(repeats):  # alternate, so a load change on the machine hits both
        with Clock() as c:
            plain_pass(cfg)
        plain.append(c)
        with Clock() as c:
            run_score(cfg)
        stage.append(c)
    s, p = min(stage, key=lambda c: c.cpu), min(plain, key=lambda c: c.cpu)
    print(f"  score/plain at {sizes[-1]} pairs: stage 2 {s.cpu:.3f} s CPU ({s.wall:.3f} s "
          f"wall), plain pass {p.cpu:.3f} s CPU ({p.wall:.3f} s wall): {s.cpu / p.cpu:.2f} "
          f"CPU, {s.wall / p.wall:.2f} wall", flush=True)
    return sizes, secs, s.cpu / p.cpu


def bench_select(work: Path, repeats: int) -> tuple[list[int], list[float]]:
    from mmemb.configs.select import SelectConfig
    from mmemb.stages import select

    sizes = geometric(2000)
    calls = {}
    for n in sizes:
        d = work / f"select-{n}"
        pairs = make_pairs(n, None)
        rats = make_rationales(pairs)
        p = io.write(pairs, d / "pairs", PAIRS).uri
        r = io.write(rats, d / "rationales", RATIONALES).uri
        s = io.write(make_scores(rats, random.Random(n)), d / "scores", SCORES).uri
        cfg = SelectConfig(pairs=p, rationales=r, scores=s, out=str(d / "out"), plots=False)
        calls[n] = lambda cfg=cfg: select.run(cfg)
    return sizes, interleaved("select", "pairs", calls, repeats)


def _topk():
    """The evaluation's ranking; a full-matrix placeholder until it is merged."""
    try:
        from mmemb.eval.ranking import topk

        return topk, "mmemb.eval.ranking.topk"
    except ImportError:
        def full_matrix(queries, cands, k, chunk=None):  # noqa: ARG001
            scores = queries @ cands.T  # [Q, C]
            idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [Q, k]
            return np.take_along_axis(scores, idx, axis=1), idx

        return full_matrix, "PLACEHOLDER full-matrix argsort (mmemb.eval.ranking absent)"


def bench_rank(repeats: int) -> tuple[list[int], list[float], str]:
    topk, name = _topk()
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((256, 512), dtype=np.float32)  # [Q, H]
    sizes = geometric(6250)
    corpus = rng.standard_normal((sizes[-1], 512), dtype=np.float32)  # [C, H]
    calls = {n: (lambda c=corpus[:n]: topk(queries, c, 10)) for n in sizes}  # row views
    return sizes, interleaved("rank", "candidates x 256 queries", calls, repeats), name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the sizes; the best "
                    "of N per point (pools: at least 5, it is cheap)")
    ap.add_argument("--score-base", type=int, default=64, help="stage 2's smallest size "
                    "(pairs); the largest is 16x")
    ap.add_argument("--out", default=None, help="work folder (default: a temp dir, removed)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        from mmemb.model.tiny import build_tiny

        model = build_tiny(work / "tiny", arch="qwen2_vl", seed=0)
        print("encoder: the tiny real-architecture Qwen2-VL (mmemb.model.tiny: 2 layers, "
              "hidden 64, vision tower on), CPU, 1 torch thread", flush=True)
        parts = {}
        parts["pools"] = bench_pools(max(5, a.repeats))
        s_sizes, s_secs, ratio = bench_score(model, work, a.repeats, a.score_base)
        parts["score"] = (s_sizes, s_secs)
        parts["select"] = bench_select(work, a.repeats)
        r_sizes, r_secs, rank_name = bench_rank(a.repeats)
        parts["rank"] = (r_sizes, r_secs)
        print(f"rank: {rank_name}")
        exps = {k: exponent(*v) for k, v in parts.items()}
        for k, (sizes, secs) in parts.items():
            print(f"{k:>6}: sizes {sizes}, CPU seconds {[round(s, 3) for s in secs]}, "
                  f"exponent {exps[k]:.2f}")
        print("scale exponents: " + " ".join(f"{k}={exps[k]:.2f}" for k in
                                             ("pools", "score", "select", "rank")))
        print(f"score/plain={ratio:.2f}")
    finally:
        if not a.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
