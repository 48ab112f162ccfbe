"""Stage 4: contrastive training with DeepSpeed (ZeRO-2/3, bf16, gradient caching, LoRA).

Loss (METHOD.md, each weight a config value; :mod:`mmemb.losses.objective`)::

    L = NCE(e(q ⊕ r*), e(t+)) + alpha * NCE(e(q), e(t+)) + lam * LM(r* | q)

over global in-batch negatives (gathered across ranks) plus K hard negatives per query.
Rows whose stage-3 selection kept no rationale (``rationale`` null) train in direct mode;
with plain pairs (stage 3 not run) every row does: a direct-only baseline.

Run alone on the embedded default::

    python -m mmemb.stages.train --config configs/demo.yaml --section train
    python -m mmemb.stages.train --model runs/x/tiny --pairs runs/x/data/pairs \\
        --eval runs/x/data/eval --image-root runs/x/data --out runs/x/train

Several processes (one per GPU; on CPU, gloo) with the same arguments::

    torchrun --nproc-per-node 2 -m mmemb.stages.train --config configs/demo.yaml
    deepspeed --hostfile hosts --num_gpus 8 --module mmemb.stages.train --config my.yaml

A killed run resumes from the newest checkpoint in ``out/checkpoints`` with the same data
order (rerun the same command). Outputs: ``out/student`` (the trained model, LoRA merged,
embedding config beside it), ``out/train_summary.json``, ``out/steps.jsonl``,
``out/ds_config.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch

from mmemb.configs.train import TrainConfig
from mmemb.losses.gradcache import gradcache_step, plain_step
from mmemb.losses.objective import Stage4Objective
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput
from mmemb.stages.base import StageResult, StepLogger, null_logger
from mmemb.training import checkpoint as ckpt
from mmemb.training.data import (
    EpochSampler,
    SkipReport,
    TrainRow,
    content_key,
    drop_unreadable,
    drop_unreadable_eval,
    load_rows,
    stage_image_check,
)
from mmemb.training.deepspeed_config import ds_config, lr_scheduler, use_bf16
from mmemb.training.distributed import (
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    free_port,
    init_deepspeed,
    is_main,
    rank,
    single_process_env,
    world_size,
)
from mmemb.training.module import (
    EmbedTrainModule,
    Item,
    align_chunks,
    embed_inputs,
    make_chunks,
)


def _say(msg: str) -> None:
    if is_main():
        print(f"[train] {msg}", flush=True)


def _skip_unreadable(result: tuple[list, SkipReport], out: Path, name: str, what: str
                     ) -> tuple[list, SkipReport]:
    """Log and list (``out/name``, rank 0) what was left out for an unreadable image."""
    rows, rep = result
    if rep.rows and not rows and what == "rows":
        raise ValueError(f"no training row is left: {rep.message(rep.rows_skipped, what)}")
    if is_main():
        (out / name).unlink(missing_ok=True)
        if rep.rows:
            rep.write(out / name)
            _say(f"{rep.message(len(rows) + rep.rows_skipped, what)} ({out / name})")
    return rows, rep


def _setup_env() -> None:
    """Env for DeepSpeed: CPU accelerator without a GPU; rank 0 of 1 without a launcher."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    import torch.distributed as dist

    if not launched and not dist.is_initialized():
        os.environ["MASTER_PORT"] = str(free_port())  # fresh per in-process run
    single_process_env()


def vision_trainable(name: str, policy: str) -> bool:
    """Does the vision policy let parameter ``name`` train? (non-vision params: always)."""
    if ".visual." not in f".{name}":
        return True
    return policy == "train" or (policy == "merger" and "merger" in name)


