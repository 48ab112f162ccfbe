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

import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmemb.configs.cli import stage_main
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
    make_chunks,
    merged_embed,
)
from mmemb.training.reduction import describe, one_reduce_per_step


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
    """The loss of one micro-batch from its encoded groups: the flat hard negatives are
    put back per query (``[B, K, H]``, a mask for queries with fewer than K), so gradient
    caching can call the same function on cached and recomputed representations."""
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
    """hit@1 (the row's metric) per task, direct mode, by the one evaluator
    (:func:`mmemb.eval.harness.evaluate_rows`): each row ranks its tgt candidates by cosine.
    Every rank runs it on the same rows (ZeRO-3 needs all ranks in each forward)."""
    from mmemb.eval.encoding import EngineEncoder
    from mmemb.eval.harness import evaluate_rows, task_means

    scores = evaluate_rows(EngineEncoder(engine, emb, batch_size),
                           [r for r in rows if r.get("tgt_text")], image_root=image_root,
                           strict=True)
    return task_means(scores)


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
    """The recipe: data, plan, engine, eval rows, resume, each phase through one loop,
    eval, save."""
    device = _select_device()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    t_start = time.perf_counter()
    data = load_train_data(cfg, out)
    plan = make_plan(cfg, data.rows, world_size())
    say_plan(cfg, data, plan)
    model = build_engine(cfg, plan, device, out)
    eval_rows, eval_skipped = load_eval_rows(cfg, out, data.check)
    metrics: dict[str, float] = {**data.skipped.metrics("data"),
                                 **eval_skipped.metrics("eval_data")}
    state = resume(cfg, model.engine, order_meta(cfg, data, plan), out, metrics, log)
    if eval_rows and cfg.eval_before and not state.resumed:
        before = evaluate(model.engine, model.emb, eval_rows, cfg.image_root,
                          cfg.eval_batch_size)
        metrics.update({f"eval_before/{k}": v for k, v in before.items()})
        _say(f"eval before training: hit@1 mean {before.get('mean', float('nan')):.3f}")
    trainer = Trainer(cfg, plan, model, Stage4Objective(cfg.alpha, cfg.lam, cfg.tau, gather=True))
    for phase in phases(plan):
        train_phase(trainer, state, phase)
    if eval_rows:
        after = evaluate(model.engine, model.emb, eval_rows, cfg.image_root, cfg.eval_batch_size)
        metrics.update({f"eval/{k}": v for k, v in after.items()})
    student = save_outputs(cfg, model, state, plan, time.perf_counter() - t_start)
    return stage_result(state, plan.total, data.skipped, student)


