"""Stage 5: GRPO teaches the embedding model to reason only when reasoning helps.

Policy = the stage-4 model; reference = a frozen copy. Per query, G rollouts: the first
assistant token is sampled from the gate (``<think>`` vs ``<emb>``); a thinking rollout
samples a rationale up to ``budget`` tokens. Each rollout is embedded and rewarded by
retrieval against a pool of targets (hit@1 + margin), minus a reasoning-token cost, minus
a format penalty for a rationale that never closes ``</think>``. The update is the clipped
GRPO surrogate with a KL penalty (:mod:`mmemb.losses.grpo`) through DeepSpeed.

Run alone on the embedded default (after stage 4)::

    python -m mmemb.stages.gate --config configs/demo.yaml --section gate
    python -m mmemb.stages.gate --model runs/demo/train/student \\
        --data runs/demo/select/selections --image-root runs/demo/data \\
        --eval runs/demo/data/eval --out runs/demo/gate
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from data_contracts import io
from data_contracts.schemas import EVAL_ROWS, PAIRS, SELECTIONS
from mmemb.configs.cli import stage_main
from mmemb.configs.gate import GateConfig
from mmemb.inference import AdaptiveEncoder, Rollout
from mmemb.losses.grpo import GRPOLossOutput, group_advantages, grpo_loss
from mmemb.losses.lm import rationale_lm_loss
from mmemb.losses.objective import ObjectiveOutput, Stage4Objective
from mmemb.model.embedder import Embedder
from mmemb.model.gate_settings import GateSettings
from mmemb.model.prompts import EmbedInput
from mmemb.pools import PoolIndex
from mmemb.procs import reaping
from mmemb.stages.base import StageResult, StepLogger, null_logger
from mmemb.training.data import (
    SkipReport,
    check_images,
    content_key,
    drop_unreadable_eval,
    stage_image_check,
)


@dataclass
class Query:
    pair_id: str
    dataset: str
    family: str | None
    inp: EmbedInput
    positive: str
    negatives: list[str]
    rationale: str | None = None  # r* of stage 3 (selections only): the anchor's target


def load_queries(cfg: GateConfig) -> list[Query]:
    """Queries with positives from selections (stage 3) or plain pairs."""
    contract = SELECTIONS if io.contract_of(cfg.data) == "selections" else PAIRS
    table = io.read(cfg.data, contract, image_root=cfg.image_root,
                    allow_outside_root=cfg.allow_images_outside_root)
    out = []
    for r in table.to_pylist():
        out.append(Query(r["pair_id"], r["dataset"], r["family"],
                         EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"],
                                             cfg.image_root),
                         r["pos_text"] or "", list(r["neg_text"] or []),
                         r.get("rationale") or None))
    return out


def _report_skipped(rep: SkipReport, kept: int, path: Path, what: str) -> None:
    """Log and list (``path``) what was left out because an image cannot be read."""
    path.unlink(missing_ok=True)
    if rep.rows:
        rep.write(path)
        print(f"[gate] {rep.message(kept + rep.rows_skipped, what)} ({path})", flush=True)


def _skip_unreadable_queries(queries: list[Query], check, cfg: GateConfig, out: Path
                             ) -> tuple[list[Query], SkipReport]:
    """The queries whose images decode; the others are listed and counted, not trained on."""
    bad = check_images([p for q in queries for p in q.inp.images if isinstance(p, str)], check)
    rep = SkipReport(str(cfg.data), images_checked=len({p for q in queries
                                                        for p in q.inp.images}))
    kept = []
    for i, q in enumerate(queries):
        p = next((p for p in q.inp.images if p in bad), None)
        if p is None:
            kept.append(q)
        else:
            rep.rows.append({"row": i, "pair_id": q.pair_id, "column": "qry_img_path",
                             "path": p, "error": bad[p], "dropped": "row"})
    _report_skipped(rep, len(kept), out / "skipped_rows.jsonl", "queries")
    return kept, rep


_POOL_INDEX: list = [None, 0, {}]  # (query list, its length, task -> PoolIndex)


def _pools(queries: list[Query], idx: list[int], size: int, rng: random.Random
           ) -> list[list[str]]:
    """Per query: [positive, hard negatives..., other positives of the same task...]; the
    others drawn from each task's distinct positives in O(pool size) per query (the index
    is built once per query list, not every step)."""
    if _POOL_INDEX[0] is not queries or _POOL_INDEX[1] != len(queries):
        by_task: dict[str, set[str]] = defaultdict(set)
        for q in queries:
            by_task[q.dataset].add(q.positive)
        _POOL_INDEX[:] = [queries, len(queries),
                          {t: PoolIndex(sorted(ps)) for t, ps in by_task.items()}]
    index = _POOL_INDEX[2]
    pools = []
    for i in idx:
        q = queries[i]
        negs = [n for n in q.negatives if n and n != q.positive][: size - 1]
        others = index[q.dataset].sample(rng, size - 1 - len(negs), [q.positive, *negs])
        pools.append([q.positive] + negs + others)
    return pools


def rollout_logps(emb: Embedder, enc: AdaptiveEncoder, inputs: list[EmbedInput],
                  think: list[bool], rolls: list[Rollout | None]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each rollout's actions: the gate token, then its rationale tokens.

    Returns ``(logp [N, 1 + T], mask [N, 1 + T])``. Sequences are the left-padded prompt
    followed by ``<think> ids...`` (right-padded), so all prompts end at the same column L
    and the gate is read at L - 1. Only the two gate rows of the LM head are applied at the
    gate, and the full head only at rationale positions.
    """
    batch = enc.prefix_batch(inputs, padding_side="left")
    ids, attn = batch["input_ids"], batch["attention_mask"]  # [N, L]
    n, L = ids.shape
    rationale_ids = [r.ids if (t and r is not None) else []
                     for t, r in zip(think, rolls, strict=True)]
    T = max([len(g) for g in rationale_ids] + [0])
    pad = emb.tokenizer.pad_token_id
    actions = torch.full((n, 1 + T), pad, dtype=ids.dtype)  # [N, 1 + T]
    action_mask = torch.zeros((n, 1 + T), dtype=attn.dtype)
    for i, g in enumerate(rationale_ids):
        if think[i]:
            actions[i, 0] = emb.think_id
            actions[i, 1:1 + len(g)] = torch.tensor(g, dtype=ids.dtype)
            action_mask[i, : 1 + len(g)] = 1
    batch = dict(batch)
    for k, v in batch.items():  # per-token side inputs (e.g. mm_token_type_ids): text = 0
        if k not in ("input_ids", "attention_mask") and torch.is_tensor(v) \
                and v.shape[:2] == ids.shape:
            batch[k] = torch.cat([v, torch.zeros((n, 1 + T), dtype=v.dtype,
                                                 device=v.device)], dim=1)
    batch["input_ids"] = torch.cat([ids, actions.to(ids.device)], dim=1)  # [N, L + 1 + T]
    batch["attention_mask"] = torch.cat([attn, action_mask.to(attn.device)], dim=1)
    hidden = emb.hidden_states(batch)  # [N, L + 1 + T, H]
    w_gate = emb.model.lm_head.weight[[emb.emb_id, emb.think_id]]  # [2, H]
    gate_lp = torch.log_softmax((hidden[:, L - 1] @ w_gate.T).float(), dim=-1)  # [N, 2]
    act = torch.tensor([1 if t else 0 for t in think], device=hidden.device)
    logp_gate = gate_lp.gather(1, act[:, None])  # [N, 1]
    mask = torch.ones((n, 1 + T), device=hidden.device)
    if T == 0:
        return logp_gate, mask[:, :1]
    h_r = hidden[:, L:L + T]  # [N, T, H]: position L (<think>) predicts the first id
    lp = torch.log_softmax(emb.model.lm_head(h_r).float(), dim=-1)  # [N, T, V]
    tgt = actions[:, 1:].to(hidden.device)  # [N, T]
    logp_r = lp.gather(2, tgt[..., None]).squeeze(-1)  # [N, T]
    mask[:, 1:] = action_mask[:, 1:].to(hidden.device)
    return torch.cat([logp_gate, logp_r * mask[:, 1:]], dim=1), mask


