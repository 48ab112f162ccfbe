"""LoRA trains the method's token rows (``lora.train_token_rows``), and nothing else moves.

On the real Qwen2-VL layout all three tokens are new (mean-initialised padding rows); on
Qwen3-VL ``<think>``/``</think>`` pre-exist and only ``<emb>`` is added, yet all three get
the method's role and must train. A few AdamW steps of a real loss (InfoNCE on ``<emb>``
embeddings, reasoning-mode queries, plus the rationale LM loss through the LM head) must
change exactly those rows, in the input embedding and in the LM head as the gate reads it,
leave every base weight bitwise equal, and reach the merged student and the adapter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmemb.configs.train import TrainConfig
from mmemb.model.embedder import Embedder, hf_model
from mmemb.model.prompts import EmbedInput
from mmemb.stages.train import prepare_model, save_student
from mmemb.training.module import EmbedTrainModule

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
N = 4  # pairs per batch


def _cfg(path, **lora) -> TrainConfig:
    return TrainConfig(model=str(path), pairs="unused", vision="frozen",
                       lora={**LORA, **lora})


def _effective(emb: Embedder, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding [V, H], LM-head logits of ``h`` [n, V]) as the forward sees them
    (through peft's token wrappers)."""
    hf = hf_model(emb.model)
    with torch.no_grad():
        E = hf.get_input_embeddings()(torch.arange(hf.config.get_text_config().vocab_size))
        return E.float().clone(), hf.get_output_embeddings()(h).float()


def _train(emb: Embedder, steps: int = 3) -> None:
    """AdamW on InfoNCE(reasoning query, target) + the rationale LM loss, text only."""
    mod = EmbedTrainModule(emb)
    qs = [EmbedInput(text=f"which shape is number {i}?", rationale=f"count to {i}, so {i}")
          for i in range(N)]
    ts = [EmbedInput(text=f"shape {i}") for i in range(N)]
    bq = emb.tokenize(emb.prompts(qs, "reason"), [[] for _ in qs])
    bt = emb.tokenize(emb.prompts(ts, "direct"), [[] for _ in ts])
    params = [p for p in mod.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        (eq, et), (lm, _) = mod([bq, bt], [True, False])
        loss = F.cross_entropy(eq @ et.T / 0.05, torch.arange(N)) + lm / N
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.fixture(params=["qwen2_vl", "qwen3_vl"])
def family(request):
    return request.param


def test_lora_trains_token_rows_only(real_layout, family, tmp_path):
    path = real_layout(family)
    emb = Embedder.from_pretrained(path, add_special_tokens=True)
    ids = [emb.think_id, emb.end_think_id, emb.emb_id]
    if family == "qwen3_vl":
        assert ids[:2] == [151667, 151668]  # pre-existing: trained all the same
    cfg = _cfg(path)
    prepare_model(emb, cfg)
    base = {n: p.detach().clone() for n, p in emb.model.named_parameters()
            if "lora_" not in n and "trainable_tokens" not in n}
    torch.manual_seed(0)
    h = torch.randn(3, emb.hidden_size)  # [3, H] hidden states the head scores
    E0, L0 = _effective(emb, h)

    _train(emb)

    E1, L1 = _effective(emb, h)
    rows = (E1 != E0).any(dim=1).nonzero().flatten().tolist()
    assert rows == sorted(ids)  # the input rows of the three tokens, and no other row
    cols = (L1 != L0).any(dim=0).nonzero().flatten().tolist()
    assert cols == sorted(ids)  # the LM head (tied) scores them anew, the rest as before
    for n, p in emb.model.named_parameters():  # the base, embedding matrix included
        if n in base:
            assert torch.equal(p, base[n]), n

    # the final save path: a fresh model, wrapped the same way, loads the trained weights
    # and is saved merged (student) and unmerged (adapter)
    mod = EmbedTrainModule(emb)
    sd = {k: v.detach().cpu() for k, v in mod.state_dict().items()}
    student = save_student(cfg, sd, tmp_path, bf16=False)
    s = Embedder.from_pretrained(student)
    assert [s.think_id, s.end_think_id, s.emb_id] == ids
    dt = s.save_dtype  # saved in the source dtype (bf16), loaded as float32
    want = E1.to(dt).float()
    Es = s.model.get_input_embeddings().weight.float()
    assert torch.equal(Es[ids], want[ids])
    keep = torch.ones(len(Es), dtype=torch.bool)
    keep[ids] = False
    assert torch.equal(Es[keep], E0.to(dt).float()[keep])
    gate = s.model.lm_head.weight[[s.emb_id, s.think_id]].float()  # what stage 5 reads
    assert torch.equal(gate, want[[s.emb_id, s.think_id]])

    from peft import PeftModel

    fresh = Embedder.from_pretrained(path, add_special_tokens=True)
    fresh.model = PeftModel.from_pretrained(fresh.model, tmp_path / "adapter")
    Ea, La = _effective(fresh, h)
    assert torch.equal(Ea, E1) and torch.equal(La, L1)


def test_train_token_rows_off_keeps_rows(real_layout):
    """``train_token_rows: false`` is adapters-only LoRA: the rows stay as initialised."""
    path = real_layout("qwen2_vl")
    emb = Embedder.from_pretrained(path, add_special_tokens=True)
    prepare_model(emb, _cfg(path, train_token_rows=False))
    assert not any("trainable_tokens" in n for n, _ in emb.model.named_parameters())
    h = torch.randn(3, emb.hidden_size)
    E0, L0 = _effective(emb, h)
    _train(emb, steps=1)
    E1, L1 = _effective(emb, h)
    assert torch.equal(E0, E1) and torch.equal(L0, L1)


def test_stage_run_trains_token_rows(tiny_model, synth, selections, tmp_path):
    """The real stage (DeepSpeed ZeRO-2, gradient caching): the engine optimises the token
    rows beside the adapters, and the merged student holds them (tiny model, tied head)."""
    from safetensors.torch import load_file

    from mmemb.stages import train as stage

    cfg = TrainConfig(model=str(tiny_model), data=str(selections),
                      image_root=str(synth["image_root"]), out=str(tmp_path / "run"), steps=2,
                      batch_size=4, chunk_size=4, hard_negatives=0, lr=5e-3, warmup_steps=0,
                      zero_stage=2, vision="frozen", save_every=10**6, lora={"r": 4, "alpha": 8})
    m = stage.run(cfg).metrics
    # LoRA A/B of 7 linear layers x 2 layers + one [3, H] token-row parameter, all moved
    assert m["params_trainable"] == m["params_changed"] == 29
    tok = Embedder.from_pretrained(tiny_model).tokenizer
    ids = tok.convert_tokens_to_ids(["<think>", "</think>", "<emb>"])
    base = load_file(str(tiny_model / "model.safetensors"))
    student = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    assert set(student) == set(base)  # merged: no lora_ / token_adapter keys
    (key,) = [k for k in base if k.endswith("embed_tokens.weight")]
    rows = (student[key] != base[key]).any(dim=1).nonzero().flatten().tolist()
    assert rows == sorted(ids)
    lora = [k for k in base if k.startswith("model.layers.") and k.endswith("proj.weight")]
    assert all(torch.equal(base[k], student[k]) for k in base if k not in {key, *lora})


def _untie(emb: Embedder, copy_head: bool = True) -> None:
    m = emb.model
    for c in {id(m.config): m.config, id(m.config.get_text_config()): m.config.get_text_config()
              }.values():
        c.tie_word_embeddings = False
    if copy_head:
        m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach().clone())


