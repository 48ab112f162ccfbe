"""Stage 5 (GRPO gate) on the embedded default: the policy moves, every part is logged."""

from __future__ import annotations

import json

import pytest
import torch

from mmemb.configs.base import ConfigError
from mmemb.configs.gate import GateConfig
from mmemb.inference import AdaptiveEncoder
from mmemb.model.embedder import Embedder
from mmemb.model.prompts import EmbedInput
from mmemb.stages import gate


def test_config_refuses_zero3_with_a_reason():
    with pytest.raises(ConfigError, match="zero_stage 0-2"):
        GateConfig.from_dict({"model": "m", "data": "d", "zero_stage": 3})


@pytest.mark.slow
@pytest.mark.vllm
def test_gate_with_vllm_rollouts_syncs_after_every_update(tiny_model, synth, tmp_path):
    """rollout_backend='vllm': rationales come from one engine, re-synced after each step."""
    cfg = GateConfig(model=str(tiny_model), data=str(synth["pairs"]),
                     image_root=str(synth["image_root"]), out=str(tmp_path / "gate"),
                     steps=3, queries_per_step=4, group_size=4, budget=8, lr=5e-3,
                     rollout_backend="vllm")
    logged = []
    res = gate.run(cfg, log=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 2, 3]
    assert all(m["rollout/sync_s"] > 0 for _, m in logged)
    assert sum(m["reason_ratio"] for _, m in logged) > 0  # some rollouts went through vLLM
    assert res.metrics["params_changed"] == res.metrics["params_total"]


def test_rollout_logps_match_generation_scores(tiny_model, synth):
    """The log-probs the loss uses equal the ones the sampler used (same tokens, same model)."""
    emb = Embedder.from_pretrained(tiny_model)
    enc = AdaptiveEncoder(emb, budget=8)
    xs = [EmbedInput("2 red circles", "<|image_1|> Count.",
                     [str(synth["image_root"] / "images/train/syn_qa_count/00000.png")]),
          EmbedInput("a blue square")]
    torch.manual_seed(0)
    rolls = enc.generate(xs, do_sample=True, temperature=1.0)
    with torch.no_grad():
        lp, mask = gate.rollout_logps(emb, enc, xs, [True, False], [rolls[0], None])
    # Gate log-prob = log softmax over (<emb>, <think>) of the full model's logits.
    p = enc.p_think(xs)
    assert float(lp[0, 0]) == pytest.approx(float(torch.log(p[0])), abs=1e-5)
    assert float(lp[1, 0]) == pytest.approx(float(torch.log(1 - p[1])), abs=1e-5)
    # Rationale tokens: teacher-forced full-model log-probs of the sampled ids.
    ids = rolls[0].ids
    assert mask[0].sum() == 1 + len(ids) and mask[1].sum() == 1
    prefix = enc.prefix_batch(xs[:1], suffix=emb.config.think_token)
    full = torch.cat([prefix["input_ids"], torch.tensor([ids])], dim=1)
    batch = dict(prefix, input_ids=full, attention_mask=torch.ones_like(full))
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = torch.cat(
            [prefix["mm_token_type_ids"], torch.zeros(1, len(ids), dtype=torch.long)], 1)
    with torch.no_grad():
        logits = emb.model(**batch).logits[0]  # [T, V]
    n = prefix["input_ids"].shape[1]
    want = torch.log_softmax(logits[n - 1:n - 1 + len(ids)], -1)[range(len(ids)), ids]
    torch.testing.assert_close(lp[0, 1:1 + len(ids)], want, atol=1e-4, rtol=1e-4)