@torch.no_grad()
def rewards_for(emb: Embedder, inputs: list[EmbedInput], rationales: list[str | None],
                n_tokens: list[int], malformed: list[bool], pools: list[list[str]],
                cfg: GateConfig) -> dict[str, torch.Tensor]:
    """Reward parts per rollout, each [N]; ``pools[i][0]`` is rollout i's positive."""
    rc = cfg.reward
    query_vecs = emb.embed([EmbedInput(x.text, x.instruction, x.images, rationale=r)
                            for x, r in zip(inputs, rationales, strict=True)],
                           mode="auto").embeddings  # [N, H]
    targets = sorted({t for p in pools for t in p})
    row_of = {t: i for i, t in enumerate(targets)}
    target_vecs = emb.encode([EmbedInput(text=t) for t in targets], batch_size=64
                             ).embeddings.to(query_vecs.device)  # [T, H]
    hit, margin = [], []
    for i, pool in enumerate(pools):
        cos = query_vecs[i] @ target_vecs[[row_of[t] for t in pool]].T  # [P], 0 = positive
        hit.append(float(cos[1:].numel() == 0 or bool(cos[0] > cos[1:].max())))
        margin.append(float(cos[0] - cos[1:].max()) if cos.numel() > 1 else 0.0)
    hit_t, margin_t = torch.tensor(hit), torch.tensor(margin)
    cost = torch.tensor([n / cfg.budget for n in n_tokens], dtype=torch.float32)
    fmt = torch.tensor([float(m) for m in malformed])
    total = rc.w_hit * hit_t + rc.w_margin * margin_t - rc.lambda_cost * cost \
        - rc.format_penalty * fmt
    return {"reward": total, "hit": hit_t, "margin": margin_t, "cost": cost, "malformed": fmt}


