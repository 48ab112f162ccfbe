"""LoRA + ZeRO-3 + gradient checkpointing + frozen vision tower, through the real stage."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmemb.configs.train import TrainConfig
from mmemb.model.embedder import Embedder
from mmemb.stages import train as stage

# DeepSpeed's ZeRO collectives call torch APIs torch 2.13 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_lora_zero3_checkpointing_frozen_vision(tiny_model, synth, selections, tmp_path):
    cfg = TrainConfig(model=str(tiny_model), data=str(selections),
                      image_root=str(synth["image_root"]), out=str(tmp_path / "lora"),
                      steps=3, batch_size=8, chunk_size=4, lr=5e-3, warmup_steps=1,
                      zero_stage=3, gradient_checkpointing=True, vision="frozen",
                      lora={"r": 4, "alpha": 8})
    logged = []
    res = stage.run(cfg, log=lambda s, m: logged.append(m))
    m = res.metrics
    # trainable = LoRA A/B of 7 linear layers x 2 layers + the token rows of <think>,
    # </think>, <emb> (lora.train_token_rows; one [3, H] parameter, the head is tied)
    assert m["params_trainable"] == 29 and m["params_changed"] == 29
    assert all(x["loss/lm"] > 0 and x["lm_tokens"] > 0 for x in logged)  # rationale rows
    base, student = load_file(str(tiny_model / "model.safetensors")), \
        load_file(str(res.models["student"] / "model.safetensors"))
    assert set(student) == set(base)  # merged: a plain checkpoint, no lora_ keys
    # saved names are the checkpoint layout ("model.layers.N..."), vision under "visual."
    lora_targets = [k for k in base if k.startswith("model.layers.")
                    and k.endswith("proj.weight")]
    assert len(lora_targets) == 14
    assert all(not torch.equal(base[k], student[k]) for k in lora_targets)
    emb_key = "model.embed_tokens.weight"
    ids = Embedder.from_pretrained(tiny_model).tokenizer.convert_tokens_to_ids(
        ["<think>", "</think>", "<emb>"])
    rows = (base[emb_key] != student[emb_key]).any(dim=1).nonzero().flatten().tolist()
    assert rows == sorted(ids)  # the method's token rows, no other
    untouched = [k for k in base if k not in lora_targets and k != emb_key]
    assert all(torch.equal(base[k], student[k]) for k in untouched)  # vision, norms, biases
    adapter = tmp_path / "lora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    emb = Embedder.from_pretrained(res.models["student"])  # loads like any checkpoint
    assert emb.config.emb_token == "<emb>"
