"""The module DeepSpeed wraps: batches in, pooled embeddings (+ rationale LM sums) out.

One ``forward`` takes a *list* of tokenised batches, so the reference (no gradient
caching) path is one ``engine(...)`` and one ``engine.backward`` for the whole step, and the
gradient-caching path is one of each per chunk. The embedding goes through the base model
only; the LM head is applied only at rationale positions (:mod:`mmemb.losses.lm`).

Multi-rank ZeRO needs every rank to run the same modules the same number of times in the
same order (ZeRO-3 gathers parameters per module call, ZeRO-2 reduces gradient buckets per
backward). Three things make that hold whatever the data:

* every rank builds the same number of chunks per group: :func:`align_chunks` pads a
  rank's short groups with one-row dummy chunks whose embeddings the loss never sees;
* the LM head is called on every LM chunk, even one with no rationale token;
* with ``vision_row`` (several ranks) a chunk without images gets one extra row, an empty
  prompt with a 4-patch white image, whose embedding is dropped: every forward then runs
  embeddings -> vision tower -> language model in the same order (ZeRO-3 all-gathers
  weights module by module in call order, so a text-only chunk on one rank beside an
  image chunk on another would mismatch), and the projector gets a (zero) gradient on
  every rank (ZeRO-2 buckets match).

GradCache's re-forward may reuse the frozen vision tower's output of the no-graph pass
(:meth:`EmbedTrainModule.vision_cacheable`): it then calls only the merger, on every rank
alike, since whether a batch has images is the same on every rank (``vision_row``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmemb.losses.gradcache import Chunk, EmbedFn, EncodeFn
from mmemb.losses.lm import rationale_lm_loss, rationale_target_mask
from mmemb.model.embedder import Embedder, hf_model
from mmemb.model.prompts import EmbedInput
from mmemb.training.distributed import is_dist, world_size

GROUPS = ("q_direct", "q_reason", "pos", "neg")
#: batch key of the vision tower's pre-merger output, kept by GradCache's no-graph pass
VISION_KEY = "_vision_pre"


class EmbedTrainModule(torch.nn.Module):
    """Wraps the embedder's HF model for DeepSpeed."""

    def __init__(self, emb: Embedder, vision_row: bool = False, cache_vision: bool = True):
        super().__init__()
        self.model = emb.model  # registered: DeepSpeed sees (and partitions) its parameters
        object.__setattr__(self, "_emb", emb)  # not a submodule: no double registration
        self.vision_row = vision_row
        self.cache_vision = cache_vision  # see vision_cacheable

    @property
    def emb(self) -> Embedder:
        return self._emb

    def vision_cacheable(self) -> bool:
        """Can a batch's vision-tower output be kept from GradCache's no-graph pass for its
        re-forward? Only when the tower below its merger trains nothing (``vision: merger``
        or ``frozen``), so recomputing it would give the same values and no gradient, and
        only for Qwen2-VL's tower, whose output rows are the image patches in order (Qwen2.5-
        VL reorders them by attention window, Qwen3-VL adds deepstack features)."""
        visual = getattr(hf_model(self.model).model, "visual", None)
        if type(visual).__name__ != "Qwen2VisionTransformerPretrainedModel":
            return False
        return not any(p.requires_grad for n, p in visual.named_parameters()
                       if not n.startswith("merger."))

    def _backbone_kw(self, batch: dict, cache: bool) -> dict:
        """The backbone's keyword arguments for one batch. With ``cache`` and images: the
        tower's pre-merger output is computed once, kept in ``batch[VISION_KEY]`` (by the
        no-graph pass, without a graph) and only the merger is re-run on it afterwards (with
        a graph: it trains), handed to the model as ``mm_encoder_outputs``."""
        kw = {k: v for k, v in batch.items() if k not in ("labels", VISION_KEY)}
        if not cache or "pixel_values" not in kw:
            return kw
        visual = hf_model(self.model).model.visual
        pixels, grid = kw.pop("pixel_values"), kw["image_grid_thw"]
        if VISION_KEY in batch:
            pre = batch[VISION_KEY]  # [n_patches, D], the tower's output before the merger
            merged = visual.merger(pre)  # [n_patches / merge^2, H]
        else:
            out = visual(pixels.type(visual.dtype), grid_thw=grid)
            pre, merged = out.last_hidden_state, out.pooler_output
            if not torch.is_grad_enabled():
                batch[VISION_KEY] = pre.detach()
        kw["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
            last_hidden_state=pre, pooler_output=(merged,))}
        return kw

    def forward(self, batches: list[dict], with_lm: list[bool], n_keep: list[int] | None = None
                ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Per batch: embeddings [n_keep, H] (L2-normalised; rows past ``n_keep`` are
        alignment rows) and the summed rationale CE [] (zero where ``with_lm`` is False)."""
        hf = hf_model(self.model)
        backbone = hf.model
        embs, lms = [], []
        keep = n_keep or [None] * len(batches)
        cache = self.cache_vision and self.vision_cacheable()
        for batch, lm, n in zip(batches, with_lm, keep, strict=True):
            kw = self._backbone_kw(batch, cache)
            hidden = backbone(**kw, use_cache=False, return_dict=True).last_hidden_state
            e = self.emb.pool(hidden, batch["input_ids"])  # [b, H]
            embs.append(e if n is None else e[:n])
            if lm:
                s, _ = rationale_lm_loss(hidden, batch["input_ids"], hf.lm_head,
                                         self.emb.think_id, self.emb.end_think_id)
                lms.append(s)
            else:
                lms.append(hidden.new_zeros((), dtype=torch.float32))
        return tuple(embs), tuple(lms)


@dataclass
class Item:
    group: str
    inp: EmbedInput
    mode: str  # "direct" | "reason"


def _vision_item(group: str) -> Item:
    from PIL import Image

    return Item(group, EmbedInput(text="", images=[Image.new("RGB", (56, 56), "white")]),
                "direct")


def tokenize_chunk(emb: Embedder, items: list[Item], group: str, lm: bool,
                   meta: dict | None = None, vision_row: bool = False) -> Chunk:
    """Tokenise one forward's inputs; ``meta['n']`` real rows (an alignment row may follow)."""
    n = len(items)
    if vision_row and not any(it.inp.images for it in items):
        items = [*items, _vision_item(group)]
    prompts = [emb.prompts([it.inp], it.mode)[0] for it in items]
    batch = emb.tokenize(prompts, [it.inp.images for it in items])
    n_lm = int(rationale_target_mask(batch["input_ids"], emb.think_id,
                                     emb.end_think_id).sum()) if lm else 0
    n_tok = int(batch["attention_mask"][:n].sum())
    return Chunk(group, batch, lm=lm, n_tokens=n_tok,
                 meta={"n_lm_tokens": n_lm, "n": n, **(meta or {})})


def make_chunks(emb: Embedder, items: list[Item], chunk_size: int,
                vision_row: bool = False) -> list[Chunk]:
    """Group-ordered chunks of at most ``chunk_size`` inputs (LM on reasoning queries)."""
    chunks = []
    for g in GROUPS:
        its = [it for it in items if it.group == g]
        for s in range(0, len(its), chunk_size):
            chunks.append(tokenize_chunk(emb, its[s:s + chunk_size], g, lm=g == "q_reason",
                                         vision_row=vision_row))
    return chunks


def align_chunks(emb: Embedder, chunks: list[Chunk], vision_row: bool = False) -> list[Chunk]:
    """Pad each group to the maximum chunk count over ranks with dummy chunks (no-op on one
    rank). The dummy is one direct-mode empty input; the loss never reads its embedding."""
    if not is_dist() or world_size() == 1:
        return chunks
    import torch.distributed as dist

    counts = torch.tensor([sum(c.group == g for c in chunks) for g in GROUPS])
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    out = []
    for g, n in zip(GROUPS, counts.tolist(), strict=True):
        mine = [c for c in chunks if c.group == g]
        out += mine
        for _ in range(n - len(mine)):
            out.append(tokenize_chunk(emb, [Item(g, EmbedInput(text=""), "direct")], g,
                                      lm=g == "q_reason", meta={"dummy": True},
                                      vision_row=vision_row))
    return out


def merge_batches(emb: Embedder, batches: list[dict]) -> dict:
    """The rows of several tokenised batches as one batch.

    Token-level tensors (``[b_i, T_i]``, as ``input_ids``) are padded to the longest
    ``T`` on the tokenizer's padding side (``input_ids`` with its pad id, masks and type
    ids with 0) and stacked; image tensors (patches ``[n_i, D]``, grids ``[m_i, 3]``) are
    concatenated in batch order, the order in which the model hands image features to
    image tokens. Padding is masked out, so each row embeds as in its own batch (up to
    float rounding of the larger matmuls)."""
    tok = getattr(emb.processor, "tokenizer", emb.processor)
    left = getattr(tok, "padding_side", "right") == "left"
    T = max(int(b["input_ids"].shape[1]) for b in batches)
    keys = list(dict.fromkeys(k for b in batches for k in b))
    out = {}
    for k in keys:
        vals = [(b, b[k]) for b in batches if k in b]
        if all(torch.is_tensor(v) and v.shape == b["input_ids"].shape for b, v in vals) \
                and len(vals) == len(batches):  # token-level: [b_i, T_i]
            fill = tok.pad_token_id if k == "input_ids" else 0
            padded = []
            for _, v in vals:
                pad = v.new_full((v.shape[0], T - v.shape[1]), fill)
                padded.append(torch.cat([pad, v] if left else [v, pad], dim=1))
            out[k] = torch.cat(padded)  # [sum b_i, T]
        else:
            out[k] = torch.cat([v for _, v in vals])  # image patches / grids, in order
    return out


def split_vision(merged: dict, batches: list[dict]) -> None:
    """Hand the vision cache of a merged batch (``merged[VISION_KEY]``, [sum patches, D])
    back to the batches it was merged from: each gets the rows of its own images, whose
    patch counts are the products of their ``image_grid_thw`` rows."""
    if VISION_KEY not in merged:
        return
    off = 0
    for b in batches:
        if "image_grid_thw" not in b:
            continue
        n = int(b["image_grid_thw"].prod(-1).sum())
        b[VISION_KEY] = merged[VISION_KEY][off:off + n]
        off += n


def merged_embed(encode: EncodeFn, emb: Embedder, per_forward: int) -> EmbedFn | None:
    """GradCache's no-graph pass with up to ``per_forward`` consecutive chunks of a group
    merged into one forward (None for 1: one forward per chunk).

    Why: a forward without a graph holds one layer's activations at a time, a chunk's
    forward with a graph holds every layer's, so the no-graph pass fits several chunks in
    less memory than the graph pass needs for one, and fewer, larger forwards cost less
    per row (the per-call overhead of small chunks dominates on CPU and leaves a GPU idle).
    The merge depends only on chunk positions, so every rank runs the same forwards."""
    if per_forward <= 1:
        return None

    def embed(chunks: list[Chunk]) -> list[torch.Tensor]:
        runs: list[list[int]] = []  # consecutive chunk indices of one group
        for i, c in enumerate(chunks):
            if runs and chunks[runs[-1][0]].group == c.group and len(runs[-1]) < per_forward:
                runs[-1].append(i)
            else:
                runs.append([i])
        merged = []
        for run in runs:
            batch = merge_batches(emb, [chunks[i].batch for i in run])
            merged.append(Chunk(chunks[run[0]].group, batch,
                                meta={"n": int(batch["input_ids"].shape[0])}))
        cached: list[torch.Tensor] = [None] * len(chunks)  # type: ignore[list-item]
        for run, m, (e, _) in zip(runs, merged, encode(merged, False), strict=True):
            off = 0  # e [sum b_i, H]
            for i in run:
                b = int(chunks[i].batch["input_ids"].shape[0])
                cached[i] = e[off:off + chunks[i].meta.get("n", b)]  # real rows only
                off += b
            split_vision(m.batch, [chunks[i].batch for i in run])
        return cached

    return embed


@torch.no_grad()
def embed_inputs(engine, emb: Embedder, inputs: list[EmbedInput], batch_size: int,
                 mode: str = "direct") -> torch.Tensor:
    """Embeddings [N, H] through the (DeepSpeed) module, in eval mode, without a graph.

    Every rank must call it with the same inputs (ZeRO-3 gathers weights per call)."""
    was = engine.module.training
    engine.module.eval()
    try:
        out = []
        for s in range(0, len(inputs), batch_size):
            part = inputs[s:s + batch_size]
            c = tokenize_chunk(emb, [Item("eval", x, mode) for x in part], "eval", lm=False,
                               vision_row=engine.module.vision_row)
            embs, _ = engine([c.batch], [False], [c.meta["n"]])
            out.append(embs[0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0, emb.hidden_size)
    finally:
        engine.module.train(was)