def _deepspeed_engine(model: torch.nn.Module, cfg: GateConfig):
    """DeepSpeed as in stage 4 (same JSON builder): one GRPO batch per optimizer step,
    linear warm-up then a constant LR. Single process here, launcher-driven on a cluster."""
    import deepspeed

    from mmemb.training.deepspeed_config import constant_lr_scheduler, ds_config
    from mmemb.training.distributed import init_deepspeed, is_dist, single_process_env

    single_process_env()
    if not is_dist():  # say what the start-up does (op build, process group) and its time
        init_deepspeed(lambda m: print(f"[gate] {m}", flush=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ds = ds_config(cfg, int(os.environ.get("WORLD_SIZE", "1")), device, micro_batch=1,
                   grad_accum=1)
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                           lr_scheduler=constant_lr_scheduler(cfg.warmup_steps))
    return engine


def anchor_loss(emb: Embedder, qs: list[Query], cfg: GateConfig) -> ObjectiveOutput:
    """The stage-4 objective on this step's queries (with graph): the anchor of the policy's
    embedding space. Rows whose selection kept a rationale r* are embedded with it, as in
    stage 4; the positive and first hard negative are text targets, as in the reward pool.
    """
    has_r = torch.tensor([q.rationale is not None for q in qs])  # [B]
    q_d = emb.embed([q.inp for q in qs], mode="direct").embeddings  # [B, H]
    r_in = [EmbedInput(q.inp.text, q.inp.instruction, q.inp.images, rationale=q.rationale)
            for q in qs if q.rationale is not None]
    out_r = emb.embed(r_in, mode="reason", return_hidden=True) if r_in else None
    t = emb.embed([EmbedInput(text=q.positive) for q in qs]).embeddings  # [B, H]
    negs = [next((n for n in q.negatives if n and n != q.positive), None) for q in qs]
    neg_mask = torch.tensor([[n is not None] for n in negs], device=t.device)  # [B, 1]
    neg_e = emb.embed([EmbedInput(text=n or q.positive) for n, q in zip(negs, qs,
                                                                      strict=True)]
                      ).embeddings[:, None]  # [B, 1, H]
    keys = torch.tensor([content_key(EmbedInput(text=q.positive)) for q in qs])  # [B]
    nkeys = torch.tensor([[content_key(EmbedInput(text=n or q.positive))]
                          for n, q in zip(negs, qs, strict=True)])  # [B, 1]
    obj = Stage4Objective(alpha=cfg.anchor_alpha, lam=cfg.anchor_lam, tau=cfg.anchor_tau)
    out = obj.contrastive(q_d, out_r.embeddings if out_r is not None else None, has_r, t,
                          hard_neg=neg_e, hard_neg_mask=neg_mask, keys=keys.to(t.device),
                          neg_keys=nkeys.to(t.device))
    if out_r is not None and cfg.anchor_lam > 0:
        lm_sum, n_tok = rationale_lm_loss(out_r.hidden, out_r.input_ids, emb.model.lm_head,
                                          emb.think_id, emb.end_think_id)
        out = obj.add_lm(out, lm_sum, n_tok)
    return out


def _vllm_policy(policy: Embedder, cfg: GateConfig, out: Path):
    """The rollout engine, started on the stage-4 weights (saved once in this stage's folder
    when the checkpoint lacks what vLLM's loader reads, e.g. preprocessor_config.json)."""
    from mmemb.vllm_policy import VLLMPolicy

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("rollout_backend='vllm' runs one engine beside one trainer process; "
                         "launch stage 5 with one process per node or use 'hf'")
    src = Path(cfg.model)
    if not (src / "preprocessor_config.json").is_file():
        src = policy.save_pretrained(out / "vllm_init")
    return VLLMPolicy(src, budget=cfg.budget, seed=cfg.seed,
                      engine_kwargs=cfg.vllm_engine_kwargs)


@torch.no_grad()
def gate_report(enc: AdaptiveEncoder, rows: list[dict], image_root: str | None
                ) -> dict[str, float]:
    """Share of inputs the gate sends to reasoning (p > threshold), per family and task, by
    the one evaluator (:func:`mmemb.eval.harness.gate_decisions`)."""
    from mmemb.eval.harness import gate_decisions
    from mmemb.inference import GateProbe

    return gate_decisions(GateProbe(enc), rows, image_root=image_root)


def run(cfg: GateConfig, log: StepLogger = null_logger) -> StageResult:
    """Train the gate with GRPO; save the policy as the final adaptive model.

    Each step (TRL's split): :func:`rollouts` (no grad), :func:`score_rollouts` (rewards and
    group advantages), :func:`policy_update` (GRPO surrogate + the stage-4 anchor). However
    the run ends (an error mid-step included), the vLLM engine is closed, the process group
    torn down and any process the stage started stopped: an engine left behind would hold
    the memory and the group the next stage needs."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)  # query order and reward pools
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_gate_data(cfg, out)
    with reaping(timeout=30):
        pols = load_policies(cfg, out)
        try:
            return train_gate(cfg, log, rng, out, data, pols)
        finally:
            release(pols)


def train_gate(cfg: GateConfig, log: StepLogger, rng: random.Random, out: Path,
               data: GateData, pols: Policies) -> StageResult:
    """Report the gate before, run the GRPO steps, report it after, save the policy."""
    eval_rows, eval_skipped = load_eval_rows(cfg, data.check, out)
    before = gate_report(pols.enc, eval_rows, cfg.image_root)
    start_params = {n: p.detach().clone() for n, p in pols.policy.model.named_parameters()}
    pols.engine = _deepspeed_engine(pols.policy.model, cfg)
    print(f"[gate] GRPO: {len(data.queries)} queries, {cfg.steps} steps x "
          f"{cfg.queries_per_step} queries x G={cfg.group_size} rollouts, budget {cfg.budget} "
          f"tokens, ZeRO-{cfg.zero_stage}", flush=True)
    steps: list[tuple[int, dict[str, float]]] = []
    order: list[int] = []
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        idx, order = next_queries(order, len(data.queries), cfg.queries_per_step, rng)
        batch = rollouts(cfg, pols, data.queries, idx, step)
        parts, adv = score_rollouts(cfg, pols.policy, data.queries, batch, rng)
        upd = policy_update(cfg, pols, batch, adv)
        m = step_metrics(cfg, pols, batch, parts, upd, time.perf_counter() - t0)
        steps.append((step, m))
        log(step, m)
        say_step(cfg, step, m)
    pols.policy.model.eval()
    after = gate_report(pols.enc, eval_rows, cfg.image_root)
    policy_dir, changed = save_policy(cfg, pols, start_params, out)
    metrics = {**quarter_rewards(steps), "params_changed": float(changed),
               "params_total": float(len(start_params)),
               "train_s": time.perf_counter() - t_start,
               **data.skipped.metrics("data"), **eval_skipped.metrics("eval_data"),
               **{f"before/{a}": b for a, b in before.items()},
               **{f"after/{a}": b for a, b in after.items()}}
    return stage_result(metrics, after, data.skipped, steps, policy_dir, out)


def release(pols: Policies) -> None:
    """Close the vLLM rollout engine (once) and tear the process group down, through
    DeepSpeed so its cached groups are reset too."""
    if pols.vllm is not None:
        pols.vllm.close()
        pols.vllm = None
    import deepspeed.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        ds_comm.destroy_process_group()


def say_step(cfg: GateConfig, step: int, m: dict[str, float]) -> None:
    """The console line of the first step, every fifth and the last."""
    if step == 1 or step % 5 == 0 or step == cfg.steps:
        print(f"[gate] step {step}/{cfg.steps} reward {m['reward']:+.3f} "
              f"(hit {m['reward/hit']:.2f}) reason {m['reason_ratio']:.2f} "
              f"kl {m['kl']:.4f} {m['step_s']:.1f}s", flush=True)


# --------------------------------------------------------------------------- setup


@dataclass
class GateData:
    """The training queries whose images decode, and the image check (reused on eval)."""

    queries: list[Query]
    skipped: SkipReport
    check: object


def load_gate_data(cfg: GateConfig, out: Path) -> GateData:
    """Queries whose images decode; at least one step's worth."""
    queries = load_queries(cfg)
    check = stage_image_check(cfg.model, cfg.max_pixels, cfg.min_pixels, cfg.max_decode_pixels)
    queries, skipped = _skip_unreadable_queries(queries, check, cfg, out)
    if len(queries) < cfg.queries_per_step:
        raise ValueError(f"{cfg.data}: {len(queries)} queries, fewer than queries_per_step="
                         f"{cfg.queries_per_step}; lower it or give more data")
    return GateData(queries, skipped, check)


@dataclass
class Policies:
    """The trained policy and the frozen reference (each with its adaptive encoder), the
    optional vLLM rollout engine and the DeepSpeed engine that updates the policy."""

    policy: Embedder
    ref: Embedder
    enc: AdaptiveEncoder
    ref_enc: AdaptiveEncoder
    vllm: object | None  # VLLMPolicy: rationales sampled outside the trainer
    engine: object = None


def load_policies(cfg: GateConfig, out: Path) -> Policies:
    """Policy = the stage-4 model; reference = a frozen copy (the KL anchor)."""
    policy = Embedder.from_pretrained(cfg.model, max_pixels=cfg.max_pixels,
                                      min_pixels=cfg.min_pixels,
                                      max_decode_pixels=cfg.max_decode_pixels)
    ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
    ref = Embedder(ref_model, policy.processor, policy.config, max_pixels=policy.max_pixels,
                   min_pixels=policy.min_pixels, max_decode_pixels=cfg.max_decode_pixels)
    vllm_policy = _vllm_policy(policy, cfg, out) if cfg.rollout_backend == "vllm" else None
    enc = AdaptiveEncoder(policy, budget=cfg.budget, threshold=cfg.threshold, vllm=vllm_policy)
    return Policies(policy, ref, enc, AdaptiveEncoder(ref, budget=cfg.budget), vllm_policy)


def load_eval_rows(cfg: GateConfig, check, out: Path) -> tuple[list[dict], SkipReport]:
    """The eval rows (none without ``cfg.eval``) whose query images decode."""
    rows = io.read(cfg.eval, EVAL_ROWS, image_root=cfg.image_root,
                   allow_outside_root=cfg.allow_images_outside_root
                   ).to_pylist() if cfg.eval else []
    rows, skipped = drop_unreadable_eval(rows, cfg.image_root, check, str(cfg.eval),
                                         candidates=False)
    _report_skipped(skipped, len(rows), out / "skipped_eval_rows.jsonl", "eval rows")
    return rows, skipped


# --------------------------------------------------------------------------- one GRPO step


def next_queries(order: list[int], n: int, k: int, rng: random.Random
                 ) -> tuple[list[int], list[int]]:
    """The step's ``k`` queries and the rest of the order: epochs of shuffled queries."""
    if len(order) < k:
        perm = list(range(n))
        rng.shuffle(perm)
        order = order + perm
    return order[:k], order[k:]


@dataclass
class RolloutBatch:
    """G rollouts per query (rollout ``j`` is of query ``j // G``)."""

    idx: list[int]  # [B] the step's queries (positions in the query list)
    queries: list[Query]  # [B]
    inputs: list[EmbedInput]  # [B * G]
    p_think: torch.Tensor  # [B] the gate's p(<think>) before sampling
    think: list[bool]  # [B * G] the sampled gate
    rolls: list[Rollout | None]  # [B * G] the sampled rationale where the gate thinks

    @property
    def rationales(self) -> list[str | None]:
        return [r.text if r is not None else None for r in self.rolls]

    @property
    def n_tokens(self) -> list[int]:
        return [len(r.ids) if r is not None else 0 for r in self.rolls]

    @property
    def malformed(self) -> list[bool]:  # a rationale that never closed </think>
        return [r is not None and not r.finished for r in self.rolls]


def rollouts(cfg: GateConfig, pols: Policies, all_queries: list[Query], idx: list[int],
             step: int) -> RolloutBatch:
    """Sample the gate for G rollouts per query, then a rationale where it thinks (no
    grad). Seeded per step, so a rerun samples the same rollouts."""
    G = cfg.group_size
    pols.policy.model.eval()
    queries = [all_queries[i] for i in idx]
    qs = [q.inp for q in queries]
    p_think = pols.enc.p_think(qs)  # [B]
    p_rep = p_think.repeat_interleave(G)  # [B * G]
    think = torch.bernoulli(p_rep, generator=torch.Generator().manual_seed(
        cfg.seed * 100003 + step)).bool().tolist()
    inputs = [qs[j // G] for j in range(len(p_rep))]
    think_idx = [j for j, t in enumerate(think) if t]
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed * 7919 + step)
        gen = pols.enc.generate([inputs[j] for j in think_idx], do_sample=True,
                                temperature=cfg.temperature) if think_idx else []
    rolls: list[Rollout | None] = [None] * len(inputs)
    for j, r in zip(think_idx, gen, strict=True):
        rolls[j] = r
    return RolloutBatch(idx, queries, inputs, p_think, think, rolls)


def score_rollouts(cfg: GateConfig, policy: Embedder, all_queries: list[Query],
                   batch: RolloutBatch, rng: random.Random
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reward parts per rollout (each [B * G]) and the group-relative advantages [B * G]."""
    G = cfg.group_size
    pools = [pl for pl in _pools(all_queries, batch.idx, cfg.reward.pool_size, rng)
             for _ in range(G)]
    parts = rewards_for(policy, batch.inputs, batch.rationales, batch.n_tokens,
                        batch.malformed, pools, cfg)
    adv = group_advantages(parts["reward"].view(-1, G),
                           scale=cfg.scale_advantages).flatten()  # [B * G]
    return parts, adv


@dataclass
class Update:
    """The last policy update of a step: its total loss and the parts that went in."""

    total: torch.Tensor
    grpo: GRPOLossOutput
    anchor: ObjectiveOutput | None  # the stage-4 anchor (anchor_weight > 0)
    sync_s: float | None  # seconds to push the weights to vLLM (vLLM rollouts)


def policy_update(cfg: GateConfig, pols: Policies, batch: RolloutBatch, adv: torch.Tensor
                  ) -> Update:
    """``num_iterations`` DeepSpeed steps of the clipped GRPO surrogate (+ the anchor) on
    one batch of rollouts; old and reference log-probs are taken once, before the first."""
    policy, enc, inputs, think, rolls = pols.policy, pols.enc, batch.inputs, batch.think, \
        batch.rolls
    with torch.no_grad():
        logp_old, mask = rollout_logps(policy, enc, inputs, think, rolls)
        logp_ref, _ = rollout_logps(pols.ref, pols.ref_enc, inputs, think, rolls)
    policy.model.train()
    for _ in range(cfg.num_iterations):
        logp, _ = rollout_logps(policy, enc, inputs, think, rolls)
        grpo_out = grpo_loss(logp, logp_old, logp_ref, adv.to(logp.device), mask,
                             beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                             aggregation=cfg.aggregation)
        total, anchor_out, sync_s = grpo_out.loss, None, None
        if cfg.anchor_weight > 0:
            anchor_out = anchor_loss(policy, batch.queries, cfg)
            total = total + cfg.anchor_weight * anchor_out.loss
        pols.engine.backward(total)
        pols.engine.step()
        if pols.vllm is not None:  # the next rollouts must come from the updated policy
            sync_s = pols.vllm.sync(policy.model)
    return Update(total, grpo_out, anchor_out, sync_s)


def step_metrics(cfg: GateConfig, pols: Policies, batch: RolloutBatch,
                 parts: dict[str, torch.Tensor], upd: Update, step_s: float
                 ) -> dict[str, float]:
    """The step's logged numbers: loss parts, reward parts, how often and how long the
    policy reasons (overall and per family)."""
    think, G = batch.think, cfg.group_size
    n_thinking = sum(think)
    m = {"loss": float(upd.total.detach()), "loss/grpo": float(upd.grpo.loss.detach()),
         "kl": float(upd.grpo.kl),
         "clip_fraction": float(upd.grpo.clip_fraction),
         "reward": float(parts["reward"].mean()), "reward/hit": float(parts["hit"].mean()),
         "reward/margin": float(parts["margin"].mean()),
         "reward/cost": float(parts["cost"].mean()),
         "reward/malformed": float(parts["malformed"].mean()),
         "reason_ratio": n_thinking / len(think), "p_think": float(batch.p_think.mean()),
         "reason_len": (sum(batch.n_tokens) / max(1, n_thinking)),
         "lr": float(pols.engine.get_lr()[0]), "step_s": step_s}
    if pols.vllm is not None:
        m["rollout/sync_s"] = upd.sync_s
    if upd.anchor is not None:
        m.update({f"anchor/{k.split('/', 1)[-1]}": v for k, v in upd.anchor.parts().items()
                  if k in ("loss", "loss/nce_reason", "loss/nce_direct", "loss/lm")})
    fam = [batch.queries[j // G].family or "none" for j in range(len(think))]
    for f in sorted(set(fam)):
        ids = [j for j, x in enumerate(fam) if x == f]
        m[f"reason_ratio/{f}"] = sum(think[j] for j in ids) / len(ids)
    return m


# --------------------------------------------------------------------------- save


def save_policy(cfg: GateConfig, pols: Policies, start_params: dict[str, torch.Tensor],
                out: Path) -> tuple[Path, int]:
    """Close vLLM (its memory back before the save), save the policy with the gate's
    budget and threshold beside it; the policy folder and how many parameters moved."""
    if pols.vllm is not None:
        pols.vllm.close()
        pols.vllm = None
    changed = sum(int(not torch.equal(start_params[n], p.detach()))
                  for n, p in pols.policy.model.named_parameters())
    policy_dir = pols.policy.save_pretrained(out / "policy")
    GateSettings(budget=cfg.budget, threshold=cfg.threshold).save(policy_dir)
    return policy_dir, changed


def quarter_rewards(steps: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean reward of the first and the last quarter of the steps."""
    k = max(1, len(steps) // 4)
    return {"reward_first_quarter": sum(s[1]["reward"] for s in steps[:k]) / k,
            "reward_last_quarter": sum(s[1]["reward"] for s in steps[-k:]) / k}


def stage_result(metrics: dict[str, float], after: dict[str, float], skipped: SkipReport,
                 steps: list[tuple[int, dict[str, float]]], policy_dir: Path, out: Path
                 ) -> StageResult:
    """Print the summary, write ``gate_summary.json``; the stage's result."""
    summary = (f"gate: reward {metrics['reward_first_quarter']:+.3f} -> "
               f"{metrics['reward_last_quarter']:+.3f}; reasoning ratio on eval "
               + ", ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in after.items()
                           if k.startswith("reason_ratio/family/"))
               + (f"; {skipped.rows_skipped} queries skipped (unreadable images, "
                  f"{out / 'skipped_rows.jsonl'})" if skipped.rows else ""))
    print(f"[gate] {summary}", flush=True)
    (out / "gate_summary.json").write_text(json.dumps(metrics, indent=2))
    return StageResult("gate", metrics=metrics, step_metrics=steps,
                       files={"gate_summary": out / "gate_summary.json",
                              **{n: out / f"{n}.jsonl" for n in ("skipped_rows",
                                                                 "skipped_eval_rows")
                                 if (out / f"{n}.jsonl").is_file()}},
                       models={"policy": policy_dir}, summary=summary)


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.gate``: flags generated from its config class."""
    stage_main("gate", run, argv)


if __name__ == "__main__":
    main()
