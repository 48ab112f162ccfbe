"""Stage 4 end to end: training lifts the synthetic eval, every trainable tensor moves, a
SIGKILLed run resumes to the same weights, two gloo ranks share their negatives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmemb.configs.train import TrainConfig
from mmemb.stages import train as stage
from mmemb.teachers.oracle import oracle_selections

ROOT = Path(__file__).resolve().parents[2]
# One intra-op thread: the tiny model's ops are too small to gain from two, and on a shared
# 2-core machine OpenMP spin-waiting next to other jobs costs up to 10x.
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
for _k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
    ENV.pop(_k, None)


@pytest.fixture(scope="module")
def selections(synth, tmp_path_factory) -> Path:
    return oracle_selections(synth["pairs"], tmp_path_factory.mktemp("sel") / "selections")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_training_lifts_the_synthetic_eval(tiny_model, synth, tmp_path):
    logged: list[tuple[int, dict]] = []
    cfg = TrainConfig(model=str(tiny_model), pairs=str(synth["pairs"]), eval=str(synth["eval"]),
                      image_root=str(synth["image_root"]), out=str(tmp_path / "train"),
                      steps=200, lr=2e-3, warmup_steps=5, gradcache=False, save_every=10**6,
                      log_every=50)
    res = stage.run(cfg, log=lambda s, m: logged.append((s, m)))
    m = res.metrics
    # untrained: near chance (0.15); trained: far above
    assert m["eval/mean"] >= m["eval_before/mean"] + 0.25, m
    assert m["eval/family/easy"] >= 0.8, m
    assert m["params_changed"] == m["params_trainable"] == 32
    # the saved student, read back independently: every trainable tensor differs from the base
    base, student = _weights(tiny_model), _weights(res.models["student"])
    trainable = [k for k in base if stage.vision_trainable(k, "merger")]
    assert len(trainable) == 32
    assert all(not torch.equal(base[k], student[k]) for k in trainable)
    assert all(torch.equal(base[k], student[k]) for k in base if k not in trainable)
    assert (res.models["student"] / "mmemb_embedding.json").is_file()
    # per-step logging through the callback
    assert [s for s, _ in logged] == list(range(1, 201))
    need = {"loss", "loss/nce_reason", "loss/nce_direct", "loss/lm", "acc/in_batch_direct",
            "lr", "grad_norm", "samples_per_s", "tokens_per_s"}
    assert need <= set(logged[0][1])
    first = sum(x["loss"] for _, x in logged[:20]) / 20
    last = sum(x["loss"] for _, x in logged[-20:]) / 20
    assert last < 0.6 * first
    assert logged[0][1]["lr"] == pytest.approx(2e-3 / 5)  # warm-up starts above 0
    assert all(x["grad_norm"] > 0 and x["tokens_per_s"] > 0 for _, x in logged)
    assert res.step_metrics == logged


def test_dataset_smaller_than_a_global_batch_is_refused(tiny_model, synth, tmp_path):
    import torch.distributed as dist

    cfg = TrainConfig(model=str(tiny_model), pairs=str(synth["pairs"]),
                      image_root=str(synth["image_root"]), out=str(tmp_path), batch_size=128)
    with pytest.raises(ValueError, match=r"120 rows, fewer than one global contrastive batch "
                                         r"\(128 = batch_size x world_size\)"):
        stage.run(cfg)
    assert not dist.is_initialized()  # the process group is released on errors too


def _write_cfg(path: Path, **kw) -> Path:
    path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v
                                    for k, v in kw.items()}))
    return path


def _cli(cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mmemb.stages.train", "--config", str(cfg), *extra]


def test_killed_run_resumes_to_the_same_weights(tiny_model, synth, selections, tmp_path):
    common = dict(model=tiny_model, data=selections, image_root=synth["image_root"],
                  steps=9, batch_size=8, chunk_size=4, save_every=3, log_every=1,
                  warmup_steps=2, lr=2e-3)
    cut_cfg = _write_cfg(tmp_path / "cut.yaml", out=tmp_path / "cut", **common)
    # the uninterrupted reference, in this process (one thread, like the subprocesses)
    stage.run(TrainConfig.from_dict({**{k: str(v) if isinstance(v, Path) else v
                                        for k, v in common.items()}, "out": str(tmp_path / "ref")}))
    # the same run, SIGKILLed right after its first checkpoint
    p = subprocess.Popen(_cli(cut_cfg), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 300
    for line in p.stdout:
        seen.append(line)
        if "checkpoint step 3 ->" in line:
            p.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "".join(seen)
    p.wait(timeout=60)
    p.stdout.close()
    assert p.returncode == -signal.SIGKILL, "".join(seen)
    cks = tmp_path / "cut" / "checkpoints"
    assert (cks / "step-00000003" / "meta.json").is_file()
    assert not (tmp_path / "cut" / "student").exists()
    done = subprocess.run(_cli(cut_cfg), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "at step 3" in done.stdout or "at step 6" in done.stdout, done.stdout
    steps = [json.loads(x)[0] for x in (tmp_path / "cut" / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))
    ref, cut = _weights(tmp_path / "ref" / "student"), _weights(tmp_path / "cut" / "student")
    base = _weights(tiny_model)
    moved = [k for k in ref if not torch.equal(ref[k], base[k])]
    assert len(moved) == 32
    for k in ref:
        assert torch.allclose(ref[k], cut[k], rtol=0, atol=1e-6), k
    ref_loss = [json.loads(x)[1]["loss"] for x in
                (tmp_path / "ref" / "steps.jsonl").read_text().splitlines()]
    cut_loss = [json.loads(x)[1]["loss"] for x in
                (tmp_path / "cut" / "steps.jsonl").read_text().splitlines()]
    assert cut_loss == pytest.approx(ref_loss, abs=1e-5)  # same data order, same numbers


def _two_ranks(tiny_model, synth, selections, tmp_path, zero_stage, **extra):
    from mmemb.training.distributed import free_port

    common = dict(model=tiny_model, data=selections, image_root=synth["image_root"], steps=3,
                  chunk_size=3, warmup_steps=1, zero_stage=zero_stage, log_every=1, **extra)
    cfg = _write_cfg(tmp_path / "two.yaml", out=tmp_path / "two", batch_size=4, **common)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "-m", "mmemb.stages.train", "--config", str(cfg)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "world size 2 | per-device batch 4 | global contrastive batch 8 (= 4 x 2 ranks" \
        in r.stdout
    steps = [json.loads(x) for x in (tmp_path / "two" / "steps.jsonl").read_text().splitlines()]
    assert [s for s, _ in steps] == [1, 2, 3]
    for _, m in steps:
        # each query was scored against both ranks' positives (8) + its hard negative
        assert m["gathered_batch"] == 8 and m["n_candidates"] == 9
        assert m["global_batch"] == 8 and m["samples_per_s"] > 0
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["params_changed"] == 32
    assert (tmp_path / "two" / "student" / "model.safetensors").is_file()
    return steps, summary


def test_two_ranks_equal_one_rank_with_the_global_batch(tiny_model, synth, selections,
                                                         tmp_path):
    # lam = 0: the LM term is a per-rank token mean (its mean over ranks is not the global
    # token mean); the contrastive terms are exact, so 2 x 4 must replay 1 x 8.
    two, _ = _two_ranks(tiny_model, synth, selections, tmp_path, zero_stage=2, lam=0.0)
    stage.run(TrainConfig(model=str(tiny_model), data=str(selections), batch_size=8,
                          image_root=str(synth["image_root"]), out=str(tmp_path / "one"),
                          steps=3, chunk_size=3, warmup_steps=1, zero_stage=2, lam=0.0))
    one = [json.loads(x) for x in (tmp_path / "one" / "steps.jsonl").read_text().splitlines()]
    for (_, a), (_, b) in zip(two, one, strict=True):
        for k in ("loss", "loss/nce_reason", "loss/nce_direct", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4), k
    w2, w1 = _weights(tmp_path / "two" / "student"), _weights(tmp_path / "one" / "student")
    for k in w1:  # Adam turns last-bit gradient noise of near-zero entries into ~1e-5
        assert torch.allclose(w2[k], w1[k], rtol=0, atol=1e-4), k


@pytest.mark.slow
def test_two_ranks_zero3_with_eval(tiny_model, synth, selections, tmp_path):
    _, summary = _two_ranks(tiny_model, synth, selections, tmp_path, zero_stage=3,
                            eval=synth["eval"])
    assert 0 <= summary["eval/mean"] <= 1 and "eval_before/mean" in summary


def test_rationale_warmup_trains_the_writer_before_the_joint_objective(tiny_model, synth,
                                                                       selections, tmp_path):
    """lm_warmup_steps: LM(r*|q) alone first (its loss falls), then the joint objective; the
    two phases are told apart in the log and each gets the full LR schedule."""
    logged: list[tuple[int, dict]] = []
    cfg = TrainConfig(model=str(tiny_model), data=str(selections), out=str(tmp_path / "t"),
                      image_root=str(synth["image_root"]),
                      lm_warmup_steps=40, steps=4, batch_size=8, lr=2e-3, warmup_steps=2,
                      save_every=10**6, log_every=10**6)
    res = stage.run(cfg, log=lambda s, m: logged.append((s, m)))
    warm = [m for _, m in logged if m.get("phase_lm_warmup")]
    joint = [m for _, m in logged if not m.get("phase_lm_warmup")]
    assert len(warm) == 40 and len(joint) == 4 and len(logged) == 44
    assert all("loss/nce_direct" not in m for m in warm)  # LM alone: no contrastive pass
    first = sum(m["loss/lm"] for m in warm[:5]) / 5
    last = sum(m["loss/lm"] for m in warm[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert res.metrics["warmup_lm_last"] < res.metrics["warmup_lm_first"]
    # each phase restarts the schedule: first step of each at lr / warmup_steps
    assert warm[0]["lr"] == pytest.approx(2e-3 / 2) and joint[0]["lr"] == pytest.approx(2e-3 / 2)
    assert {"loss/nce_direct", "loss/nce_reason", "loss/lm"} <= set(joint[0])


def test_a_changed_config_starts_over_instead_of_resuming(tiny_model, synth, selections,
                                                           tmp_path):
    """A rerun with a different objective must not continue the old run's checkpoint (the
    pipeline reruns stage 4 after a config change into the same folder)."""
    common = dict(model=str(tiny_model), data=str(selections), out=str(tmp_path / "t"),
                  image_root=str(synth["image_root"]), steps=4, batch_size=8,
                  save_every=2, keep_checkpoints=1, log_every=10**6)
    stage.run(TrainConfig(**common, lam=0.5))
    assert (tmp_path / "t" / "checkpoints").is_dir()
    logged: list[tuple[int, dict]] = []
    stage.run(TrainConfig(**common, lam=2.0), log=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 2, 3, 4]  # started over, not resumed at step 2
    assert (tmp_path / "t" / "checkpoints.stale").is_dir()  # kept aside, not deleted