def _select_device() -> str:
    """``cuda`` (this rank's GPU made current) or ``cpu``."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return "cuda"
    return "cpu"


# --------------------------------------------------------------------------- phase: data


@dataclass
class TrainData:
    """The training rows whose images decode, and where they came from."""

    path: str
    contract: str
    rows: list[TrainRow]
    skipped: SkipReport
    check: object  # the stage's image check, reused on the eval rows


def load_train_data(cfg: TrainConfig, out: Path) -> TrainData:
    """Selections (stage 3) or plain pairs; rows with an unreadable image are listed, not
    trained on."""
    path = cfg.data or cfg.pairs
    rows, contract = load_rows(path, cfg.image_root,
                               allow_outside_root=cfg.allow_images_outside_root)
    check = stage_image_check(cfg.model, cfg.max_pixels, cfg.min_pixels, cfg.max_decode_pixels)
    rows, skipped = _skip_unreadable(drop_unreadable(rows, check, str(path)), out,
                                     "skipped_rows.jsonl", "rows")
    return TrainData(path, contract, rows, skipped, check)


def load_eval_rows(cfg: TrainConfig, out: Path, check) -> tuple[list[dict], SkipReport]:
    """The eval rows (none without ``cfg.eval``) whose images decode."""
    rows: list[dict] = []
    if cfg.eval:
        from data_contracts import io
        from data_contracts.schemas import EVAL_ROWS

        rows = io.read(cfg.eval, EVAL_ROWS, image_root=cfg.image_root,
                       allow_outside_root=cfg.allow_images_outside_root).to_pylist()
    return _skip_unreadable(drop_unreadable_eval(rows, cfg.image_root, check, str(cfg.eval)),
                            out, "skipped_eval_rows.jsonl", "eval rows")


@dataclass
class Plan:
    """Batch sizes and step counts: ``warm_lm`` rationale warm-up steps (LM only, rows with
    a rationale), then ``main_steps`` of the joint objective."""

    B: int  # queries per rank per micro-batch
    A: int  # micro-batches per optimizer step
    W: int  # ranks
    rows: list[TrainRow]
    sampler: EpochSampler
    r_rows: list[TrainRow]  # the rows with a rationale (the warm-up's data)
    r_sampler: EpochSampler | None
    warm_lm: int
    main_steps: int
    max_k: int  # hard negatives per query actually available

    @property
    def G(self) -> int:  # the global contrastive batch
        return self.B * self.W

    @property
    def total(self) -> int:
        return self.warm_lm + self.main_steps

    @property
    def steps_per_epoch(self) -> float:
        return self.sampler.steps_per_epoch / self.A


def make_plan(cfg: TrainConfig, rows: list[TrainRow], W: int) -> Plan:
    """Samplers and step counts (``epochs`` wins over ``steps``)."""
    B, A = cfg.batch_size, cfg.grad_accum
    sampler = EpochSampler(len(rows), B * W, cfg.seed)  # refuses a dataset < one global batch
    main_steps = (math.ceil(cfg.epochs * sampler.steps_per_epoch / A) if cfg.epochs
                  else cfg.steps)
    r_rows = [r for r in rows if r.rationale is not None]
    warm_lm = cfg.lm_warmup_steps if r_rows else 0
    if cfg.lm_warmup_steps and not r_rows:
        _say("lm_warmup_steps is set but no row has a rationale: no rationale warm-up")
    r_sampler = EpochSampler(len(r_rows), B * W, cfg.seed + 1) if warm_lm else None
    max_k = min(cfg.hard_negatives, max((len(r.negatives) for r in rows), default=0))
    return Plan(B, A, W, rows, sampler, r_rows, r_sampler, warm_lm, main_steps, max_k)


def say_plan(cfg: TrainConfig, data: TrainData, plan: Plan) -> None:
    """What the batch sizes mean for the contrastive batch, and the data behind the steps."""
    B, A, W, G, max_k = plan.B, plan.A, plan.W, plan.G, plan.max_k
    rows, n_r, spe = data.rows, len(plan.r_rows), plan.steps_per_epoch
    _say(f"world size {W} | per-device batch {B} | global contrastive batch {G} "
         f"(= {B} x {W} ranks: each query is contrasted with {G - 1} in-batch targets + "
         f"{max_k} hard negative(s))")
    _say(f"gradient accumulation {A}: {A * G} pairs per optimizer step, but accumulation "
         f"does NOT add negatives (the contrastive batch stays {G}; gradcache chunks of "
         f"{cfg.chunk_size} are how it grows)" if A > 1 else
         "gradient accumulation 1 (accumulation would not add negatives; the contrastive "
         "batch grows through batch_size with gradcache)")
    _say(f"{len(rows)} rows from {data.contract} {data.path} ({n_r} with a rationale = "
         f"{n_r / len(rows):.0%}; the rest train in direct mode) | {spe:g} "
         f"steps/epoch | {plan.main_steps} steps (~{plan.main_steps / spe:.1f} epochs)"
         + (f" after {plan.warm_lm} rationale warm-up steps (LM only, {n_r} rows)"
            if plan.warm_lm else ""))


# --------------------------------------------------------------------------- phase: engine


@dataclass
class Model:
    """The student, its training wrapper and the DeepSpeed engine around it."""

    emb: Embedder
    module: EmbedTrainModule
    engine: object
    bf16: bool
    prints: dict[str, tuple[float, float]]  # trainable parameter -> fingerprint at the start


def build_engine(cfg: TrainConfig, plan: Plan, device: str, out: Path) -> Model:
    """Load the student, apply the training policy (vision, LoRA, checkpointing), build the
    DeepSpeed engine with the LR schedule of both phases; write ``ds_config.json``."""
    import deepspeed

    emb = Embedder.from_pretrained(cfg.model, max_text_tokens=cfg.max_text_tokens,
                                   add_special_tokens=True, max_pixels=cfg.max_pixels,
                                   min_pixels=cfg.min_pixels,
                                   max_decode_pixels=cfg.max_decode_pixels)
    if device == "cuda":
        emb.model.to(torch.device("cuda", torch.cuda.current_device()))
    prepare_model(emb, cfg)
    module = EmbedTrainModule(emb, vision_row=plan.W > 1)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    prints = {n: _fingerprint(p) for n, p in trainable}
    n_train = sum(p.numel() for _, p in trainable)
    n_all = sum(p.numel() for p in module.parameters())
    bf16 = use_bf16(cfg, device)
    ds = ds_config(cfg, plan.W, device)
    if is_main():
        (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    _say(f"building the DeepSpeed engine (ZeRO-{cfg.zero_stage})...")
    t_engine = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=[p for _, p in trainable], config=ds,
        lr_scheduler=lr_scheduler(cfg, plan.total, plan.warm_lm))
    _say(f"engine ready in {time.perf_counter() - t_engine:.1f}s | "
         f"ZeRO-{cfg.zero_stage} | {'bf16' if bf16 else 'fp32'} | "
         f"{'gradcache chunks of ' + str(cfg.chunk_size) if cfg.gradcache else 'no gradcache'}"
         f" | trainable {n_train:,} of {n_all:,} params"
         f"{' (LoRA r=' + str(cfg.lora.r) + ')' if cfg.lora else ''} | vision {cfg.vision}")
    _say(f"gradient reduction: {describe(cfg.zero_stage, cfg.gradcache, cfg.gradcache_reduce)}")
    return Model(emb, module, engine, bf16, prints)


# --------------------------------------------------------------------------- phase: resume


@dataclass
class RunState:
    """What the loop carries between steps and what resuming restores."""

    out: Path
    order_meta: dict  # the resume fingerprint a checkpoint must match
    metrics: dict[str, float]
    log: StepLogger
    start: int = 0  # the first step this process runs (> 0 after a resume)
    resumed: bool = False
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    @property
    def ck_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def steps_file(self) -> Path:
        return self.out / "steps.jsonl"


def order_meta(cfg: TrainConfig, data: TrainData, plan: Plan) -> dict:
    """The resume fingerprint: a checkpoint continues this run only if the data order, the
    data and the result-changing config fields are the same."""
    return {"seed": cfg.seed, "global_batch": plan.G, "grad_accum": plan.A,
            "rows": len(data.rows), "data_digest": _data_digest(data.path),
            "world_size": plan.W, "config": _config_digest(cfg)}


def resume(cfg: TrainConfig, engine, meta: dict, out: Path, metrics: dict[str, float],
           log: StepLogger) -> RunState:
    """Continue from the newest matching checkpoint (its step history kept), or start over.

    A pipeline rerun after a config or data change finds checkpoints of another run:
    resuming would continue another run's optimisation, so they are moved aside (to
    ``checkpoints.stale``, not deleted) and training starts at step 0.
    """
    state = RunState(out, meta, metrics, log)
    ck_root = state.ck_root
    latest = ckpt.latest_checkpoint(ck_root) if cfg.resume else None
    if latest is not None and (diff := ckpt.meta_diff(latest[1], meta)):
        _say(f"{ck_root} holds checkpoints of a different run (differs in "
             f"{sorted(diff)}): starting over; they are moved to {ck_root}.stale")
        if is_main():
            shutil.rmtree(f"{ck_root}.stale", ignore_errors=True)
            ck_root.rename(f"{ck_root}.stale")
        barrier()
        latest = None
    if latest is not None:
        client = ckpt.load_checkpoint(engine, latest[1])
        state.start, state.resumed = int(client["step"]), True
        if state.steps_file.is_file():
            for line in state.steps_file.read_text().splitlines():
                s, m = json.loads(line)
                if s <= state.start:
                    state.history.append((s, m))
        metrics.update({k: v for k, v in client.get("eval_before", {}).items()})
        _say(f"resumed from {latest[1]} at step {state.start}")
    elif is_main() and ck_root.exists():
        shutil.rmtree(ck_root)
    if is_main():
        state.steps_file.write_text("".join(json.dumps([s, m]) + "\n" for s, m in state.history))
    return state


# --------------------------------------------------------------------------- phase: train


@dataclass
class Phase:
    """A run of optimizer steps ``[first, stop)`` drawing micro-batches from ``sampler``;
    ``lm_only``: the rationale warm-up (LM(r*|q) alone), else the joint objective."""

    first: int
    stop: int
    sampler: EpochSampler
    lm_only: bool


def phases(plan: Plan) -> list[Phase]:
    """The rationale warm-up (when there is one), then the joint objective."""
    out = [Phase(0, plan.warm_lm, plan.r_sampler, True)] if plan.warm_lm else []
    return out + [Phase(plan.warm_lm, plan.total, plan.sampler, False)]


@dataclass
class Trainer:
    """What one optimizer step needs: the engine, the objective and the chunking rule."""

    cfg: TrainConfig
    plan: Plan
    model: Model
    obj: Stage4Objective
    last_micro: bool = True  # is the current micro-batch the step's last?

    @property
    def chunk(self) -> int:
        return self.cfg.chunk_size if self.cfg.gradcache else 10**9

    def chunks(self, items: list[Item]) -> list:
        """Chunks of one micro-batch, aligned across ranks (same count and shapes)."""
        emb, vision_row = self.model.emb, self.model.module.vision_row
        return align_chunks(emb, make_chunks(emb, items, self.chunk, vision_row), vision_row)

    def encode(self, cs: list, with_lm: bool) -> list:
        """The engine's forward on chunks: (embedding, LM sum or None) per chunk."""
        embs, lms = self.model.engine([c.batch for c in cs], [with_lm and c.lm for c in cs],
                                      [c.meta["n"] for c in cs])
        return [(e, lm if (with_lm and c.lm) else None)
                for e, lm, c in zip(embs, lms, cs, strict=True)]

    def backward(self, loss: torch.Tensor, is_last: bool) -> None:
        # One optimizer step = every chunk of every micro-batch: only the very last backward
        # is DeepSpeed's accumulation boundary (ZeRO-0/1 reduce there; ZeRO-2/3 reduce once
        # when train_phase leaves one_reduce_per_step, or per backward with
        # gradcache_reduce=backward), then step().
        engine = self.model.engine
        engine.set_gradient_accumulation_boundary(self.last_micro and is_last)
        engine.backward(loss)