def test_untied_head_trains_its_own_rows(tiny_model):
    """An untied LM head gets its own trainable rows (the gate reads the head's), and the
    merge writes each matrix's rows into that matrix."""
    emb = Embedder.from_pretrained(tiny_model)
    _untie(emb)
    ids = sorted([emb.think_id, emb.end_think_id, emb.emb_id])
    prepare_model(emb, _cfg(tiny_model))
    assert sum("trainable_tokens_delta" in n for n, _ in emb.model.named_parameters()) == 2
    h = torch.randn(3, emb.hidden_size)
    E0, L0 = _effective(emb, h)
    _train(emb)
    E1, L1 = _effective(emb, h)
    assert (E1 != E0).any(dim=1).nonzero().flatten().tolist() == ids
    assert (L1 != L0).any(dim=0).nonzero().flatten().tolist() == ids
    merged = emb.model.merge_and_unload()
    Wi, Wo = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert Wi is not Wo and torch.equal(Wi, E1)
    with torch.no_grad():
        assert torch.equal(F.linear(h, Wo), L1)
    assert not torch.equal(Wo[ids], Wi[ids])  # started equal (a copy), trained apart


def test_tied_weights_with_an_untied_config_are_refused(tiny_model):
    """Shared storage that the config calls untied: peft would not tie the head's wrapper,
    so the gate would read untrained rows; refused instead of training half the rows."""
    emb = Embedder.from_pretrained(tiny_model)
    _untie(emb, copy_head=False)
    with pytest.raises(RuntimeError, match="did not wrap the LM head"):
        prepare_model(emb, _cfg(tiny_model))
