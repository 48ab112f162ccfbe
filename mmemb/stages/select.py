"""Stage 3: pair-aware selection, keep per pair the rationale that helps most, if any helps.

Filters first, each counted (a candidate is counted by the first filter it fails):

1. ``status``: the rationale's generation failed or was empty (status error / empty);
2. ``truncated``: generation hit max_tokens (reasoning stops mid-way);
3. ``malformed``: the text contains a reserved token (``<think>``, ``</think>``, ``<emb>``,
   chat or vision markers), which would break the reasoning-mode prompt;
4. ``too_long``: more than ``max_rationale_tokens`` tokens;
5. ``duplicate``: the same text (case/whitespace-insensitive) as an earlier candidate of
   the same pair (the earlier one, by teacher and index, is kept);
6. ``unscored``: no ``ok`` score row (stage 2 failed on it, or a finite delta is missing).

Then ``r* = argmax_k delta_k`` if ``max_k delta_k > margin`` else none ("no reasoning
helps": the pair trains in direct mode). Output (contract ``selections``): one row per pair
with the pair's fields, the rationale (or null), its utility (the chosen delta; the best
delta when none was chosen), teacher and index, and the candidate counts. Beside it,
``summary.json`` (shares selected overall / per task / per teacher / per family, delta
quantiles, filter counts and, on oracle data, the selection rate by oracle label), two
plots and ``decisions.table.json``: a seeded sample of candidates stratified by verdict
(selected, filtered with the filter, below margin, not best) with delta and text, the
preview of what stage 3 decided (:mod:`mmemb.tables`).

Run alone on the embedded default (after stage 2)::

    python -m mmemb.stages.select --config configs/demo.yaml --section select
    python -m mmemb.stages.select --pairs runs/demo/data/pairs \\
        --rationales runs/demo/generate/rationales --scores runs/demo/score/scores \\
        --out runs/demo/select
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

from data_contracts import io
from data_contracts.io import ContractError
from data_contracts.schemas import PAIRS, RATIONALES, SCORES, SELECTIONS
from mmemb.configs.cli import stage_main
from mmemb.configs.select import SelectConfig
from mmemb.stages.base import StageResult, StepLogger, null_logger
from mmemb.tables import write_table
from mmemb.teachers.base import normalize_text, reserved_in

FILTERS = ("status", "truncated", "malformed", "too_long", "duplicate", "unscored")
PAIR_FIELDS = [f.name for f in PAIRS.schema]
#: What select_pair decided for a candidate: chosen; failed a filter; its pair's best but
#: not above the margin; kept but another candidate of its pair has a higher delta.
VERDICTS = ("selected", "filtered", "below_margin", "not_best")
DECISION_COLUMNS = ["pair_id", "task", "teacher_id", "cand_idx", "delta", "verdict", "reason",
                    "text"]


def filter_reason(cand: dict, seen: set[str], cfg: SelectConfig) -> str | None:
    """The first filter ``cand`` (a rationale row joined with its score) fails, or None.

    ``seen`` holds the normalised texts kept so far for this pair; a kept text is added.
    """
    if cand["status"] == "truncated":  # its reasoning stops mid-way (and stage 2 skips it)
        return "truncated"
    if cand["status"] != "ok":
        return "status"
    if reserved_in(cand["text"]) or (cand.get("error") or "").startswith("malformed:"):
        return "malformed"
    if (cand.get("n_tokens") or 0) > cfg.max_rationale_tokens:
        return "too_long"
    norm = normalize_text(cand["text"] or "")
    if norm in seen:
        return "duplicate"
    if cand.get("score_status") != "ok" or cand.get("delta") is None \
            or not math.isfinite(cand["delta"]):
        return "unscored"
    seen.add(norm)
    return None


def select_pair(cands: list[dict], cfg: SelectConfig, counts: Counter
                ) -> tuple[dict | None, float | None, int]:
    """(chosen candidate or None, utility, n_kept) for one pair's candidates.

    Each candidate gets its ``filtered`` reason (or None) and its ``verdict`` (one of
    :data:`VERDICTS`), recorded here where the rule is applied, so the decisions table
    shows exactly what decided and nothing recomputes it.
    """
    seen: set[str] = set()
    kept = []
    for c in sorted(cands, key=lambda c: (c["teacher_id"], c["cand_idx"])):
        why = filter_reason(c, seen, cfg)
        c["filtered"] = why
        c["verdict"] = "filtered" if why else "not_best"
        if why:
            counts[why] += 1
        else:
            kept.append(c)
    if not kept:
        return None, None, 0
    best = max(kept, key=lambda c: c["delta"])  # first of equal maxima (stable order)
    if best["delta"] > cfg.margin:
        best["verdict"] = "selected"
        return best, best["delta"], len(kept)
    best["verdict"] = "below_margin"
    return None, best["delta"], len(kept)


def _join(cfg: SelectConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """Pairs and, per pair, its query-side candidates with their score fields attached."""
    pairs = io.read(cfg.pairs, PAIRS).to_pylist()
    ids = {p["pair_id"] for p in pairs}
    rat = io.read(cfg.rationales, RATIONALES).to_pylist()
    scores = io.read(cfg.scores, SCORES).to_pylist()
    by_key = {}
    for i, r in enumerate(rat):
        if r["side"] != "query":
            continue
        if r["pair_id"] not in ids:
            raise ContractError(cfg.rationales, f"pair_id {r['pair_id']!r} is not in the pairs "
                                f"artifact {cfg.pairs}", column="pair_id", row=i,
                                fix="select with the pairs the rationales were generated from.")
        by_key[(r["pair_id"], r["teacher_id"], r["cand_idx"])] = dict(r)
    for i, s in enumerate(scores):
        k = (s["pair_id"], s["teacher_id"], s["cand_idx"])
        if k not in by_key:
            raise ContractError(cfg.scores, f"score row for candidate {k} has no query-side "
                                f"rationale in {cfg.rationales}", column="cand_idx", row=i,
                                fix="select with the rationales this scores artifact was "
                                "computed from.")
        by_key[k].update(score_status=s["status"], delta=s["delta"], s_with=s["s_with"],
                         s_without=s["s_without"])
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for k, c in by_key.items():
        c.setdefault("score_status", "missing")
        c.setdefault("delta", None)
        by_pair[k[0]].append(c)
    return pairs, by_pair


def _quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p: float) -> float:
        i = p * (len(xs) - 1)
        lo, hi = math.floor(i), math.ceil(i)
        return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)

    return {"min": xs[0], "p05": q(0.05), "p25": q(0.25), "p50": q(0.5), "p75": q(0.75),
            "p95": q(0.95), "max": xs[-1], "mean": sum(xs) / len(xs), "n": len(xs)}


def _rate(cands: list[dict], chosen: dict[str, dict | None]) -> dict:
    """``rate``: of the pairs offered such a candidate, the share that selected one;
    ``candidate_rate``: selected / candidates (lower when candidates repeat)."""
    chosen_keys = {(c["pair_id"], c["teacher_id"], c["cand_idx"]) for c in chosen.values() if c}
    k = sum((c["pair_id"], c["teacher_id"], c["cand_idx"]) in chosen_keys for c in cands)
    offered = {c["pair_id"] for c in cands}
    return {"candidates": len(cands), "pairs_offered": len(offered), "selected": k,
            "rate": k / max(1, len(offered)), "candidate_rate": k / max(1, len(cands))}


def _oracle_rates(pairs: list[dict], by_pair: dict[str, list[dict]],
                  chosen: dict[str, dict | None]) -> tuple[dict, dict]:
    """On oracle data: the selection rate per oracle label, and per family and label."""
    by_label: dict[str, dict] = {}
    by_label_family: dict[str, dict] = {}
    labelled = [c for cs in by_pair.values() for c in cs if c.get("oracle_label")]
    family = {p["pair_id"]: p.get("family") or "none" for p in pairs}
    for lb in sorted({c["oracle_label"] for c in labelled}):
        group = [c for c in labelled if c["oracle_label"] == lb]
        by_label[lb] = _rate(group, chosen)
        for fam in sorted({family[c["pair_id"]] for c in group}):
            by_label_family[f"{fam}/{lb}"] = _rate([c for c in group
                                                   if family[c["pair_id"]] == fam], chosen)
    return by_label, by_label_family


def summarize(pairs: list[dict], by_pair: dict[str, list[dict]], chosen: dict[str, dict | None],
              counts: Counter, cfg: SelectConfig) -> dict:
    """The stage's report: shares, delta distribution, filters, oracle-label rates."""
    n = max(1, len(pairs))
    sel = {pid for pid, c in chosen.items() if c is not None}

    def share(group_of) -> dict[str, float]:
        tot, hit = Counter(), Counter()
        for p in pairs:
            g = group_of(p) or "none"
            tot[g] += 1
            hit[g] += p["pair_id"] in sel
        return {g: hit[g] / tot[g] for g in sorted(tot)}

    teachers = sorted({c["teacher_id"] for cs in by_pair.values() for c in cs})
    per_teacher = {t: sum(1 for c in chosen.values() if c and c["teacher_id"] == t) / n
                   for t in teachers}
    scored = [c for cs in by_pair.values() for c in cs if c.get("score_status") == "ok"]
    kept = [c for cs in by_pair.values() for c in cs if c.get("filtered") is None]
    by_label, by_label_family = _oracle_rates(pairs, by_pair, chosen)
    return {
        "pairs": len(pairs), "selected": len(sel), "selected_share": len(sel) / n,
        "margin": cfg.margin,
        "selected_share_by_task": share(lambda p: p["dataset"]),
        "selected_share_by_family": share(lambda p: p.get("family")),
        "selected_share_by_teacher": per_teacher,
        "selection_rate_by_teacher": {t: _rate([c for cs in by_pair.values() for c in cs
                                                if c["teacher_id"] == t], chosen)
                                      for t in teachers},
        "candidates": sum(len(cs) for cs in by_pair.values()),
        "kept": len(kept),
        "filtered": {f: counts.get(f, 0) for f in FILTERS},
        "delta_all_scored": _quantiles([c["delta"] for c in scored]),
        "delta_kept": _quantiles([c["delta"] for c in kept]),
        "delta_selected": _quantiles([c["delta"] for c in chosen.values() if c]),
        "oracle_selection_rate_by_label": by_label,
        "oracle_selection_rate_by_family_label": by_label_family,
    }