@dataclass
class StepTotals:
    """Per optimizer step: loss parts (already divided by the accumulation) and counts."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, float] = field(default_factory=lambda: {"tokens": 0.0, "samples": 0.0})

    def count(self, chunks: list, n_samples: int) -> None:
        self.counts["tokens"] += sum(c.n_tokens for c in chunks if not c.meta.get("dummy"))
        self.counts["samples"] += n_samples


def lm_micro(t: Trainer, idx: list[int], acc: StepTotals) -> None:
    """One warm-up micro-batch: LM(r*|q) alone, on reasoning-mode queries."""
    A = t.plan.A
    items = [Item("q_reason", EmbedInput(r.query.text, r.query.instruction, r.query.images,
                                         r.rationale), "reason")
             for r in (t.plan.r_rows[i] for i in idx)]
    chunks = t.chunks(items)
    n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
    for j, c in enumerate(chunks):
        (e,), (lm_sum,) = t.model.engine([c.batch], [c.lm], [c.meta["n"]])
        # + 0 * e: an alignment (dummy) chunk has no LM term but must still reach backward,
        # as every rank makes the same collective calls
        t.backward(lm_sum / max(1, n_lm) / A + 0.0 * e.sum(), j == len(chunks) - 1)
        acc.sums["loss/lm"] += float(lm_sum.detach()) / max(1, n_lm) / A
    acc.count(chunks, len(idx))


def joint_micro(t: Trainer, idx: list[int], acc: StepTotals) -> None:
    """One joint micro-batch: the stage-4 objective, gradient-cached or plain."""
    items, info = build_items([t.plan.rows[i] for i in idx], t.plan.max_k)
    chunks = t.chunks(items)
    n_lm = sum(c.meta["n_lm_tokens"] for c in chunks)
    loss_fn, lm_weight = make_loss_fn(t.obj, info), t.obj.lm_weight(n_lm)
    if t.cfg.gradcache:
        res = gradcache_step(chunks, t.encode, loss_fn, t.backward, lm_weight,
                             merged_embed(t.encode, t.model.emb, t.cfg.gradcache_embed_chunks))
    else:
        res = plain_step(chunks, t.encode, loss_fn, t.backward, lm_weight)
    parts = t.obj.add_lm(res.out, res.lm_sum, n_lm).parts()
    parts["reason_share"] = float(info["has_r"].float().mean())
    for k, v in parts.items():
        acc.sums[k] += v / t.plan.A
    acc.count(chunks, len(idx))


def train_phase(t: Trainer, state: RunState, phase: Phase) -> None:
    """THE training loop, for either phase: accumulate ``A`` micro-batches, take the
    optimizer step, log, checkpoint. Steps before ``state.start`` (resumed) are skipped."""
    A, B = t.plan.A, t.plan.B
    for step in range(max(state.start, phase.first), phase.stop):
        t0 = time.perf_counter()
        acc = StepTotals()
        # every backward of the step (chunks x micro-batches) inside: one gradient reduce
        with one_reduce_per_step(t.model.engine, t.cfg.zero_stage, t.cfg.gradcache,
                                 t.cfg.gradcache_reduce):
            for a in range(A):
                idx = phase.sampler.indices((step - phase.first) * A + a, rank(), B)
                t.last_micro = a == A - 1
                (lm_micro if phase.lm_only else joint_micro)(t, idx, acc)
        if phase.lm_only:
            acc.sums["loss"] = acc.sums["loss/lm"]
            acc.sums["phase_lm_warmup"] = 1.0
        m = optimizer_step(t, acc, step, t0)
        if is_main():
            record_step(t, state, step, m, phase.lm_only)
        if (step + 1) % t.cfg.save_every == 0 and step + 1 < t.plan.total:
            p = ckpt.save_checkpoint(t.model.engine, state.ck_root, step + 1, state.order_meta,
                                     {"step": step + 1, "eval_before": {
                                         k: v for k, v in state.metrics.items()
                                         if k.startswith("eval_before/")}},
                                     keep=t.cfg.keep_checkpoints)
            _say(f"checkpoint step {step + 1} -> {p}")


def optimizer_step(t: Trainer, acc: StepTotals, step: int, t0: float) -> dict[str, float]:
    """Step the optimizer; the step's metrics, averaged (losses) or summed (counts) over
    ranks. The LR is the one this step ran at (read before the scheduler moves)."""
    engine = t.model.engine
    lr = float(engine.get_lr()[0])
    manual_norm = None
    if t.cfg.zero_stage < 2:  # DeepSpeed reports no global norm below ZeRO-2
        g = [p.grad.detach().float().norm() for p in engine.module.parameters()
             if p.grad is not None]
        manual_norm = float(torch.stack(g).norm()) if g else 0.0
    engine.step()
    gn = engine.get_global_grad_norm()
    gn = float(gn) if gn is not None else manual_norm
    dt = time.perf_counter() - t0
    m = all_reduce_mean(dict(acc.sums))
    c = all_reduce_sum(acc.counts)
    m.update({"lr": lr, "grad_norm": float(gn) if gn is not None else float("nan"),
              "samples_per_s": c["samples"] / dt, "tokens_per_s": c["tokens"] / dt,
              "step_s": dt, "epoch": (step + 1) / t.plan.steps_per_epoch,
              "global_batch": float(t.plan.G)})
    if "n_candidates" in m:
        m["gathered_batch"] = m["n_candidates"] - t.plan.max_k
    return m


def record_step(t: Trainer, state: RunState, step: int, m: dict[str, float],
                lm_only: bool) -> None:
    """Rank 0: keep the step in the history, ``steps.jsonl`` and the logger; print a line
    every ``log_every`` steps (and the first and last)."""
    state.history.append((step + 1, m))
    state.log(step + 1, m)
    with state.steps_file.open("a") as f:
        f.write(json.dumps([step + 1, m]) + "\n")
    total, lr = t.plan.total, m["lr"]
    if lm_only and ((step + 1) % t.cfg.log_every == 0 or step == state.start):
        print(f"[train] step {step + 1}/{total} rationale warm-up: lm "
              f"{m['loss/lm']:.3f} lr {lr:.2e} gn {m['grad_norm']:.2f} "
              f"{m['samples_per_s']:.1f} samples/s", flush=True)
    elif not lm_only and ((step + 1) % t.cfg.log_every == 0 or step == state.start
                          or step + 1 == total):
        print(f"[train] step {step + 1}/{total} loss {m['loss']:.4f} (nce_r "
              f"{m['loss/nce_reason']:.3f} nce_d {m['loss/nce_direct']:.3f} lm "
              f"{m['loss/lm']:.3f}) acc {m['acc/in_batch_direct']:.2f} lr {lr:.2e} "
              f"gn {m['grad_norm']:.2f} {m['samples_per_s']:.1f} samples/s "
              f"{m['tokens_per_s']:.0f} tok/s", flush=True)


# --------------------------------------------------------------------------- phase: save


def loss_ends(history: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Mean loss of the first and last tenth of each phase (the joint objective's loss;
    the warm-up's, LM alone, separately)."""
    out: dict[str, float] = {}
    joint = [m for _, m in history if not m.get("phase_lm_warmup")]
    if joint:
        k = max(1, len(joint) // 10)
        out["loss_first"] = sum(m["loss"] for m in joint[:k]) / k
        out["loss_last"] = sum(m["loss"] for m in joint[-k:]) / k
    warm = [m for _, m in history if m.get("phase_lm_warmup")]
    if warm:
        k = max(1, len(warm) // 10)
        out["warmup_lm_first"] = sum(m["loss/lm"] for m in warm[:k]) / k
        out["warmup_lm_last"] = sum(m["loss/lm"] for m in warm[-k:]) / k
    return out


def save_outputs(cfg: TrainConfig, model: Model, state: RunState, plan: Plan,
                 train_s: float) -> Path:
    """Gather the final weights (every rank: ZeRO-3 needs all), then on rank 0 count the
    parameters that moved and write the student and ``train_summary.json``."""
    out, metrics = state.out, state.metrics
    sd = _final_state_dict(model.engine, cfg.zero_stage)
    student = out / "student"
    if is_main():
        prints = model.prints
        changed = sum(int(_fingerprint(sd[n]) != prints[n]) for n in prints if n in sd)
        metrics.update({"params_trainable": float(len(prints)), "params_changed": float(changed),
                        "steps": float(plan.total), "train_s": train_s,
                        "world_size": float(plan.W), "global_batch": float(plan.G)})
        metrics.update(loss_ends(state.history))
        student = save_student(cfg, sd, out, model.bf16)
        (out / "train_summary.json").write_text(json.dumps(metrics, indent=2))
    barrier()
    return student


def stage_result(state: RunState, total: int, skipped: SkipReport, student: Path
                 ) -> StageResult:
    """The one-line summary (printed on rank 0) and the stage's result."""
    out, metrics = state.out, state.metrics
    summary = (f"train: {total} steps, loss {metrics.get('loss_first', float('nan')):.3f} -> "
               f"{metrics.get('loss_last', float('nan')):.3f}"
               + (f"; {skipped.rows_skipped} rows skipped, {skipped.negatives_dropped} "
                  f"negatives dropped (unreadable images, {out / 'skipped_rows.jsonl'})"
                  if skipped.rows else "")
               + (f"; synthetic hit@1 {metrics.get('eval_before/mean', float('nan')):.3f} -> "
                  f"{metrics['eval/mean']:.3f}" if "eval/mean" in metrics else "")
               + f"; student at {student}")
    if rank() == 0:
        print(f"[train] {summary}", flush=True)
    files = {"train_summary": out / "train_summary.json", "steps": state.steps_file,
             "ds_config": out / "ds_config.json",
             **{n: out / f"{n}.jsonl" for n in ("skipped_rows", "skipped_eval_rows")
                if (out / f"{n}.jsonl").is_file()}}
    return StageResult("train", metrics=metrics, step_metrics=state.history, files=files,
                       models={"student": student}, summary=summary)


def _direct_only(ap):
    """``--pairs`` without ``--data``: a direct-only run on plain pairs, not the selections a
    pipeline YAML would wire."""
    del ap

    def expand(extra: dict, fields: dict) -> dict:
        del extra
        return {"data": None, **fields} if "pairs" in fields else fields

    return expand


def main(argv: list[str] | None = None) -> None:
    """``python -m mmemb.stages.train``: flags generated from TrainConfig."""
    stage_main("train", run, argv, _direct_only)


if __name__ == "__main__":
    main()