def token_row_indices(emb: Embedder) -> list[int] | dict[str, list[int]]:
    """peft ``trainable_token_indices`` for the method's tokens (``<think>``, ``</think>``,
    ``<emb>``; all three, also where the base already had some: the method gives them a new
    role).

    Tied head (every shipped family): a list, so peft wraps the input embedding and ties the
    LM head's wrapper to the same rows (one trainable ``[3, H]``; a dict naming both would
    make two copies of shared storage, and the merge would keep only one). Untied head:
    both modules by name, each with its own rows, since the gate reads the head's.
    """
    ids = sorted({emb.think_id, emb.end_think_id, emb.emb_id})
    inp, out = emb.model.get_input_embeddings(), emb.model.get_output_embeddings()
    if out is None or out.weight is inp.weight:
        return ids
    names = {id(m): n for n, m in emb.model.named_modules()}
    return {names[id(inp)]: ids, names[id(out)]: ids}


def prepare_model(emb: Embedder, cfg: TrainConfig) -> None:
    """Freeze by the vision policy, wrap in LoRA, turn on gradient checkpointing (in place).

    Under LoRA with ``train_token_rows`` the method's token rows train too
    (:func:`token_row_indices`): peft keeps them as a small separate parameter that replaces
    those rows in every embedding / LM-head call and is written into the matrix on merge;
    the base matrix itself is never written during training, so every other row stays the
    base's. DeepSpeed gets the new parameter like the adapters (it ``requires_grad``).
    Costs: each embedding / LM-head call rebuilds the [V, H] matrix with those rows replaced
    (transient; ~0.8 GB in bf16 at Qwen's 151,936 x 2,560), and ``weight_decay`` decays the
    rows themselves towards zero (the parameter holds the rows, not a difference).
    """
    keep = set()
    for n, p in emb.model.named_parameters():
        ok = vision_trainable(n, cfg.vision)
        p.requires_grad_(ok)
        if ok and ".visual." in f".{n}":
            keep.add(id(p))
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        from mmemb.model.embedder import hf_model

        names = "|".join(cfg.lora.target_modules)
        rows = token_row_indices(emb) if cfg.lora.train_token_rows else None
        lc = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                        target_modules=rf".*language_model.*\.({names})", bias="none",
                        trainable_token_indices=rows)
        emb.model = get_peft_model(emb.model, lc)
        for p in emb.model.parameters():  # peft froze everything else; the merger may train
            if id(p) in keep:
                p.requires_grad_(True)
        head = hf_model(emb.model).get_output_embeddings()
        if rows is not None and head is not None and not hasattr(head, "token_adapter"):
            # peft ties the head by config.tie_word_embeddings; a model tied in memory but not
            # in its config would train the rows for the input side only
            raise RuntimeError("lora.train_token_rows: peft did not wrap the LM head (tied "
                               "weights but config.tie_word_embeddings is false?); the gate "
                               "would read untrained rows")
    if cfg.gradient_checkpointing:
        from mmemb.model.embedder import hf_model

        hf_model(emb.model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    emb.model.train()


def build_items(rows: list[TrainRow], k: int) -> tuple[list[Item], dict]:
    """The inputs of one micro-batch and what the loss needs to reassemble them."""
    items: list[Item] = []
    has_r, keys, neg_pos, neg_keys = [], [], [], []
    for i, r in enumerate(rows):
        items.append(Item("q_direct", r.query, "direct"))
        has_r.append(r.rationale is not None)
        if r.rationale is not None:
            q = r.query
            items.append(Item("q_reason", EmbedInput(q.text, q.instruction, q.images,
                                                     r.rationale), "reason"))
        items.append(Item("pos", r.positive, "direct"))
        keys.append(content_key(r.positive))
        for j, n in enumerate(r.negatives[:k]):
            items.append(Item("neg", n, "direct"))
            neg_pos.append((i, j))
            neg_keys.append(content_key(n))
    # group order inside make_chunks keeps items of a group in row order
    return items, {"has_r": torch.tensor(has_r, dtype=torch.bool),
                   "keys": torch.tensor(keys, dtype=torch.long), "neg_pos": neg_pos,
                   "neg_keys": neg_keys, "k": k, "B": len(rows)}


def make_loss_fn(obj: Stage4Objective, info: dict):
    def loss_fn(reps: dict[str, torch.Tensor]):
        qd, t = reps["q_direct"], reps["pos"]  # [B, H]
        B, H = qd.shape
        hard = mask = nkeys = None
        if info["k"] > 0:
            K = info["k"]
            hard = qd.new_zeros(B, K, H)  # [B, K, H]
            mask = torch.zeros(B, K, dtype=torch.bool)
            nkeys = torch.full((B, K), -1, dtype=torch.long)
            if info["neg_pos"]:
                ri = torch.tensor([p[0] for p in info["neg_pos"]])
                ki = torch.tensor([p[1] for p in info["neg_pos"]])
                hard = hard.index_put((ri, ki), reps["neg"])
                mask[ri, ki] = True
                nkeys[ri, ki] = torch.tensor(info["neg_keys"])
            mask, nkeys = mask.to(qd.device), nkeys.to(qd.device)
        return obj.contrastive(qd, reps.get("q_reason"), info["has_r"], t, hard_neg=hard,
                               hard_neg_mask=mask, keys=info["keys"].to(qd.device),
                               neg_keys=nkeys)
    return loss_fn


def evaluate(engine, emb: Embedder, rows: list[dict], image_root: str | None,
             batch_size: int) -> dict[str, float]:
    """hit@1 (the row's metric) per task, direct mode: rank each row's tgt candidates by
    cosine. Every rank runs it on the same rows (ZeRO-3 needs all ranks in each forward)."""
    from mmemb.eval.metrics import score_task

    rows = [r for r in rows if r.get("tgt_text")]
    if not rows:
        return {}
    queries = [EmbedInput.from_row(r["qry_inst"], r["qry_text"], r["qry_img_path"], image_root)
               for r in rows]
    cand_idx: dict[tuple, int] = {}
    cands: list[EmbedInput] = []
    per_row: list[list[int]] = []
    for r in rows:
        ids = []
        for t, im in zip(r["tgt_text"], r["tgt_img_path"] or [""] * len(r["tgt_text"]),
                         strict=True):
            key = (r["tgt_inst"], t, im)
            if key not in cand_idx:
                cand_idx[key] = len(cands)
                cands.append(EmbedInput.from_row(r["tgt_inst"], t, im, image_root))
            ids.append(cand_idx[key])
        per_row.append(ids)
    qe = embed_inputs(engine, emb, queries, batch_size)  # [N, H]
    ce = embed_inputs(engine, emb, cands, batch_size)  # [C, H]
    by_task: dict[str, tuple[list, list, str, str]] = {}
    for i, r in enumerate(rows):
        scores = (ce[per_row[i]] @ qe[i]).numpy()  # [n_cand]
        rel = r.get("tgt_rel") or [1.0] + [0.0] * (len(per_row[i]) - 1)
        s, rl, _, _ = by_task.setdefault(r["task"], ([], [], r.get("metric") or "hit@1",
                                                     r.get("family") or "none"))
        s.append(scores)
        rl.append([j for j, g in enumerate(rel) if g > 0])
    out: dict[str, float] = {}
    fam: dict[str, list[float]] = defaultdict(list)
    for task, (s, rl, metric, family) in sorted(by_task.items()):
        v = score_task(s, rl, metric)
        out[f"{metric}/{task}"] = v
        fam[family].append(v)
    out["mean"] = sum(v for k, v in out.items()) / len(by_task)
    for f, vs in sorted(fam.items()):
        out[f"family/{f}"] = sum(vs) / len(vs)
    return out


def _fingerprint(t: torch.Tensor) -> tuple[float, float]:
    t = t.detach().double()
    return float(t.sum()), float((t * t).sum())


def _config_digest(cfg: TrainConfig) -> str:
    """Resume fingerprint: the fields declared to change what training computes."""
    from data_contracts.files import json_digest

    return json_digest(cfg.digest_view("resume"))[:16]


def _data_digest(path: str) -> str:
    """The training data's content digest (artifact manifest or streamed file hash)."""
    from data_contracts import io

    return io.content_digest(path)


def _final_state_dict(engine, zero_stage: int) -> dict | None:
    """Full weights on rank 0 (ZeRO-3: gathered layer by layer); None elsewhere."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if not is_main():
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_student(cfg: TrainConfig, sd: dict, out: Path, bf16: bool) -> Path:
    """Rank 0: load the final weights into a fresh model and save it (LoRA merged, trained
    token rows written into the embedding / LM head; ``out/adapter`` keeps both unmerged)."""
    fresh = Embedder.from_pretrained(cfg.model, max_text_tokens=cfg.max_text_tokens,
                                     add_special_tokens=True)
    prepare_model(fresh, cfg.model_copy(update={"gradient_checkpointing": False}))
    mod = EmbedTrainModule(fresh)
    missing, unexpected = mod.load_state_dict(sd, strict=False)
    own = mod.state_dict(keep_vars=True)
    loaded = {own[k].data_ptr() for k in sd if k in own}
    # a tied head, also under peft (lm_head.token_adapter.base_layer.weight and the shared
    # token rows): a key whose tensor is one that was loaded under another name
    tied = {k for k in missing if k.endswith("lm_head.weight") or own[k].data_ptr() in loaded}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"final weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    fresh.model.eval()
    if bf16:
        fresh.model.to(torch.bfloat16)
    target = out / "student"
    tmp = out / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lora is not None:
        fresh.model.save_pretrained(out / "adapter.tmp")  # the adapter alone, unmerged
        shutil.rmtree(out / "adapter", ignore_errors=True)
        os.replace(out / "adapter.tmp", out / "adapter")
    fresh.save_pretrained(tmp)  # merges a LoRA adapter into the weights
    (tmp / "mmemb_train.json").write_text(json.dumps(
        {"lora": cfg.lora.model_dump() if cfg.lora else None, "lora_merged": True,
         "base_model": cfg.model}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def run(cfg: TrainConfig, log: StepLogger = null_logger) -> StageResult:
    """Train the student; return its folder in ``models['student']`` (rank 0 has metrics).

    Owns the process group: initialised here (or by the launcher) and destroyed on the way
    out, also on errors, so a failed run leaves the process reusable.
    """
    _setup_env()
    _say("importing DeepSpeed...")
    t0 = time.perf_counter()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    _say(f"DeepSpeed {deepspeed.__version__} imported in {time.perf_counter() - t0:.1f}s")
    if not dist.is_initialized():
        _forget_stale_groups()
    init_deepspeed(_say)
    try:
        return _run(cfg, log)
    finally:
        if dist.is_initialized():
            # deepspeed.comm's teardown also drops DeepSpeed's cached group handles; torch's
            # alone leaves them stale and the next initialize() in this process fails.
            deepspeed.comm.destroy_process_group()


def _forget_stale_groups() -> None:
    """Drop DeepSpeed's cached process groups left by code that tore the process group down
    with torch.distributed directly (a stale world group breaks ``deepspeed.initialize``)."""
    from deepspeed.utils import groups

    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(group=None)


def _run(cfg: TrainConfig, log: StepLogger) -> StageResult:
    import deepspeed

    rk, W = rank(), world_size()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = "cuda"
    else:
        device = "cpu"
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ck_root = out / "checkpoints"
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    t_start = time.perf_counter()

    # ---- data
    data_path = cfg.data or cfg.pairs
    rows, contract = load_rows(data_path, cfg.image_root,
                               allow_outside_root=cfg.allow_images_outside_root)
    check = stage_image_check(cfg.model, cfg.max_pixels, cfg.min_pixels, cfg.max_decode_pixels)
    rows, skipped = _skip_unreadable(drop_unreadable(rows, check, str(data_path)), out,
                                     "skipped_rows.jsonl", "rows")
    B, A, K = cfg.batch_size, cfg.grad_accum, cfg.hard_negatives
    G = B * W
    sampler = EpochSampler(len(rows), G, cfg.seed)  # refuses a dataset < one global batch
    micro_per_epoch = sampler.steps_per_epoch
    steps_per_epoch = micro_per_epoch / A
    main_steps = (math.ceil(cfg.epochs * micro_per_epoch / A) if cfg.epochs else cfg.steps)
    n_r = sum(r.rationale is not None for r in rows)
    r_rows = [r for r in rows if r.rationale is not None]
    warm_lm = cfg.lm_warmup_steps if r_rows else 0
    if cfg.lm_warmup_steps and not r_rows:
        _say("lm_warmup_steps is set but no row has a rationale: no rationale warm-up")
    r_sampler = EpochSampler(len(r_rows), G, cfg.seed + 1) if warm_lm else None
    total = warm_lm + main_steps
    max_k = min(K, max((len(r.negatives) for r in rows), default=0))
    _say(f"world size {W} | per-device batch {B} | global contrastive batch {G} "
         f"(= {B} x {W} ranks: each query is contrasted with {G - 1} in-batch targets + "
         f"{max_k} hard negative(s))")
    _say(f"gradient accumulation {A}: {A * G} pairs per optimizer step, but accumulation "
         f"does NOT add negatives (the contrastive batch stays {G}; gradcache chunks of "
         f"{cfg.chunk_size} are how it grows)" if A > 1 else
         "gradient accumulation 1 (accumulation would not add negatives; the contrastive "
         "batch grows through batch_size with gradcache)")
    _say(f"{len(rows)} rows from {contract} {data_path} ({n_r} with a rationale = "
         f"{n_r / len(rows):.0%}; the rest train in direct mode) | {steps_per_epoch:g} "
         f"steps/epoch | {main_steps} steps (~{main_steps / steps_per_epoch:.1f} epochs)"
         + (f" after {warm_lm} rationale warm-up steps (LM only, {len(r_rows)} rows)"
            if warm_lm else ""))

    # ---- model + engine
    emb = Embedder.from_pretrained(cfg.model, max_text_tokens=cfg.max_text_tokens,
                                   add_special_tokens=True, max_pixels=cfg.max_pixels,
                                   min_pixels=cfg.min_pixels,
                                   max_decode_pixels=cfg.max_decode_pixels)
    if device == "cuda":
        emb.model.to(torch.device("cuda", torch.cuda.current_device()))
    prepare_model(emb, cfg)
    module = EmbedTrainModule(emb, vision_row=W > 1)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    prints = {n: _fingerprint(p) for n, p in trainable}
    n_train = sum(p.numel() for _, p in trainable)
    n_all = sum(p.numel() for p in module.parameters())
    bf16 = use_bf16(cfg, device)
    ds = ds_config(cfg, W, device)
    if is_main():
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    _say(f"building the DeepSpeed engine (ZeRO-{cfg.zero_stage})...")
    t_engine = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=[p for _, p in trainable], config=ds,
        lr_scheduler=lr_scheduler(cfg, total, warm_lm))
    _say(f"engine ready in {time.perf_counter() - t_engine:.1f}s | "
         f"ZeRO-{cfg.zero_stage} | {'bf16' if bf16 else 'fp32'} | "
         f"{'gradcache chunks of ' + str(cfg.chunk_size) if cfg.gradcache else 'no gradcache'}"
         f" | trainable {n_train:,} of {n_all:,} params"
         f"{' (LoRA r=' + str(cfg.lora.r) + ')' if cfg.lora else ''} | vision {cfg.vision}")

    eval_rows: list[dict] = []
    if cfg.eval:
        from data_contracts import io
        from data_contracts.schemas import EVAL_ROWS

        eval_rows = io.read(cfg.eval, EVAL_ROWS, image_root=cfg.image_root,
                            allow_outside_root=cfg.allow_images_outside_root).to_pylist()
    eval_rows, eval_skipped = _skip_unreadable(drop_unreadable_eval(
        eval_rows, cfg.image_root, check, str(cfg.eval)), out, "skipped_eval_rows.jsonl",
        "eval rows")
    metrics: dict[str, float] = {**skipped.metrics("data"), **eval_skipped.metrics("eval_data")}

    # ---- resume
    order_meta = {"seed": cfg.seed, "global_batch": G, "grad_accum": A, "rows": len(rows),
                  "data_digest": _data_digest(data_path), "world_size": W,
                  "config": _config_digest(cfg)}
    start = 0
    steps_file = out / "steps.jsonl"
    history: list[tuple[int, dict[str, float]]] = []
    latest = ckpt.latest_checkpoint(ck_root) if cfg.resume else None
    if latest is not None and (diff := ckpt.meta_diff(latest[1], order_meta)):
        # A pipeline rerun after a config or data change: resuming would continue another
        # run's optimisation. Start over; the old checkpoints are kept aside, not deleted.
        _say(f"{ck_root} holds checkpoints of a different run (differs in "
             f"{sorted(diff)}): starting over; they are moved to {ck_root}.stale")
        if is_main():
            shutil.rmtree(f"{ck_root}.stale", ignore_errors=True)
            ck_root.rename(f"{ck_root}.stale")
        barrier()
        latest = None
    if latest is not None:
        client = ckpt.load_checkpoint(engine, latest[1])
        start = int(client["step"])
        if steps_file.is_file():
            for line in steps_file.read_text().splitlines():
                s, m = json.loads(line)
                if s <= start:
                    history.append((s, m))
        metrics.update({k: v for k, v in client.get("eval_before", {}).items()})
        _say(f"resumed from {latest[1]} at step {start}")
    elif is_main() and ck_root.exists():
        shutil.rmtree(ck_root)
    if is_main():
        steps_file.write_text("".join(json.dumps([s, m]) + "\n" for s, m in history))
    if eval_rows and cfg.eval_before and latest is None:
        before = evaluate(engine, emb, eval_rows, cfg.image_root, cfg.eval_batch_size)
        metrics.update({f"eval_before/{k}": v for k, v in before.items()})
        _say(f"eval before training: hit@1 mean {before.get('mean', float('nan')):.3f}")

    # ---- train
    obj = Stage4Objective(cfg.alpha, cfg.lam, cfg.tau, gather=True)
    chunk = cfg.chunk_size if cfg.gradcache else 10**9
    step_fn = gradcache_step if cfg.gradcache else plain_step
    state = {"last_micro": True}

    def encode(cs, with_lm):
        embs, lms = engine([c.batch for c in cs], [with_lm and c.lm for c in cs],
                           [c.meta["n"] for c in cs])
        return [(e, lm if (with_lm and c.lm) else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    def backward(loss, is_last):
        # One optimizer step = every chunk of every micro-batch: only the very last backward
        # is DeepSpeed's accumulation boundary (ZeRO reduces/partitions, then step()).
        engine.set_gradient_accumulation_boundary(state["last_micro"] and is_last)
        engine.backward(loss)

    for step in range(start, total):
        t0 = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        counts = {"tokens": 0.0, "samples": 0.0}
        if step < warm_lm:  # rationale SFT: LM(r*|q) alone, reasoning-mode queries only
            for a in range(A):
                idx = r_sampler.indices(step * A + a, rk, B)
                items = [Item("q_reason", EmbedInput(r.query.text, r.query.instruction,
                                                     r.query.images, r.rationale), "reason")
                         for r in (r_rows[i] for i in idx)]
                chunks = align_chunks(emb, make_chunks(emb, items, chunk, module.vision_row),
                                      module.vision_row)
                n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
                state["last_micro"] = a == A - 1
                for j, c in enumerate(chunks):
                    (e,), (lm_sum,) = engine([c.batch], [c.lm], [c.meta["n"]])
                    # + 0 * e: an alignment (dummy) chunk has no LM term but must still
                    # reach backward, as every rank makes the same collective calls
                    backward(lm_sum / max(1, n_lm) / A + 0.0 * e.sum(), j == len(chunks) - 1)
                    sums["loss/lm"] += float(lm_sum.detach()) / max(1, n_lm) / A
                counts["tokens"] += sum(c.n_tokens for c in chunks if not c.meta.get("dummy"))
                counts["samples"] += len(idx)
            sums["loss"] = sums["loss/lm"]
            sums["phase_lm_warmup"] = 1.0
        for a in range(A if step >= warm_lm else 0):
            idx = sampler.indices((step - warm_lm) * A + a, rk, B)
            items, info = build_items([rows[i] for i in idx], max_k)
            chunks = align_chunks(emb, make_chunks(emb, items, chunk, module.vision_row),
                                  module.vision_row)
            n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
            state["last_micro"] = a == A - 1
            res = step_fn(chunks, encode, make_loss_fn(obj, info), backward, obj.lm_weight(n_lm))
            parts = obj.add_lm(res.out, res.lm_sum, n_lm).parts()
            parts["reason_share"] = float(info["has_r"].float().mean())
            for k_, v in parts.items():
                sums[k_] += v / A
            counts["tokens"] += sum(c.n_tokens for c in chunks if not c.meta.get("dummy"))
            counts["samples"] += len(idx)
        lr = float(engine.get_lr()[0])
        manual_norm = None
        if cfg.zero_stage < 2:
            g = [p.grad.detach().float().norm() for p in engine.module.parameters()
                 if p.grad is not None]
            manual_norm = float(torch.stack(g).norm()) if g else 0.0
        engine.step()
        gn = engine.get_global_grad_norm()
        gn = float(gn) if gn is not None else manual_norm
        dt = time.perf_counter() - t0
        m = all_reduce_mean(dict(sums))
        c = all_reduce_sum(counts)
        m.update({"lr": lr, "grad_norm": float(gn) if gn is not None else float("nan"),
                  "samples_per_s": c["samples"] / dt, "tokens_per_s": c["tokens"] / dt,
                  "step_s": dt, "epoch": (step + 1) / steps_per_epoch,
                  "global_batch": float(G)})
        if "n_candidates" in m:
            m["gathered_batch"] = m["n_candidates"] - max_k
        if is_main():
            history.append((step + 1, m))
            log(step + 1, m)
            with steps_file.open("a") as f:
                f.write(json.dumps([step + 1, m]) + "\n")
            if step < warm_lm and ((step + 1) % cfg.log_every == 0 or step == start):
                print(f"[train] step {step + 1}/{total} rationale warm-up: lm "
                      f"{m['loss/lm']:.3f} lr {lr:.2e} gn {m['grad_norm']:.2f} "
                      f"{m['samples_per_s']:.1f} samples/s", flush=True)
            elif (step + 1) % cfg.log_every == 0 or step == start or step + 1 == total:
                print(f"[train] step {step + 1}/{total} loss {m['loss']:.4f} (nce_r "
                      f"{m['loss/nce_reason']:.3f} nce_d {m['loss/nce_direct']:.3f} lm "
                      f"{m['loss/lm']:.3f}) acc {m['acc/in_batch_direct']:.2f} lr {lr:.2e} "
                      f"gn {m['grad_norm']:.2f} {m['samples_per_s']:.1f} samples/s "
                      f"{m['tokens_per_s']:.0f} tok/s", flush=True)
        if (step + 1) % cfg.save_every == 0 and step + 1 < total:
            p = ckpt.save_checkpoint(engine, ck_root, step + 1, order_meta,
                                     {"step": step + 1, "eval_before": {
                                         k: v for k, v in metrics.items()
                                         if k.startswith("eval_before/")}},
                                     keep=cfg.keep_checkpoints)
            _say(f"checkpoint step {step + 1} -> {p}")

    # ---- eval, save
    if eval_rows:
        after = evaluate(engine, emb, eval_rows, cfg.image_root, cfg.eval_batch_size)
        metrics.update({f"eval/{k}": v for k, v in after.items()})
    sd = _final_state_dict(engine, cfg.zero_stage)
    student = out / "student"
    if is_main():
        changed = sum(int(_fingerprint(sd[n]) != prints[n]) for n in prints if n in sd)
        metrics.update({"params_trainable": float(len(prints)), "params_changed": float(changed),
                        "steps": float(total), "train_s": time.perf_counter() - t_start,
                        "world_size": float(W), "global_batch": float(G)})
        joint = [h for h in history if not h[1].get("phase_lm_warmup")]
        if joint:  # the joint objective's loss (the warm-up's is LM alone)
            k = max(1, len(joint) // 10)
            metrics["loss_first"] = sum(h[1]["loss"] for h in joint[:k]) / k
            metrics["loss_last"] = sum(h[1]["loss"] for h in joint[-k:]) / k
        warm = [h for h in history if h[1].get("phase_lm_warmup")]
        if warm:
            k = max(1, len(warm) // 10)
            metrics["warmup_lm_first"] = sum(h[1]["loss/lm"] for h in warm[:k]) / k
            metrics["warmup_lm_last"] = sum(h[1]["loss/lm"] for h in warm[-k:]) / k
        student = save_student(cfg, sd, out, bf16)
        (out / "train_summary.json").write_text(json.dumps(metrics, indent=2))
    barrier()
    summary = (f"train: {total} steps, loss {metrics.get('loss_first', float('nan')):.3f} -> "
               f"{metrics.get('loss_last', float('nan')):.3f}"
               + (f"; {skipped.rows_skipped} rows skipped, {skipped.negatives_dropped} "
                  f"negatives dropped (unreadable images, {out / 'skipped_rows.jsonl'})"
                  if skipped.rows else "")
               + (f"; synthetic hit@1 {metrics.get('eval_before/mean', float('nan')):.3f} -> "
                  f"{metrics['eval/mean']:.3f}" if "eval/mean" in metrics else "")
               + f"; student at {student}")
    if rk == 0:
        print(f"[train] {summary}", flush=True)
    files = {"train_summary": out / "train_summary.json", "steps": steps_file,
             "ds_config": out / "ds_config.json",
             **{n: out / f"{n}.jsonl" for n in ("skipped_rows", "skipped_eval_rows")
                if (out / f"{n}.jsonl").is_file()}}
    return StageResult("train", metrics=metrics, step_metrics=history, files=files,
                       models={"student": student}, summary=summary)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Stage 4: contrastive training with DeepSpeed.")
    ap.add_argument("--config", help="YAML config (a pipeline file with --section, or a "
                    "stage-only file)")
    ap.add_argument("--section", default="train", help="section of the YAML to read")
    for k in ("model", "data", "pairs", "image-root", "eval", "out"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    over = {k.replace("-", "_"): v for k, v in {
        "model": a.model, "data": a.data, "pairs": a.pairs, "image-root": a.image_root,
        "eval": a.eval, "out": a.out, "steps": a.steps}.items() if v is not None}
    if a.pairs and not a.data:
        over["data"] = None  # explicit pairs: a direct-only run, not the wired selections
    cfg = TrainConfig.from_args(a.config, a.section, over)
    run(cfg)


if __name__ == "__main__":
    main()