def test_gate_stage_moves_the_policy_and_logs_every_part(tiny_model, synth, tmp_path):
    cfg = GateConfig(model=str(tiny_model), data=str(synth["pairs"]),
                     image_root=str(synth["image_root"]), eval=str(synth["eval"]),
                     out=str(tmp_path / "gate"), steps=6, queries_per_step=4, group_size=4,
                     budget=8, lr=5e-3)
    logged = []
    res = gate.run(cfg, log=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == list(range(1, 7))
    for _, m in logged:
        for k in ("reward", "reward/hit", "reward/margin", "reward/cost", "reward/malformed",
                  "reason_ratio", "reason_len", "kl", "clip_fraction", "p_think"):
            assert k in m, k
        # The reward is exactly its parts, weighted by the config.
        rc = cfg.reward
        want = (rc.w_hit * m["reward/hit"] + rc.w_margin * m["reward/margin"]
                - rc.lambda_cost * m["reward/cost"] - rc.format_penalty * m["reward/malformed"])
        assert m["reward"] == pytest.approx(want, abs=1e-5)
    # Every parameter moved and the gate moved.
    assert res.metrics["params_changed"] == res.metrics["params_total"]
    before = res.metrics["before/p_think/family/easy"]
    after = res.metrics["after/p_think/family/easy"]
    assert abs(after - before) > 1e-3
    assert any(m["kl"] > 0 for _, m in logged[1:])
    # The saved policy loads back as an adaptive model.
    policy = Embedder.from_pretrained(res.models["policy"])
    assert json.loads((res.models["policy"] / "mmemb_gate.json").read_text())["budget"] == 8
    assert AdaptiveEncoder(policy).p_think([EmbedInput("x")]).shape == (1,)


def test_grpo_follows_the_reward_when_reasoning_only_costs(tiny_model, synth, tmp_path):
    """Sign check of the whole loop on a reward with one part: with hit and margin weighted
    0, reasoning only costs, so GRPO must raise the reward by lowering p(<think>)."""
    cfg = GateConfig(model=str(tiny_model), data=str(synth["pairs"]),
                     image_root=str(synth["image_root"]), eval=str(synth["eval"]),
                     out=str(tmp_path / "gate"), steps=12, queries_per_step=4, group_size=4,
                     budget=8, lr=5e-3, anchor_weight=0.0,
                     reward={"w_hit": 0.0, "w_margin": 0.0, "lambda_cost": 1.0,
                             "format_penalty": 0.0})
    logged = []
    res = gate.run(cfg, log=lambda s, m: logged.append((s, m)))
    first = sum(m["reward"] for _, m in logged[:4]) / 4
    last = sum(m["reward"] for _, m in logged[-4:]) / 4
    assert last > first, (first, last)
    p0 = sum(m["p_think"] for _, m in logged[:2]) / 2
    p1 = sum(m["p_think"] for _, m in logged[-2:]) / 2
    assert p1 < p0 - 0.1, (p0, p1)
    for fam in ("easy", "inference"):
        assert res.metrics[f"after/p_think/family/{fam}"] < \
            res.metrics[f"before/p_think/family/{fam}"]


def test_a_failing_step_still_releases_the_engines(tiny_model, synth, tmp_path, monkeypatch):
    """An error mid-run tears the process group down and closes the rollout engine (before:
    only a run that reached the save did), so the next stage in the process can start."""
    import torch.distributed as dist

    closed = []

    class Engine:  # stands in for the vLLM policy: only its close() is observed here
        def close(self):
            closed.append(True)

    real_load = gate.load_policies

    def load_with_engine(cfg, out):
        pols = real_load(cfg, out)
        pols.vllm = Engine()
        return pols

    def failing_update(*a, **kw):
        assert dist.is_initialized()  # the DeepSpeed engine is up when the step fails
        raise RuntimeError("step failed")

    monkeypatch.setattr(gate, "load_policies", load_with_engine)
    monkeypatch.setattr(gate, "policy_update", failing_update)
    cfg = GateConfig(model=str(tiny_model), data=str(synth["pairs"]),
                     image_root=str(synth["image_root"]), out=str(tmp_path / "gate"),
                     steps=2, queries_per_step=2, group_size=2, budget=4)
    with pytest.raises(RuntimeError, match="step failed"):
        gate.run(cfg)
    assert closed == [True]
    assert not dist.is_initialized()