def _plots(out: Path, by_pair: dict[str, list[dict]], summary: dict, margin: float
           ) -> dict[str, Path]:
    """The delta histogram (per oracle label, else per teacher, with the margin) and the
    selected share per task: the two pictures that say whether selection did its job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    groups: dict[str, list[float]] = defaultdict(list)
    for cs in by_pair.values():
        for c in cs:
            if c.get("score_status") == "ok" and c.get("delta") is not None:
                groups[c.get("oracle_label") or c["teacher_id"]].append(c["delta"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, xs in sorted(groups.items()):
        ax.hist(xs, bins=40, alpha=0.5, label=f"{name} (n={len(xs)})")
    ax.axvline(margin, color="k", ls="--", lw=1, label=f"margin {margin:g}")
    ax.set_xlabel("delta = s(q + r) - s(q)")
    ax.set_ylabel("candidates")
    ax.set_title("Counterfactual utility of candidate rationales")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["delta_hist"] = out / "delta_hist.png"
    fig.savefig(files["delta_hist"], dpi=100)
    plt.close(fig)
    share = summary["selected_share_by_task"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(share)), list(share.values()), color="tab:blue")
    ax.set_xticks(range(len(share)), list(share), rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of pairs with a rationale")
    ax.set_title(f"Selected rationales per task (overall {summary['selected_share']:.0%})")
    fig.tight_layout()
    files["selection_by_task"] = out / "selection_by_task.png"
    fig.savefig(files["selection_by_task"], dpi=100)
    plt.close(fig)
    return files


def run(cfg: SelectConfig, log: StepLogger = null_logger) -> StageResult:
    """Select one rationale (or none) per pair; write the selections and the report."""
    t0 = time.perf_counter()
    pairs, by_pair = _join(cfg)
    rows, chosen, counts = select_all(pairs, by_pair, cfg)
    out = Path(cfg.out)
    ref = io.write(rows, out / "selections", SELECTIONS)
    summary = summarize(pairs, by_pair, chosen, counts, cfg)
    files = write_report(out, by_pair, summary, cfg)
    files["decisions"] = write_table(out / "decisions.table.json",
                                     decision_sample(pairs, by_pair, cfg), DECISION_COLUMNS)
    metrics = select_metrics(summary, len(pairs), time.perf_counter() - t0)
    text = summary_line(summary, cfg)
    print(f"[select] {text}", flush=True)
    return StageResult("select", outputs={"selections": ref}, metrics=metrics, files=files,
                       summary=text)


def select_all(pairs: list[dict], by_pair: dict[str, list[dict]], cfg: SelectConfig
               ) -> tuple[list[dict], dict[str, dict | None], Counter]:
    """The selections rows (one per pair), the chosen candidate per pair, filter counts."""
    counts: Counter = Counter()
    chosen: dict[str, dict | None] = {}
    rows = []
    for p in pairs:
        cands = by_pair.get(p["pair_id"], [])
        best, utility, n_kept = select_pair(cands, cfg, counts)
        chosen[p["pair_id"]] = best
        rows.append({**{k: p[k] for k in PAIR_FIELDS},
                     "rationale": best["text"] if best else None, "utility": utility,
                     "teacher_id": best["teacher_id"] if best else None,
                     "cand_idx": best["cand_idx"] if best else None,
                     "n_candidates": len(cands), "n_kept": n_kept})
    return rows, chosen, counts


def _reason(c: dict, best: dict | None, margin: float) -> str:
    """Why ``c`` got its verdict, in words (its pair's best candidate is ``best``)."""
    if c["verdict"] == "filtered":
        err = f" ({c.get('error')})" if c["filtered"] == "status" and c.get("error") else ""
        return c["filtered"] + err
    if c["verdict"] == "selected":
        return f"best delta, above margin {margin:g}"
    if c["verdict"] == "below_margin":
        return f"best delta, not above margin {margin:g}"
    return (f"below the pair's best delta {best['delta']:.4g} "
            f"({best['teacher_id']}/{best['cand_idx']})")


def decision_sample(pairs: list[dict], by_pair: dict[str, list[dict]], cfg: SelectConfig,
                    n: int = 50) -> list[dict]:
    """About ``n`` candidates with the verdict :func:`select_pair` gave them, stratified by
    outcome (selected, each filter, below margin, not best) so a rare outcome still shows,
    drawn with the stage's seed so a rerun writes the same table. Run after select_all."""
    task = {p["pair_id"]: p["dataset"] for p in pairs}
    strata: dict[str, list[dict]] = defaultdict(list)
    best: dict[str, dict] = {}
    for pid in sorted(by_pair):
        for c in sorted(by_pair[pid], key=lambda c: (c["teacher_id"], c["cand_idx"])):
            v = c["verdict"]
            strata[f"filtered:{c['filtered']}" if v == "filtered" else v].append(c)
            if v in ("selected", "below_margin"):
                best[pid] = c
    order = [k for k in ("selected", *(f"filtered:{f}" for f in FILTERS), "below_margin",
                         "not_best") if strata.get(k)]
    rng = random.Random(cfg.seed)
    pools = {k: rng.sample(strata[k], len(strata[k])) for k in order}
    picked: list[dict] = []
    while len(picked) < n and any(pools.values()):
        for k in order:  # round-robin: each outcome gets an equal share while it lasts
            if pools[k] and len(picked) < n:
                picked.append(pools[k].pop())
    picked.sort(key=lambda c: (VERDICTS.index(c["verdict"]), c["filtered"] or "",
                               c["pair_id"], c["teacher_id"], c["cand_idx"]))
    return [{"pair_id": c["pair_id"], "task": task.get(c["pair_id"]),
             "teacher_id": c["teacher_id"], "cand_idx": c["cand_idx"], "delta": c.get("delta"),
             "verdict": c["verdict"], "reason": _reason(c, best.get(c["pair_id"]), cfg.margin),
             "text": c.get("text")} for c in picked]


def write_report(out: Path, by_pair: dict[str, list[dict]], summary: dict, cfg: SelectConfig
                 ) -> dict[str, Path]:
    """``summary.json`` and (``cfg.plots``) the two plots."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": out / "summary.json"}
    files["summary"].write_text(json.dumps(summary, indent=2))
    if cfg.plots:
        files.update(_plots(out, by_pair, summary, cfg.margin))
    return files


def select_metrics(summary: dict, n_pairs: int, seconds: float) -> dict[str, float]:
    """The flat metrics logged for the stage, read from the report."""
    metrics = {"selected_share": summary["selected_share"], "pairs": float(n_pairs),
               "candidates": float(summary["candidates"]), "kept": float(summary["kept"]),
               "seconds": seconds}
    metrics.update({f"filtered_{k}": float(v) for k, v in summary["filtered"].items()})
    metrics.update({f"selected_share_task_{k}": v
                    for k, v in summary["selected_share_by_task"].items()})
    metrics.update({f"selected_share_teacher_{k}": v
                    for k, v in summary["selected_share_by_teacher"].items()})
    metrics.update({f"oracle_rate_{k}": v["rate"]
                    for k, v in summary["oracle_selection_rate_by_label"].items()})
    dq = summary["delta_all_scored"]
    if dq:
        metrics.update(delta_p50=dq["p50"], delta_mean=dq["mean"])
    return metrics


def summary_line(summary: dict, cfg: SelectConfig) -> str:
    text = (f"select: {summary['selected']}/{summary['pairs']} pairs "
            f"({summary['selected_share']:.0%}) get a rationale (margin {cfg.margin:g}); "
            f"filtered {dict(summary['filtered'])}")
    rates = summary["oracle_selection_rate_by_label"]
    if rates:
        text += "; oracle selection rate " + ", ".join(f"{k} {v['rate']:.0%}"
                                                        for k, v in rates.items())
    return text


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.select``: flags generated from its config class."""
    stage_main("select", run, argv)


if __name__ == "__main__":
    main()
